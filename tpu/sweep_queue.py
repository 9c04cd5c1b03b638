"""Spread a sweep's runs over several slices: a queue of run ids with one lease per run id.

Every launcher (one per slice, anywhere) walks the same list of run ids. Before running one it takes the
run's lease; while the run goes on a background thread renews the lease; when the run is finished it
writes a ``done`` marker and then releases the lease. A lease whose holder stopped renewing it (the
launcher died) expires after ``ttl_s`` and is taken over. So a run is never run by two launchers at once,
and each run ends up done once. (A launcher that dies after the run finished but before writing ``done``
makes the next holder rerun it; the trainer then finds the finished run directory and leaves it alone.)

The only primitive a store needs is compare-and-set on a versioned record, like a GCS object's
generation: ``write_if(run_id, version, record)`` succeeds only if the current version is still
``version`` (0 = no record yet). Two stores implement it:

- ``GcsLeaseStore``: one object per run id, ``gcloud storage cp --if-generation-match=<generation>``;
- ``LocalLeaseStore``: a directory per run id holding numbered generation files, each created atomically
  (``os.link`` fails if the name exists: the O_CREAT|O_EXCL guarantee, but with the content complete).

Lease times are wall-clock seconds (``time.time()``) compared across machines: keep ``ttl_s`` much
larger than any clock skew between launchers (minutes vs. the sub-second skew of NTP-synced hosts).
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from lmu_jax.errors import bad_value
from tpu.babysit import Cancelled, LaunchError, is_not_found, last_line
from tpu.runner import Clock, Result, log

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")  # run ids become file and object names


class LeaseStoreError(LaunchError):
    pass


def check_run_id(run_id: str) -> str:
    if not RUN_ID.fullmatch(run_id):
        raise bad_value("run id", run_id, "run ids may only use letters, digits and . _ = - "
                        "(they become file and object names)")
    return run_id


# ---- stores --------------------------------------------------------------------------------------

class LocalLeaseStore:
    """Leases under ``<root>/leases/<run_id>/<generation>.json``; done markers ``<root>/done/<run_id>.json``."""

    def __init__(self, root):
        self.root = Path(root)

    def _lease_dir(self, run_id: str) -> Path:
        return self.root / "leases" / run_id

    def _generations(self, run_id: str) -> list[int]:
        try:
            return [int(p.stem) for p in self._lease_dir(run_id).glob("*.json")]
        except FileNotFoundError:
            return []

    def read(self, run_id: str) -> tuple[int, Optional[dict]]:
        for _ in range(10):
            generations = self._generations(run_id)
            if not generations:
                return 0, None
            top = max(generations)
            try:
                return top, json.loads((self._lease_dir(run_id) / f"{top:012d}.json").read_text())
            except FileNotFoundError:  # pruned between listing and reading: look again
                continue
        raise LeaseStoreError(f"could not read the lease of {run_id} under {self.root}")

    def _create_exclusive(self, path: Path, record: dict) -> bool:
        """Publish ``record`` at ``path`` only if nothing is there yet, in one atomic step."""
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.parent / f".tmp-{uuid.uuid4().hex}"
        scratch.write_text(json.dumps(record, sort_keys=True))
        try:
            os.link(scratch, path)
            return True
        except FileExistsError:
            return False
        finally:
            scratch.unlink()

    def write_if(self, run_id: str, version: int, record: dict) -> Optional[int]:
        new = version + 1
        if not self._create_exclusive(self._lease_dir(run_id) / f"{new:012d}.json", record):
            return None
        generations = self._generations(run_id)
        # A writer that read long ago may have re-created an already pruned number: ours must be the newest.
        if max(generations) != new:
            return None
        for old in generations:  # keep the previous generation for debugging, prune the rest
            if old < version:
                (self._lease_dir(run_id) / f"{old:012d}.json").unlink(missing_ok=True)
        return new

    def done_ids(self) -> set[str]:
        return {p.stem for p in (self.root / "done").glob("*.json")}

    def mark_done(self, run_id: str, record: dict) -> bool:
        return self._create_exclusive(self.root / "done" / f"{run_id}.json", record)


class MemoryLeaseStore:
    """The same contract in memory: for dry runs (which must not touch the lease directory)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[int, dict]] = {}
        self._done: dict[str, dict] = {}

    def read(self, run_id):
        with self._lock:
            return self._leases.get(run_id, (0, None))

    def write_if(self, run_id, version, record):
        with self._lock:
            if self._leases.get(run_id, (0, None))[0] != version:
                return None
            self._leases[run_id] = (version + 1, dict(record))
            return version + 1

    def done_ids(self):
        with self._lock:
            return set(self._done)

    def mark_done(self, run_id, record):
        with self._lock:
            if run_id in self._done:
                return False
            self._done[run_id] = dict(record)
            return True


