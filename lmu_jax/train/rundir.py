"""A run is a directory: config.yaml, metrics.jsonl, checkpoints/, eval.json, DONE, and a lock.

- Re-running a command on an existing run directory resumes it; a finished run (DONE) is left alone.
- The directory's config must agree with the new one, except for how it runs (mesh, logging,
  distributed settings), which may change between restarts.
- A lock stops a second launch into the same directory: an exclusive ``flock`` on ``.lock``, which the
  kernel drops when its process ends, however it ends (SIGKILL, OOM, power loss on NFS after the lease),
  so a dead run never leaves a stale lock behind, and a restarted container with a new hostname or a
  recycled pid is not mistaken for the holder. The file names the holder (pid, host) for the message.
  Where the filesystem has no flock, a pid file is used instead; one left by a dead process on this
  host is taken over.
- On an object store (``gs://``, see ``lmu_jax.storage``) there is no flock: the lock is a **lease**,
  a ``.lock`` object made by exclusive create and rewritten by its holder every ``LEASE_TTL_S / 3``
  seconds. A launch that finds one waits up to ``LEASE_TTL_S`` for it to change: a lease that is not
  renewed in that time belongs to a dead launch (a preempted slice) and is taken over; one left by a
  dead pid on this very host is taken over at once. No clocks are compared between hosts.
- A launch that fails before training removes the directory if it made it (``open`` / ``remove``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid

import yaml

from lmu_jax import storage
from lmu_jax.config import RunConfig, dump_config
from lmu_jax.errors import UserError

RESTARTABLE_SECTIONS = ("mesh", "log", "distributed", "checkpoint")
LEASE_TTL_S = 60.0  # seconds an object-store run lock lives without renewal


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class RunDir:
    def __init__(self, path):
        self.path = storage.path(path, "--run-dir")
        self.config_path = self.path / "config.yaml"
        self.done_path = self.path / "DONE"
        self.lock_path = self.path / ".lock"
        self.checkpoints = self.path / "checkpoints"
        self.eval_path = self.path / "eval.json"
        self._lock_fd = None  # the open, flock-ed .lock (-1: the pid-file fallback or a lease)
        self._lease = None  # the renewing lease on an object store

    @property
    def done(self) -> bool:
        return self.done_path.exists()

    def check_writable(self) -> None:
        probe = self.path / ".write_probe"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
        except OSError as err:
            raise UserError(f"--run-dir {self.path} is not writable: {err.strerror or err}")
        finally:
            with contextlib.suppress(OSError):  # e.g. a full disk left an empty probe behind
                probe.unlink(missing_ok=True)

    def check_or_write_config(self, cfg: RunConfig) -> None:
        """Write config.yaml on a new run; on an existing one, refuse a changed experiment."""
        self.check_config(cfg)
        self._write_config(cfg)

    def with_earlier_choices(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with each ``auto`` speed setting (train.microbatches, model.remat, model.hoist_inputs) that
        this run already made concrete taken from its config.yaml: a resumed run keeps its choice, whatever
        auto would pick now, and a run written before a setting became auto resumes with the value it
        trained with."""
        try:
            old = yaml.safe_load(self.config_path.read_text()) if self.config_path.exists() else None
        except (yaml.YAMLError, UnicodeDecodeError):
            return cfg  # check_config says what is wrong with the file
        if not isinstance(old, dict):
            return cfg
        sections = {"train": cfg.train, "model": cfg.model}
        for section, key in (("train", "microbatches"), ("model", "remat"), ("model", "hoist_inputs")):
            chosen = (old.get(section) or {}).get(key)
            if getattr(sections[section], key, None) == "auto" and chosen not in (None, "auto"):
                sections[section] = dataclasses.replace(sections[section], **{key: chosen})
        return cfg.replace(**sections)

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse a config that is another experiment than the one in config.yaml (if there is one)."""
        if not self.config_path.exists():
            return
        new = yaml.safe_load(dump_config(cfg))  # as written: tuples (adaptive_cutoffs, ...) become lists
        try:
            old = yaml.safe_load(self.config_path.read_text()) or {}
            if not isinstance(old, dict):
                raise yaml.YAMLError("not a mapping of sections")
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UserError(f"{self.config_path} is not a valid run config ({str(err).splitlines()[0]}); restore "
                            "it or use a new --run-dir")
        old_flat, new_flat = _flatten(old), _flatten(new)
        for key in sorted(set(old_flat) | set(new_flat)):
            if key.split(".")[0] in RESTARTABLE_SECTIONS:
                continue
            if old_flat.get(key) != new_flat.get(key):
                raise UserError(f"{key}={new_flat.get(key)!r} differs from {old_flat.get(key)!r} in "
                                f"{self.config_path}; resume with the same settings or use a new --run-dir")

    def _write_config(self, cfg: RunConfig) -> None:
        try:
            storage.write_text(self.config_path, dump_config(cfg))
        except OSError as err:
            raise UserError(f"--run-dir {self.path}: cannot write {self.config_path.name} ({err.strerror or err})")

    def open(self, cfg: RunConfig) -> bool:
        """Make or reopen the directory for ``cfg`` and lock it; True when this call created it. On
        failure nothing is left behind: no lock, and no directory if it did not exist before."""
        created = not self.path.exists()
        try:
            self.check_writable()
            self.acquire_lock()
        except BaseException:
            if created:  # a launch racing this one may own it by now: only an empty directory goes
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise
        try:
            self.check_or_write_config(cfg)
        except BaseException:
            if created:
                self.remove()
            self.release_lock()
            raise
        return created

    def remove(self) -> None:
        """Delete the run directory: only ever one this launch created and holds the lock of, before
        anything was trained in it."""
        with contextlib.suppress(OSError):
            self.path.rmtree()

    def check_free_space(self, state_bytes: int, keep: int) -> None:
        """Refuse to start when not even one checkpoint (about the state's size) fits on the disk
        (an object store has no free-space figure: nothing to check)."""
        free = storage.free_bytes(self.path)
        if free is not None and free < state_bytes:
            raise UserError(f"--run-dir {self.path} has {free / 2**20:.1f} MiB free, less than one checkpoint "
                            f"({state_bytes / 2**20:.1f} MiB; checkpoint.keep={keep} needs about "
                            f"{(keep + 1) * state_bytes / 2**20:.1f} MiB); free space or use another --run-dir")

    def acquire_lock(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        if storage.is_remote(self.path):
            self._lease = Lease.acquire(self.lock_path, me, f"--run-dir {self.path}")
            self._lock_fd = -1
            return
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return self._acquire_pid_lock(me)  # this filesystem has no flock
            raise UserError(f"--run-dir {self.path} is in use by pid {holder.get('pid', '?')} on "
                            f"{holder.get('host', '?')} (it holds {self.lock_path}); wait for it to finish "
                            "or stop it, then run the same command again")
        try:
            same_file = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the previous holder removed the file between our open and flock
            os.close(fd)
            return self.acquire_lock()
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        self._lock_fd = fd

    def release_lock(self) -> None:
        """Idempotent. Removing the file while still holding the lock makes a launch that opened it
        meanwhile see a different file and retry, instead of locking an orphan."""
        fd = self._lock_fd
        if fd is None:
            return
        if self._lease is not None:
            self._lease.release()
            self._lease, self._lock_fd = None, None
            return
        self.lock_path.unlink(missing_ok=True)
        if fd >= 0:
            os.close(fd)
        self._lock_fd = None

    def _acquire_pid_lock(self, me: dict) -> None:
        """Fallback without flock: an exclusive-create pid file; one left by a dead pid here is stale."""
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _read_holder(None, self.lock_path)
            if holder.get("host") == me["host"] and not pid_alive(holder.get("pid", -1)):
                self.lock_path.unlink(missing_ok=True)  # stale: its process is gone
                return self._acquire_pid_lock(me)
            raise UserError(f"--run-dir {self.path} is in use by pid {holder.get('pid')} on "
                            f"{holder.get('host')}; wait for it, or remove {self.lock_path} if it is dead")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        self._lock_fd = -1

    def mark_done(self, summary: dict) -> None:
        storage.write_text(self.done_path, json.dumps(summary, indent=1) + "\n")

    def write_eval(self, result: dict) -> None:
        storage.write_text(self.eval_path, json.dumps(result, indent=1) + "\n")


def _read_holder(fd, path=None) -> dict:
    """The {pid, host} written into a lock file ({} if unreadable: e.g. a holder still writing it)."""
    try:
        text = os.pread(fd, 4096, 0).decode() if fd is not None else path.read_text()
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists on this host."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The run lock on an object store: ``{pid, host, token, renewals}`` in one object, made by exclusive
    create and rewritten every ``ttl / 3`` s by a daemon thread of its holder (module docstring)."""

    def __init__(self, path, me: dict, ttl: float):
        self.path, self.ttl = path, ttl
        self.me = dict(me, token=uuid.uuid4().hex, renewals=0)
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def acquire(cls, path, me: dict, what: str, ttl: float | None = None) -> "Lease":
        lease = cls(path, me, LEASE_TTL_S if ttl is None else ttl)
        for _ in range(4):
            if storage.create_exclusive(path, json.dumps(lease.me)) and lease._mine():
                lease._thread = threading.Thread(target=lease._renew, name="run-lease", daemon=True)
                lease._thread.start()
                return lease
            holder = _read_holder(None, path)
            if holder and holder.get("host") == me["host"] and not pid_alive(holder.get("pid")):
                path.unlink(missing_ok=True)  # left by a dead process on this host
                continue
            if holder and lease._renewed(holder):
                raise UserError(f"{what} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                                f"(it renews {path}); wait for it to finish or stop it, then run the same "
                                "command again")
            if holder and _read_holder(None, path).get("token") == holder.get("token"):
                print(f"{what}: taking over {path} from pid {holder.get('pid')} on {holder.get('host')}: "
                      f"not renewed for {lease.ttl:g} s", flush=True)
                path.unlink(missing_ok=True)
        raise UserError(f"{what}: could not take the lock {path}: other launches keep taking it")

    def _mine(self) -> bool:
        return _read_holder(None, self.path).get("token") == self.me["token"]

    def _renewed(self, holder: dict) -> bool:
        """Whether the lease ``holder`` changes (or goes) within one ttl: the holder is alive."""
        deadline = time.monotonic() + self.ttl
        while time.monotonic() < deadline:
            now = _read_holder(None, self.path)
            if not now:
                return False  # released meanwhile: free to take
            if (now.get("token"), now.get("renewals")) != (holder.get("token"), holder.get("renewals")):
                return True
            time.sleep(min(self.ttl / 10, 2.0))
        return False

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._mine():
                    import logging

                    logging.getLogger("lmu_jax").error("lost the run lock %s to another launch", self.path)
                    return
                self.me["renewals"] += 1
                storage.write_text(self.path, json.dumps(self.me))
            except OSError:  # storage hiccup: try again next period; the ttl leaves room for two misses
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(OSError):
            if self._mine():
                self.path.unlink(missing_ok=True)
