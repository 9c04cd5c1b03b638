"""Run metrics: JSONL (canonical), optional TensorBoard, throughput and MFU.

``metrics.jsonl`` holds one JSON object per line with a ``kind``: ``train`` (per step), ``eval``, or
``settings`` (at each start: the platform and the values the trainer chose for ``auto`` settings).
Only process 0 writes. On resume the file is cut back to the restored step (and loses the ``final``
eval line, which a run killed before DONE writes again), so after any number of restarts each step
appears exactly once.

In a run directory on an object store (no appends there) the lines go to a local staging copy, which
``sync`` uploads whole: the trainer calls it with every checkpoint, and ``write`` at most every
``REMOTE_SYNC_S`` seconds, so the remote file is never behind the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lmu_jax import storage

# A training loss this far (nats) above the curve's level, the median of the previous LEVEL_WINDOW steps'
# losses, is an excursion (lmu_jax/report/stability.py says which are spikes); the trainer logs every
# such step, whatever log.every says, and each logged step's level.
SPIKE_NATS = 1.0
LEVEL_WINDOW = 20

REMOTE_SYNC_S = 30.0

# bf16 dense peak FLOP/s per JAX device, keyed by a substring of device.device_kind (Levanter's table).
PEAK_FLOPS = {
    "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10G": 125e12,
}


def cpu_matmul_ceiling(size: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this CPU through JAX (the MFU denominator on CPU), cached."""
    cache = Path(os.path.expanduser("~/.cache/lmu_jax/cpu_matmul_ceiling.json"))
    try:
        return float(json.loads(cache.read_text())["flops_per_s"])
    except (OSError, ValueError, KeyError):
        pass
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    flops = 2.0 * size**3 / best
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"flops_per_s": flops, "size": size}))
    except OSError:
        pass
    return flops


def peak_flops_total(devices=None) -> tuple[float, str]:
    """Peak FLOP/s of all devices of the run, and where the number comes from."""
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":  # fake CPU devices share the same cores: one machine ceiling
        return cpu_matmul_ceiling(), "measured CPU matmul ceiling"
    for key, flops in PEAK_FLOPS.items():
        if key.lower() in kind.lower():
            return flops * len(devices), f"peak table: {key}"
    return float("nan"), f"unknown device kind {kind!r}"


class MetricsWriter:
    """Appends JSON lines (and TensorBoard scalars) on process 0; a no-op elsewhere."""

    def __init__(self, run_dir, *, resume_step: int, tensorboard: bool):
        self.active = jax.process_index() == 0
        run_dir = storage.path(run_dir, "--run-dir")
        self.path = run_dir / "metrics.jsonl"
        self.remote = storage.is_remote(run_dir)
        self._tb = None
        if not self.active:
            return
        kept = self._kept_lines(resume_step)
        # appended to locally: the file itself, or the staging copy of a remote one
        self._local = _staging_file() if self.remote else self.path
        storage.write_text(self._local, kept)
        if self.remote:
            self.sync()
        self._file = open(self._local, "a")
        self._synced = time.monotonic()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def _kept_lines(self, step: int) -> str:
        """The lines logged up to the checkpoint we resume from (later ones will be logged again)."""
        if not self.path.exists():
            return ""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a kill mid-write
                continue
            if record.get("step", 0) <= step and not record.get("final"):  # the final eval is redone
                kept.append(line)
        return "".join(line + "\n" for line in kept)

    def sync(self) -> None:
        """Upload the staging copy to a remote run directory (a no-op for a local one)."""
        if self.active and self.remote:
            storage.write_bytes(self.path, self._local.read_bytes())
            self._synced = time.monotonic()

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.remote and time.monotonic() - self._synced > REMOTE_SYNC_S:
            self.sync()
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self.remote:
                self.sync()
                self._local.unlink(missing_ok=True)
            if self._tb is not None:
                self._tb.close()


def _staging_file() -> Path:
    fd, name = tempfile.mkstemp(prefix="lmu_jax-metrics-", suffix=".jsonl")
    os.close(fd)
    return Path(name)


def read_metrics(run_dir, kind: str | None = None) -> list[dict]:
    path = storage.path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
