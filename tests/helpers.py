"""Shared test helpers: tiny configs, running the CLI in-process or as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(cache_dir, **sections) -> dict:
    """A small transformer on the first 300 kB of the KJV Bible: trains in seconds on CPU."""
    cfg = {
        "model": {"family": "transformer", "d_model": 32, "n_layers": 1, "n_heads": 2},
        "data": {"corpus": "kjv", "seq_len": 32, "cache_dir": str(cache_dir), "val_windows": 16,
                 "max_bytes": 300_000},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"steps": 12, "batch_size": 8, "eval_every": 0},
        "checkpoint": {"every": 4, "keep": 2},
        "log": {"tensorboard": False, "progress": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path, cfg: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_subprocess(args: list[str], *, devices: int = 8, timeout: float = 300, **popen):
    """Run `python -m lmu_jax.cli ARGS` in a fresh process with `devices` fake CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "lmu_jax.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def train_losses(run_dir) -> list[tuple[int, float]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def repeated_batch_losses(model, params, windows, *, lr: float, steps: int) -> list[float]:
    """Losses of `steps` AdamW steps through the trainer's own train_step, on one batch of windows."""
    import jax
    import jax.numpy as jnp

    from lmu_jax.config import OptimConfig
    from lmu_jax.train.optim import make_optimizer
    from lmu_jax.train.step import train_step

    optimizer = make_optimizer(OptimConfig(lr=lr, warmup_steps=0), steps=10)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
    step = jax.jit(lambda s, b: train_step(s, b, apply_fn=model.apply, optimizer=optimizer, microbatches=1,
                                           seed=0, skip_nonfinite=False))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, windows)
        losses.append(float(metrics["loss"]))
    return losses


@contextlib.contextmanager
def persistent_compile_cache(directory):
    """JAX's persistent compilation cache in ``directory`` for the duration (every program cached). A
    cached executable is the same binary as a fresh compile, so bitwise comparisons are unaffected."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings = {"jax_compilation_cache_dir": str(directory), "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    before = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # re-decide "cache in use" with the new settings
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
