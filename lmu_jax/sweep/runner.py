"""Run a sweep's runs locally, one process each, so that one crash does not stop the rest.

Layout of a sweep directory::

    <sweep_dir>/spec.yaml            the spec as given (what `report` and `status` read back)
    <sweep_dir>/plan.json            the expanded runs (ids, families, sizes, budgets, N, tokens, FLOPs)
    <sweep_dir>/configs/<id>.yaml    each run's resolved RunConfig
    <sweep_dir>/runs/<id>/           the run directory (config.yaml, metrics.jsonl, eval.json, DONE ...)
    <sweep_dir>/runs/<id>/sweep.json this runner's record: state, attempts, exit code, error, log tail
    <sweep_dir>/runs/<id>/train.log  the run's stdout + stderr, appended on every attempt

A run is ``done`` when its DONE file exists (the trainer's own marker), whatever sweep.json says; a
finished run is skipped and a partial one resumes from its last checkpoint, because rerunning
``lmu-jax train`` on a run directory does exactly that.

On a pod the runner runs on every host (``lmu-jax sweep run`` on all workers), and each starts its
host's trainer process of one multi-process job (``distributed.job_process`` says which process this
is, from the environment). Only process 0 writes the sweep directory (spec, plan, configs, sweep.json,
train.log); the others write their trainer's config to a local file and leave its output on their
own stdout (the launcher's per-worker log). A job of several processes never skips a run that
sweep.json calls ``running``: that record may be its own process 0's, or a dead attempt's from a
preempted slice; another live job in the same run directory is refused by the trainer's run lock.

A spec's ``results`` directory (in the repository) keeps each finished run's small files::

    <results>/runs/<id>/             config.yaml, metrics.jsonl, eval.json, DONE and sweep.json's outcome

(never checkpoints, logs or host names), written as each run finishes. Committed, they make the study
outlive the machine: ``sync_results`` copies them back into a sweep directory that lacks them, where they
count as done, so ``sweep run`` on a fresh clone resumes the study where it stood.

The sweep directory may be remote (``gs://``, see ``lmu_jax.storage``): then train.log is written
locally during an attempt and appended to the remote one after it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmu_jax import distributed, storage
from lmu_jax.config import dump_config
from lmu_jax.errors import UserError
from lmu_jax.sweep.spec import PlannedRun, SweepSpec
from lmu_jax.train.rundir import pid_alive

LOG_TAIL_LINES = 30
STATUS_FILE = "sweep.json"
LOG_FILE = "train.log"


class SweepDir:
    def __init__(self, path):
        self.path = storage.path(path, "--sweep-dir")
        self.spec_path = self.path / "spec.yaml"
        self.plan_path = self.path / "plan.json"
        self.configs = self.path / "configs"
        self.runs = self.path / "runs"

    def run_dir(self, run_id: str):
        return self.runs / run_id

    def config_path(self, run_id: str):
        return self.configs / f"{run_id}.yaml"

    def write_plan(self, spec: SweepSpec, runs: list[PlannedRun]) -> None:
        """Record the spec and every run's config; a rerun rewrites them with the same content."""
        self.configs.mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)
        storage.write_text(self.spec_path, yaml.safe_dump(spec.raw, sort_keys=False))
        storage.write_text(self.plan_path, json.dumps({"name": spec.name, "runs": [r.summary() for r in runs]},
                                                      indent=1) + "\n")
        for run in runs:
            storage.write_text(self.config_path(run.run_id), dump_config(run.config))

    def read_plan(self) -> list[dict]:
        if not self.plan_path.exists():
            return []
        return json.loads(self.plan_path.read_text())["runs"]


# ------------------------------------------------------------------------------------------- status


@dataclass
class RunStatus:
    run_id: str
    state: str  # done | running | failed | stopped (interrupted or killed) | partial (has checkpoints) | pending
    error: str = ""
    attempts: int = 0
    returncode: int | None = None
    log_tail: tuple = ()
    step: int = 0  # last step logged in metrics.jsonl


def read_record(run_dir) -> dict:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def last_step(run_dir) -> int:
    """The last train step in metrics.jsonl (reads only the file's end)."""
    path = run_dir / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 8192, 0))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            return int(record["step"])
    return 0


def run_status(sweep: SweepDir, run_id: str) -> RunStatus:
    run_dir = sweep.run_dir(run_id)
    record = read_record(run_dir)
    common = dict(attempts=record.get("attempts", 0), returncode=record.get("returncode"),
                  log_tail=tuple(record.get("log_tail", ())), step=last_step(run_dir))
    if (run_dir / "DONE").exists():
        return RunStatus(run_id, "done", **common)
    state = record.get("state")
    if state == "running":
        same_host = record.get("host") == socket.gethostname()
        if not same_host or pid_alive(record.get("pid")):
            return RunStatus(run_id, "running", **common)
        return RunStatus(run_id, "stopped", error="its process ended without a result (killed?)", **common)
    if state in ("failed", "stopped"):
        return RunStatus(run_id, state, error=record.get("error", ""), **common)
    if (run_dir / "checkpoints").exists():
        return RunStatus(run_id, "partial", **common)
    return RunStatus(run_id, "pending", **common)