def _precondition_failed(result: Result) -> bool:
    text = (result.stderr + result.stdout).lower()
    return "412" in text or "precondition" in text


class GcsLeaseStore:
    """Leases as GCS objects ``<root>/leases/<run_id>.json``, versioned by object generation."""

    def __init__(self, root: str, runner):
        self.root, self.runner = root.rstrip("/"), runner
        self._marked_done: set[str] = set()  # what we wrote ourselves (a dry run lists nothing back)

    def _lease_url(self, run_id: str) -> str:
        return f"{self.root}/leases/{run_id}.json"

    def read(self, run_id: str, *, dry_run_record: Optional[dict] = None) -> tuple[int, Optional[dict]]:
        url = self._lease_url(run_id)
        for _ in range(5):
            described = self.runner.run(
                ["gcloud", "storage", "objects", "describe", url, "--format=value(generation)"],
                dry_run_result=Result(0, "1\n") if dry_run_record else Result(1, "", "404 (dry run)"))
            if not described.ok:
                if is_not_found(described):
                    return 0, None
                raise LeaseStoreError(f"reading {url} failed: {last_line(described.stderr)}")
            generation = int(described.stdout.strip())
            # Read exactly that generation, so the content and the version we compare against match.
            content = self.runner.run(["gcloud", "storage", "cat", f"{url}#{generation}"],
                                      dry_run_result=Result(0, json.dumps(dry_run_record or {})))
            if content.ok:
                return generation, json.loads(content.stdout)
            if not is_not_found(content):  # not found = replaced between the two calls: look again
                raise LeaseStoreError(f"reading {url}#{generation} failed: {last_line(content.stderr)}")
        raise LeaseStoreError(f"{url} keeps changing while being read")

    def write_if(self, run_id: str, version: int, record: dict) -> Optional[int]:
        url = self._lease_url(run_id)
        written = self.runner.run(["gcloud", "storage", "cp", "-", url, f"--if-generation-match={version}"],
                                  input_text=json.dumps(record, sort_keys=True))
        if not written.ok:
            if _precondition_failed(written):
                return None
            raise LeaseStoreError(f"writing {url} failed: {last_line(written.stderr)}")
        # cp does not report the new generation: read it back, and check by nonce that it is our write.
        generation, current = self.read(run_id, dry_run_record=record)
        return generation if current and current.get("nonce") == record["nonce"] else None

    def done_ids(self) -> set[str]:
        listed = self.runner.run(["gcloud", "storage", "ls", f"{self.root}/done/"])
        if not listed.ok:
            if is_not_found(listed) or "matched no objects" in listed.stderr.lower():
                return set(self._marked_done)
            raise LeaseStoreError(f"listing {self.root}/done/ failed: {last_line(listed.stderr)}")
        listed_ids = {Path(url.strip()).name.removesuffix(".json") for url in listed.stdout.splitlines() if url.strip()}
        return listed_ids | self._marked_done

    def mark_done(self, run_id: str, record: dict) -> bool:
        url = f"{self.root}/done/{run_id}.json"
        written = self.runner.run(["gcloud", "storage", "cp", "-", url, "--if-generation-match=0"],
                                  input_text=json.dumps(record, sort_keys=True))
        if written.ok or _precondition_failed(written):
            self._marked_done.add(run_id)
            return written.ok
        raise LeaseStoreError(f"writing {url} failed: {last_line(written.stderr)}")


def open_store(location: str, runner):
    """``gs://bucket/prefix`` -> GcsLeaseStore; a local directory -> LocalLeaseStore (memory in a dry run)."""
    if location.startswith("gs://"):
        return GcsLeaseStore(location, runner)
    return MemoryLeaseStore() if runner.dry_run else LocalLeaseStore(location)


# ---- leases --------------------------------------------------------------------------------------

@dataclass
class Lease:
    run_id: str
    version: int
    expires_at: float


