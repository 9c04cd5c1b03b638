"""A run is a directory: config.yaml, metrics.jsonl, checkpoints/, eval.json, DONE, and a lock.

- Re-running a command on an existing run directory resumes it; a finished run (DONE) is left alone.
- The directory's config must agree with the new one, except for how it runs (mesh, logging,
  distributed settings), which may change between restarts.
- A lock (pid + host) stops a second launch into the same directory; a lock left by a dead process on
  this host is taken over.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import yaml

from lmu_jax.config import RunConfig, dump_config
from lmu_jax.errors import UserError

RESTARTABLE_SECTIONS = ("mesh", "log", "distributed", "checkpoint")


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
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.done_path = self.path / "DONE"
        self.lock_path = self.path / ".lock"
        self.checkpoints = self.path / "checkpoints"
        self.eval_path = self.path / "eval.json"

    @property
    def done(self) -> bool:
        return self.done_path.exists()

    def check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"--run-dir {self.path} is not writable: {err.strerror or err}")

    def check_or_write_config(self, cfg: RunConfig) -> None:
        """Write config.yaml on a new run; on an existing one, refuse a changed experiment."""
        new = cfg.to_dict()
        if self.config_path.exists():
            old = yaml.safe_load(self.config_path.read_text()) or {}
            old_flat, new_flat = _flatten(old), _flatten(new)
            for key in sorted(set(old_flat) | set(new_flat)):
                if key.split(".")[0] in RESTARTABLE_SECTIONS:
                    continue
                if old_flat.get(key) != new_flat.get(key):
                    raise UserError(f"{key}={new_flat.get(key)!r} differs from {old_flat.get(key)!r} in "
                                    f"{self.config_path}; resume with the same settings or use a new --run-dir")
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, self.config_path)

    def acquire_lock(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(self.lock_path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid", -1)):
                self.lock_path.unlink(missing_ok=True)  # stale: its process is gone
                return self.acquire_lock()
            raise UserError(f"--run-dir {self.path} is in use by pid {holder.get('pid')} on "
                            f"{holder.get('host')}; wait for it, or remove {self.lock_path} if it is dead")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)

    def release_lock(self) -> None:
        self.lock_path.unlink(missing_ok=True)

    def mark_done(self, summary: dict) -> None:
        self.done_path.write_text(json.dumps(summary, indent=1) + "\n")

    def write_eval(self, result: dict) -> None:
        tmp = self.eval_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, self.eval_path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