# ---------------------------------------------------------------------------------- committed results

RESULT_FILES = ("config.yaml", "metrics.jsonl", "eval.json", "DONE")
RECORD_KEYS = ("run_id", "state", "attempts", "started", "ended", "returncode")  # what the throughput reads


def writes_sweep_dir() -> bool:
    """Only a job's process 0 (or a process outside any job) writes the sweep directory."""
    job = distributed.job_process()
    return job is None or job[0] == 0


def _copy_files(source, target, names) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (source / name).exists():
            storage.write_bytes(target / name, (source / name).read_bytes())


def export_run(sweep: SweepDir, run_id: str, results) -> None:
    """Copy a finished run's small files into ``<results>/runs/<id>/`` (the record without host or paths)."""
    source, target = sweep.run_dir(run_id), Path(results) / "runs" / run_id
    _copy_files(source, target, RESULT_FILES)
    record = {key: value for key, value in read_record(source).items() if key in RECORD_KEYS}
    (target / STATUS_FILE).write_text(json.dumps(record, indent=1) + "\n")


def sync_results(sweep: SweepDir, results) -> tuple[int, int]:
    """(exported, restored): finished runs of the sweep directory missing from ``results`` are copied
    there, and committed runs missing from the sweep directory are copied back (they are then done)."""
    committed = Path(results) / "runs"
    local = {p.name for p in sweep.runs.iterdir() if (p / "DONE").exists()} if sweep.runs.exists() else set()
    kept = {p.name for p in committed.iterdir() if (p / "DONE").exists()} if committed.exists() else set()
    for run_id in sorted(local - kept):
        export_run(sweep, run_id, results)
    for run_id in sorted(kept - local):
        _copy_files(committed / run_id, sweep.run_dir(run_id), (*RESULT_FILES, STATUS_FILE))
    return len(local - kept), len(kept - local)


# --------------------------------------------------------------------------------------- execution


def error_line(lines) -> str:
    """The line that says what went wrong: our one-line `error:` message, else a traceback's last line."""
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~")) and ":" in line and line.split(":")[0].replace(".", "").isidentifier():
            return line  # e.g. "ValueError: ..." or "jax.errors.JaxRuntimeError: ..."
    return lines[-1] if lines else ""


def train_command(config_path, run_dir) -> list[str]:
    return [sys.executable, "-m", "lmu_jax.cli", "train", "--config", str(config_path), "--run-dir", str(run_dir)]


def _run_child(command: list[str], stdout, env, on_poll, poll_s: float) -> int:
    """The child's exit code. Its own session: a Ctrl-C at the terminal reaches only this runner, which
    then asks the child to stop with SIGTERM, on which the trainer saves a checkpoint (so a rerun
    resumes, not restarts); the interruption is re-raised once the child has gone. ``on_poll(pid)``
    runs right after the start and then about every ``poll_s`` seconds."""
    child = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    try:
        while True:
            if on_poll is not None:  # first right after the start, then every poll_s
                on_poll(child.pid)
            try:
                return child.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        child.terminate()
        child.wait()
        raise


def execute(sweep: SweepDir, run_id: str, *, env: dict | None = None, on_poll=None, poll_s: float = 1.0) -> RunStatus:
    """Train one run in a child process; its output goes to train.log, its outcome to sweep.json.

    ``on_poll(run_id)`` is called about every ``poll_s`` seconds while the child runs (progress display).
    """
    run_dir = sweep.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_record(run_dir)
    record = {"run_id": run_id, "state": "running", "host": socket.gethostname(),
              "attempts": previous.get("attempts", 0) + 1, "started": time.time(),
              "command": train_command(sweep.config_path(run_id), run_dir)}
    remote_log = run_dir / LOG_FILE
    log_path = _staging_file("train-", ".log") if storage.is_remote(run_dir) else remote_log

    def poll(pid):
        if "pid" not in record:  # the record names the child (`sweep status`, a second runner)
            record["pid"] = pid
            storage.write_text(run_dir / STATUS_FILE, json.dumps(record, indent=1))
        elif on_poll is not None:
            on_poll(run_id)

    with open(log_path, "ab") as log:
        log.write(f"\n=== attempt {record['attempts']} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(record['command'])}\n".encode())
        log.flush()
        start_offset = log.tell()
        try:
            returncode = _run_child(record["command"], log, env, poll, poll_s)
        except BaseException as err:  # Ctrl-C or SIGTERM: the child is stopped; say so in the record
            record.update(state="stopped", ended=time.time(),
                          error=f"interrupted ({type(err).__name__}); a rerun resumes from its last checkpoint")
            storage.write_text(run_dir / STATUS_FILE, json.dumps(record, indent=1))
            _upload_log(log_path, remote_log)
            raise
    with open(log_path, "rb") as log:
        log.seek(start_offset)
        tail = deque(log.read().decode("utf-8", "replace").splitlines(), maxlen=LOG_TAIL_LINES)
    _upload_log(log_path, remote_log)
    done = (run_dir / "DONE").exists()
    record.update(state="done" if returncode == 0 and done else "failed", returncode=returncode,
                  ended=time.time(), log_tail=list(tail))
    if record["state"] == "failed":
        record["error"] = error_line(tail) or f"exit code {returncode}"
        if returncode < 0:  # e.g. the kernel's OOM killer: the log just stops
            record["error"] = f"killed by {signal.Signals(-returncode).name}; last output: {record['error']}"
        elif returncode == 0:  # e.g. a SIGTERM checkpoint-and-exit: resumable, but not finished
            record["error"] = f"exited without finishing ({record['error']})"
    storage.write_text(run_dir / STATUS_FILE, json.dumps(record, indent=1))
    return run_status(sweep, run_id)


