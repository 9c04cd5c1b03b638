"""One slice's life: create it, wait for ACTIVE, install, run a job on all workers, and recover.

``Slice`` knows how to talk to Cloud TPU about one queued resource; ``Babysitter`` runs a job on it until
the job succeeds, recreating the slice when it is preempted and relaunching the same command. That is
safe because training commands are idempotent: rerunning ``lmu-jax train ... --run-dir gs://...`` on an
existing run directory resumes from the last checkpoint, and a finished run is left alone.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

from tpu import gcloud
from tpu.gcloud import CreateOptions, InstallSource, JobEnv, SliceTarget
from tpu.runner import Clock, Result, log

BROKEN_STATES = {"FAILED", "SUSPENDING", "SUSPENDED"}  # queued-resource states after a preemption or error
HEALTHY_NODE = {("READY", ""), ("READY", "HEALTHY")}  # (node state, health); health may be unreported
EXIT_USER_ERROR = 2  # lmu-jax's exit code for bad input: retrying cannot help
STRAGGLER_GRACE_S = 300  # after one worker fails, how long the others may take to notice and exit


class LaunchError(Exception):
    """A failure at run time (not the user's input): the launcher prints it and exits 1."""


class GiveUp(LaunchError):
    pass


class JobRejected(LaunchError):
    """The job itself exited with code 2 (its own input error) on a worker."""


class Cancelled(LaunchError):
    """Stopped from outside (the sweep lease was lost): do not retry."""


class SliceUnavailable(LaunchError):
    """The slice could not be had or used this time (preempted, not ACTIVE in time, ssh failed)."""


class Outcome(Enum):
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"  # exit code 2 on some worker
    FAILED = "failed"  # another non-zero exit code
    WORKERS_LOST = "workers lost"  # some workers never reported an exit code: preempted or ssh died


@dataclass
class JobReport:
    outcome: Outcome
    exits: dict  # worker -> exit code, from the exit markers
    detail: str


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def is_not_found(result: Result) -> bool:
    text = (result.stderr + result.stdout).lower()
    return "not found" in text or "not_found" in text or "404" in text


class LazyLog:
    """An append-only log file opened on its first line, so a dry run (which has no output) writes nothing."""

    def __init__(self, path: Path, header: str):
        self.path, self.header = path, header
        self._handle = None

    def write(self, text: str) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
            self._handle.write(self.header + "\n")
        self._handle.write(text + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


class WorkerLogs:
    """Splits the merged ``[worker-<i>] ...`` stream of one ssh --worker=all call into per-worker files.

    Lines without a worker prefix come from gcloud/ssh themselves and go to ``launcher.log``. Exit markers
    are collected, not written.
    """

    PREFIX = re.compile(r"\[worker-([^\]]+)\] ?(.*)")
    MARKER = re.compile(re.escape(gcloud.EXIT_MARKER) + r"(\d+)(?: signal=(\w+))?")

    def __init__(self, directory: Path, header: str, on_exit: Callable[[str, int], None],
                 echo_worker: Optional[str] = "0", echo: Callable[[str], None] = log):
        self.directory, self.header = directory, header
        self.on_exit, self.echo_worker, self.echo = on_exit, echo_worker, echo
        self.exits: dict[str, int] = {}
        self.signalled: set[str] = set()
        self._files: dict[str, LazyLog] = {}

    def feed(self, line: str) -> None:
        match = self.PREFIX.match(line)
        if match is None:
            self._write("launcher", line)
            return
        worker, text = match.groups()
        marker = self.MARKER.fullmatch(text.strip())
        if marker:
            self.exits[worker] = int(marker.group(1))
            if marker.group(2):
                self.signalled.add(worker)
            self.on_exit(worker, self.exits[worker])
            return
        self._write(f"worker-{worker}", text)
        if worker == self.echo_worker:  # one worker on the console shows progress without a flood
            self.echo(line)

    def _write(self, stem: str, text: str) -> None:
        if stem not in self._files:
            self._files[stem] = LazyLog(self.directory / f"{stem}.log", self.header)
        self._files[stem].write(text)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def classify(exits: dict, hosts: int, signalled=()) -> JobReport:
    """Success needs an exit marker of 0 from every worker; gcloud's own exit status is not trusted."""
    failed = {w: c for w, c in sorted(exits.items()) if c != 0}
    if signalled:  # the trainer checkpoints and exits 0 on SIGTERM: that is a preemption, not the end
        return JobReport(Outcome.WORKERS_LOST, exits, f"workers {sorted(signalled)} got SIGTERM (the VM was "
                         "preempted or shut down)")
    if any(code == EXIT_USER_ERROR for code in failed.values()):
        return JobReport(Outcome.REJECTED, exits, f"the job exited with code 2 (bad input) on workers {failed}")
    if failed:
        return JobReport(Outcome.FAILED, exits, f"the job failed on workers {failed}")
    if len(exits) < hosts:
        return JobReport(Outcome.WORKERS_LOST, exits,
                         f"{hosts - len(exits)} of {hosts} workers never reported an exit code "
                         "(preempted, or their ssh session died)")
    return JobReport(Outcome.SUCCEEDED, exits, f"all {hosts} workers exited 0")


@dataclass
class Slice:
    """One queued resource (and the node it creates), driven through the runner."""

    target: SliceTarget
    create_options: CreateOptions
    source: Optional[InstallSource]
    runner: object
    clock: Clock = field(default_factory=Clock)
    poll_s: float = 30.0
    create_timeout_s: float = 3600.0
    log_dir: Path = Path("logs")
    say: Callable[[str], None] = log
    incarnation: int = 0  # bumped each time we create the slice: new VMs need a fresh install
    installed_incarnation: int = -1

    @property
    def name(self) -> str:
        return self.target.name

    # -- state ----------------------------------------------------------------------------------------

    def state(self, *, dry_run_assumes: Optional[str] = None) -> Optional[str]:
        """Queued-resource state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or None if it does not exist."""
        assumed = Result(0, dry_run_assumes + "\n") if dry_run_assumes else Result(1, "", "NOT_FOUND (dry run)")
        result = self.runner.run(gcloud.qr_describe(self.target), dry_run_result=assumed)
        if result.ok:
            return result.stdout.strip() or None
        if is_not_found(result):
            return None
        raise SliceUnavailable(f"cannot read the state of slice {self.name}: {last_line(result.stderr)}")

    def health_problem(self) -> Optional[str]:
        """None when the queued resource is ACTIVE and its node READY/healthy, else what is wrong."""
        state = self.state(dry_run_assumes="ACTIVE")
        if state != "ACTIVE":
            return f"the queued resource is {state or 'gone'}"
        result = self.runner.run(gcloud.node_describe(self.target), dry_run_result=Result(0, "READY\tHEALTHY\n"))
        if not result.ok:
            return f"the node cannot be described: {last_line(result.stderr)}"
        fields = result.stdout.split()
        node = (fields[0] if fields else "", fields[1] if len(fields) > 1 else "")
        return None if node in HEALTHY_NODE else f"the node is {'/'.join(f for f in node if f)}"

    # -- lifecycle ------------------------------------------------------------------------------------

    def ensure_active(self, *, recreate: bool = False) -> None:
        """Create the slice if it is missing, recreate it if broken, wait until ACTIVE.

        ``recreate`` replaces an ACTIVE slice whose node is unusable. A request still waiting in the queue
        is never replaced: that would only lose its place.
        """
        state = self.state()
        if state == "DELETING":
            self.wait_gone()
            state = None
        elif state in BROKEN_STATES or (recreate and state == "ACTIVE"):
            self.say(f"slice {self.name} is {state}{'' if state in BROKEN_STATES else ' but unusable'}: "
                     "deleting it to create it again")
            self.delete()
            state = None
        if state is None:
            self.create()
        self.wait_active()

    def create(self) -> None:
        spec = self.target.spec
        self.say(f"creating {spec.accelerator_type} ({spec.chips} chips, {spec.hosts} hosts) as {self.name} "
                 f"in {self.target.zone} [{self.create_options.provisioning}]")
        result = self.runner.run(gcloud.qr_create(self.target, self.create_options))
        if not result.ok:
            raise SliceUnavailable(f"creating slice {self.name} failed: {last_line(result.stderr)}")
        self.incarnation += 1

    def wait_active(self) -> None:
        deadline = self.clock.now() + self.create_timeout_s
        while True:
            state = self.state(dry_run_assumes="ACTIVE")
            if state == "ACTIVE":
                self.say(f"slice {self.name} is ACTIVE")
                return
            if state is None or state in BROKEN_STATES:
                raise SliceUnavailable(f"slice {self.name} became {state or 'missing'} while waiting for ACTIVE")
            if self.clock.now() >= deadline:
                raise SliceUnavailable(f"slice {self.name} is not ACTIVE after {self.create_timeout_s:.0f} s "
                                       f"(still {state})")
            self.say(f"slice {self.name} is {state}; checking again in {self.poll_s:.0f} s")
            self.clock.sleep(self.poll_s)

    def delete(self) -> None:
        result = self.runner.run(gcloud.qr_delete(self.target))
        if not result.ok and not is_not_found(result):
            raise SliceUnavailable(f"deleting slice {self.name} failed: {last_line(result.stderr)}")
        self.wait_gone()

    def wait_gone(self) -> None:
        deadline = self.clock.now() + self.create_timeout_s
        while (state := self.state()) is not None:
            if self.clock.now() >= deadline:
                raise SliceUnavailable(f"slice {self.name} still exists ({state}) {self.create_timeout_s:.0f} s "
                                       "after deleting it")
            self.clock.sleep(self.poll_s)
        self.say(f"slice {self.name} is deleted")

    # -- software and jobs ----------------------------------------------------------------------------

    def ensure_installed(self) -> None:
        if self.source is not None and self.installed_incarnation != self.incarnation:
            self.install()
            self.installed_incarnation = self.incarnation

    def install(self) -> None:
        source = self.source
        self.say(f"installing the project on all {self.target.spec.hosts} workers of {self.name}")
        if source.wheel is not None:
            self._must(gcloud.ssh_all(self.target, gcloud.prepare_files_script()), "preparing ~/lmu_jax_files")
            self._must(gcloud.scp_files(self.target, [source.wheel, *source.copies]), "copying files")
        install_log = LazyLog(self.log_dir / self.name / "install.log",
                              f"===== install {time.strftime('%Y-%m-%d %H:%M:%S')} =====")
        try:
            self._must(gcloud.ssh_all(self.target, gcloud.install_script(source)), "installing",
                       on_line=install_log.write)
        finally:
            install_log.close()

    def _must(self, argv: list[str], what: str, on_line=None) -> None:
        result = self.runner.run(argv, on_line=on_line)
        if not result.ok:
            detail = f"see {self.log_dir / self.name / 'install.log'}" if on_line else last_line(result.stderr)
            raise SliceUnavailable(f"{what} on {self.name} failed (exit {result.returncode}): {detail}")

    def run_job(self, command: list[str], env: JobEnv, *, log_subdir: str = "", attempt: int = 1) -> JobReport:
        """Run ``command`` on every worker at once; per-worker logs under logs/<slice>/[<log_subdir>/]."""
        hosts = self.target.spec.hosts
        straggler_timer: list[threading.Timer] = []

        def on_exit(worker: str, code: int) -> None:
            if code != 0 and not straggler_timer:  # the others should follow soon; never wait forever
                self.say(f"worker {worker} exited with {code}; the others get {STRAGGLER_GRACE_S} s to finish")
                timer = threading.Timer(STRAGGLER_GRACE_S, self.runner.terminate)
                timer.daemon = True
                timer.start()
                straggler_timer.append(timer)

        directory = self.log_dir / self.name / log_subdir if log_subdir else self.log_dir / self.name
        header = f"===== attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)} ====="
        logs = WorkerLogs(directory, header, on_exit)
        everyone_ok = "\n".join(f"[worker-{i}] {gcloud.EXIT_MARKER}0" for i in range(hosts))
        self.say(f"running on all {hosts} workers of {self.name}: {' '.join(command)} (logs: {directory}/)")
        try:
            self.runner.run(gcloud.ssh_all(self.target, gcloud.job_script(command, self.source, env)),
                            on_line=logs.feed, dry_run_result=Result(0, everyone_ok))
        finally:
            logs.close()
            for timer in straggler_timer:
                timer.cancel()
        return classify(logs.exits, hosts, logs.signalled)

    def recovery_commands(self, command: list[str], env: JobEnv) -> list[list[str]]:
        """What the babysitter runs after a preemption (for the dry-run listing)."""
        argv = [gcloud.qr_describe(self.target), gcloud.node_describe(self.target),
                gcloud.qr_delete(self.target), gcloud.qr_describe(self.target),
                gcloud.qr_create(self.target, self.create_options), gcloud.qr_describe(self.target)]
        if self.source is not None:
            argv.append(gcloud.ssh_all(self.target, gcloud.install_script(self.source)))
        argv.append(gcloud.ssh_all(self.target, gcloud.job_script(command, self.source, env)))
        return argv


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5  # retries after the first attempt
    backoff_s: float = 60.0
    backoff_max_s: float = 1800.0

    def delay(self, failures: int) -> float:
        """Exponential backoff: backoff, 2x, 4x, ... capped."""
        return min(self.backoff_s * 2 ** (failures - 1), self.backoff_max_s)


@dataclass
class Babysitter:
    slice: Slice
    policy: RetryPolicy
    clock: Clock = field(default_factory=Clock)
    say: Callable[[str], None] = log

    def run(self, command: list[str], env: JobEnv, *, log_subdir: str = "",
            stop: Optional[threading.Event] = None) -> int:
        """Run ``command`` until every worker exits 0; returns the number of attempts it took.

        Raises JobRejected (exit code 2: retrying cannot help), GiveUp (more than max_retries failures)
        or Cancelled (``stop`` was set, e.g. the sweep lease was lost).
        """
        failures, recreate, lost_on_healthy_slice = 0, False, 0
        while True:
            attempt = failures + 1
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped before attempt {attempt} on {self.slice.name}")
            report = None
            try:
                self.slice.ensure_active(recreate=recreate)
                self.slice.ensure_installed()
                report = self.slice.run_job(command, env, log_subdir=log_subdir, attempt=attempt)
                reason = report.detail
            except SliceUnavailable as err:
                reason = str(err)
            if stop is not None and stop.is_set():
                raise Cancelled(f"stopped during attempt {attempt} on {self.slice.name}")
            if report is not None and report.outcome is Outcome.REJECTED:
                raise JobRejected(f"not retrying on {self.slice.name}: {reason}")
            problem = self._health_problem()  # after every attempt, the successful ones too
            if report is not None and report.outcome is Outcome.SUCCEEDED:
                if problem is None:
                    self.say(f"done on {self.slice.name} after {attempt} attempt(s): {reason}")
                    return attempt
                # Exit codes of 0 from a slice that is going away: a preemption the trainer answered with a
                # checkpoint. Relaunching is safe: a finished run is left alone.
                reason = f"{reason}, but {problem} right after"
            failures += 1
            if failures > self.policy.max_retries:
                raise GiveUp(f"giving up on {self.slice.name} after {failures} failed attempts "
                             f"(--max-retries={self.policy.max_retries}); last failure: {reason}")
            if problem is not None:
                recreate, lost_on_healthy_slice = True, 0
            elif report is not None and report.outcome is Outcome.WORKERS_LOST:
                # A slice that says it is healthy but loses workers twice in a row is treated as broken.
                lost_on_healthy_slice += 1
                recreate = lost_on_healthy_slice >= 2
            else:
                recreate = False
            delay = self.policy.delay(failures)
            plan = "recreating the slice" if recreate else "relaunching on the same slice"
            self.say(f"attempt {attempt} on {self.slice.name} failed: {reason}"
                     f"{f'; {problem}' if problem and problem not in reason else ''}. "
                     f"Retry {failures}/{self.policy.max_retries}: {plan} in {delay:.0f} s")
            self.clock.sleep(delay)

    def _health_problem(self) -> Optional[str]:
        try:
            return self.slice.health_problem()
        except SliceUnavailable as err:
            return str(err)
