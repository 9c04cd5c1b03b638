"""Run metrics: JSONL (canonical), optional TensorBoard, throughput and MFU.

``metrics.jsonl`` holds one JSON object per line with a ``kind``: ``train`` (per step) or ``eval``.
Only process 0 writes. On resume the file is cut back to the restored step (and loses the ``final``
eval line, which a run killed before DONE writes again), so after any number of restarts each step
appears exactly once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

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

    def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool):
        self.active = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not self.active:
            return
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                pass

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a kill mid-write
                continue
            if record.get("step", 0) <= step and not record.get("final"):  # the final eval is redone
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(run_dir, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