def take_part(sweep: SweepDir, run: PlannedRun, *, env: dict | None = None) -> RunStatus:
    """A pod's process > 0: run this host's trainer of the job and write nothing in the sweep
    directory (process 0 records the run); the output stays on this process's stdout."""
    config = _staging_file(f"{run.run_id}-", ".yaml")
    config.write_text(dump_config(run.config))
    try:
        returncode = _run_child(train_command(config, sweep.run_dir(run.run_id)), None, env, None, 1.0)
    finally:
        config.unlink(missing_ok=True)
    done = (sweep.run_dir(run.run_id) / "DONE").exists()
    return RunStatus(run.run_id, "done" if returncode == 0 and done else "failed", returncode=returncode,
                     error="" if returncode == 0 else f"exit code {returncode}; see this worker's log")


def _staging_file(prefix: str, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f"lmu_jax-{prefix}", suffix=suffix)
    os.close(fd)
    return Path(name)


def _upload_log(local: Path, remote) -> None:
    """Append this attempt's local log to a remote train.log (nothing to do for a local one)."""
    if local == remote:
        return
    before = remote.read_bytes() if remote.exists() else b""
    storage.write_bytes(remote, before + local.read_bytes())
    local.unlink(missing_ok=True)


def run_sweep(spec: SweepSpec, runs: list[PlannedRun], sweep_dir, *, only: str | None = None,
              env: dict | None = None, progress: bool = True, out=sys.stderr) -> list[RunStatus]:
    """Run every run not yet done (or just ``only``), one after the other; return their statuses."""
    sweep = SweepDir(sweep_dir)
    if only is not None and only not in {r.run_id for r in runs}:
        raise UserError(f"--only {only!r} is not a run of this sweep; see `lmu-jax sweep plan SPEC --format ids`")
    job = distributed.job_process()
    main = writes_sweep_dir()
    if main:
        sweep.write_plan(spec, runs)
    todo = [r for r in runs if only is None or r.run_id == only]
    bar = _progress_bar(len(todo), progress and main, out)
    statuses = []
    previous_handler = _stop_on_sigterm()
    try:
        for i, run in enumerate(todo, 1):
            label = f"run {i}/{len(todo)} {run.family} N={run.n_params:,} {run.steps} steps"
            status = run_status(sweep, run.run_id)
            if status.state == "running" and job is None:
                _say(bar, out, f"{label}: already running elsewhere (pid in {STATUS_FILE}); skipped")
            elif status.state == "done":
                _say(bar, out, f"{label}: done before; skipped")
            else:
                if bar is not None:
                    bar.set_description(label)
                if main:
                    status = execute(sweep, run.run_id, env=env,
                                     on_poll=lambda rid: _show_step(bar, sweep, rid, run.steps))
                else:
                    status = take_part(sweep, run, env=env)
                if status.state == "done" and main and spec.results:
                    export_run(sweep, run.run_id, spec.results)
                message = "done" if status.state == "done" else f"FAILED: {status.error}"
                _say(bar, out, f"{label}: {message}")
            statuses.append(status)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return statuses


class Stopped(Exception):
    """The runner got SIGTERM (a preemption, `kill`): it stops the run in flight and exits."""


def _stop_on_sigterm():
    """Turn SIGTERM into ``Stopped`` so the run in flight is stopped cleanly; returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Stopped("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def _progress_bar(total: int, enabled: bool, out):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="run", file=out, dynamic_ncols=True, disable=None)


def _say(bar, out, message: str) -> None:
    if bar is not None:
        bar.write(message, file=out)
    else:
        print(message, file=out, flush=True)


def _show_step(bar, sweep: SweepDir, run_id: str, steps: int) -> None:
    if bar is not None:
        bar.set_postfix_str(f"step {last_step(sweep.run_dir(run_id))}/{steps}")