class Leases:
    """Acquire, renew and release run leases in a store, as ``holder``."""

    def __init__(self, store, holder: str, ttl_s: float, clock: Clock = None, say: Callable[[str], None] = log):
        self.store, self.holder, self.ttl_s = store, holder, ttl_s
        self.clock, self.say = clock or Clock(), say

    def _record(self, run_id: str, state: str, expires_at: float) -> dict:
        return {"run_id": run_id, "holder": self.holder, "state": state, "expires_at": expires_at,
                "written_at": self.clock.now(), "nonce": uuid.uuid4().hex}

    def try_acquire(self, run_id: str) -> Optional[Lease]:
        version, record = self.store.read(run_id)
        now = self.clock.now()
        if record is not None and record.get("state") == "held":
            if record["expires_at"] > now:
                return None  # someone is running it
            self.say(f"the lease on {run_id} held by {record['holder']} expired {now - record['expires_at']:.0f} s "
                     "ago: taking it over")
        expires_at = now + self.ttl_s
        new_version = self.store.write_if(run_id, version, self._record(run_id, "held", expires_at))
        return None if new_version is None else Lease(run_id, new_version, expires_at)

    def renew(self, lease: Lease) -> bool:
        """Extend the lease; False if someone else wrote it since (it is no longer ours)."""
        expires_at = self.clock.now() + self.ttl_s
        new_version = self.store.write_if(lease.run_id, lease.version, self._record(lease.run_id, "held", expires_at))
        if new_version is None:
            return False
        lease.version, lease.expires_at = new_version, expires_at
        return True

    def release(self, lease: Lease) -> None:
        released = self.store.write_if(lease.run_id, lease.version,
                                       self._record(lease.run_id, "released", self.clock.now()))
        if released is None:
            self.say(f"the lease on {lease.run_id} was no longer ours when releasing it")


class LeaseKeeper:
    """Renews a lease every ``interval_s`` in a background thread; calls ``on_lost`` once if it cannot.

    A renewal that fails for a transient reason (network) is retried at the next tick; the lease counts as
    lost when someone else wrote it, or when it expired before a renewal got through.
    """

    def __init__(self, leases: Leases, lease: Lease, interval_s: float, on_lost: Callable[[], None]):
        self.leases, self.lease, self.interval_s, self.on_lost = leases, lease, interval_s, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{lease.run_id}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                renewed = self.leases.renew(self.lease)
            except LaunchError as err:
                self.leases.say(f"renewing the lease on {self.lease.run_id} failed ({err}); trying again")
                renewed = self.leases.clock.now() < self.lease.expires_at
            if not renewed:
                self.leases.say(f"lost the lease on {self.lease.run_id}: stopping its run")
                self.on_lost()
                return


# ---- the queue -----------------------------------------------------------------------------------

class SweepQueue:
    """Runs the sweep's run ids that nobody else holds, one at a time, until all are done."""

    def __init__(self, leases: Leases, run_one: Callable[[str, threading.Event], None], *, poll_s: float = 60.0,
                 renew_s: Optional[float] = None, on_lost: Callable[[], None] = lambda: None):
        self.leases, self.run_one, self.poll_s = leases, run_one, poll_s
        self.renew_s = renew_s if renew_s is not None else leases.ttl_s / 3
        self.on_lost = on_lost

    def run(self, run_ids: list[str]) -> list[str]:
        """Returns the run ids this launcher finished. Errors from ``run_one`` (give up) propagate,
        after the lease is released so another launcher can try."""
        store, say = self.leases.store, self.leases.say
        finished = []
        while True:
            done = store.done_ids()
            pending = [run_id for run_id in run_ids if run_id not in done]
            if not pending:
                say(f"all {len(run_ids)} runs are done ({len(finished)} of them here)")
                return finished
            lease = next((lease for run_id in pending if (lease := self.leases.try_acquire(run_id))), None)
            if lease is None:
                say(f"{len(pending)} runs left, all held by other launchers; looking again in {self.poll_s:.0f} s")
                self.leases.clock.sleep(self.poll_s)
                continue
            if self._run_leased(lease):
                finished.append(lease.run_id)

    def _run_leased(self, lease: Lease) -> bool:
        store, say, run_id = self.leases.store, self.leases.say, lease.run_id
        lost = threading.Event()

        def lose() -> None:
            lost.set()
            self.on_lost()

        try:
            if run_id in store.done_ids():  # finished by someone between our listing and our lease
                return False
            say(f"running {run_id} (lease held by {self.leases.holder})")
            try:
                with LeaseKeeper(self.leases, lease, self.renew_s, lose):
                    self.run_one(run_id, lost)
            except Cancelled:
                if not lost.is_set():
                    raise
                say(f"{run_id} was stopped because its lease was lost; it stays with its new holder")
                return False
            # `done` first, then the release: nobody can take a finished run in between.
            if not store.mark_done(run_id, {"run_id": run_id, "holder": self.leases.holder,
                                            "finished_at": self.leases.clock.now()}):
                say(f"{run_id} was already marked done by another launcher")
            say(f"{run_id} is done")
            return True
        finally:
            if not lost.is_set():
                self.leases.release(lease)
