"""The one door every external command goes through (gcloud, lmu-jax sweep plan).

``SubprocessRunner`` runs commands; ``DryRunner`` prints them, one shell-quoted line each, in order, and
changes nothing. Tests pass their own scripted runner with the same ``run`` method. Because every caller
says what a dry run should assume (``dry_run_result``), the launcher follows the same code path in a dry
run as in a real one: "the slice does not exist yet", "it is ACTIVE at the first poll", "every worker
exits 0".
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from lmu_jax.errors import UserError


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


OK = Result(0)
LineSink = Callable[[str], None]


def render(argv: list[str], input_text: Optional[str] = None) -> str:
    """One runnable shell line for ``argv`` (stdin, if any, piped in with printf)."""
    line = shlex.join(argv)
    return line if input_text is None else f"printf %s {shlex.quote(input_text)} | {line}"


class Clock:
    """Wall time and sleeping, injectable so tests of polling and backoff run instantly."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


def log(message: str) -> None:
    """Progress lines go to stderr, so stdout of a dry run stays a clean list of commands."""
    print(f"[tpu.launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class SubprocessRunner:
    """Runs commands for real. ``on_line`` streams merged stdout+stderr line by line (long jobs)."""

    dry_run = False

    def __init__(self, echo: Callable[[str], None] = log):
        self._echo = echo
        self._lock = threading.Lock()
        self._current: Optional[subprocess.Popen] = None

    def run(self, argv: list[str], *, on_line: Optional[LineSink] = None, input_text: Optional[str] = None,
            dry_run_result: Result = OK) -> Result:
        self._echo("+ " + render(argv))
        try:
            if on_line is None:
                done = subprocess.run(argv, input=input_text, capture_output=True, text=True)
                return Result(done.returncode, done.stdout, done.stderr)
            return self._stream(argv, on_line)
        except FileNotFoundError:
            raise UserError(f"{argv[0]!r} was not found on PATH; install it (for gcloud: "
                            "https://cloud.google.com/sdk/docs/install) or run with --dry-run") from None

    def _stream(self, argv: list[str], on_line: LineSink) -> Result:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, bufsize=1)
        with self._lock:
            self._current = proc
        try:
            for line in proc.stdout:
                on_line(line.rstrip("\r\n"))
            return Result(proc.wait())
        finally:
            with self._lock:
                self._current = None

    def terminate(self) -> None:
        """Stop the streaming command in flight (lost lease, straggling workers). Safe from any thread."""
        with self._lock:
            if self._current is not None and self._current.poll() is None:
                self._current.terminate()


class DryRunner:
    """Prints each command on stdout and returns what the caller said a dry run should assume."""

    dry_run = True

    def __init__(self, out=None):
        self._out = out or sys.stdout

    def run(self, argv: list[str], *, on_line: Optional[LineSink] = None, input_text: Optional[str] = None,
            dry_run_result: Result = OK) -> Result:
        print(render(argv, input_text), file=self._out, flush=True)
        if on_line is not None:
            for line in dry_run_result.stdout.splitlines():
                on_line(line)
        return dry_run_result

    def note(self, text: str) -> None:
        """A comment line in the dry-run listing (keeps it a valid shell script)."""
        print(f"# {text}", file=self._out, flush=True)

    def terminate(self) -> None:
        pass
