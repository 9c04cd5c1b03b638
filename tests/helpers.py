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


def subprocess_env(devices: int = 8, **extra) -> dict:
    """The environment of a test's `python -m lmu_jax...` subprocess: this session's XLA flags (see
    conftest.py) with `devices` fake CPU devices, the CPU platform, this checkout first on the path;
    `extra` variables on top."""
    from lmu_jax.launch_local import with_cpu_device_count

    env = dict(os.environ, XLA_FLAGS=with_cpu_device_count(os.environ.get("XLA_FLAGS", ""), devices),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli_subprocess(args: list[str], *, devices: int = 8, timeout: float = 300, **popen):
    """Run `python -m lmu_jax.cli ARGS` in a fresh process with `devices` fake CPU devices."""
    return subprocess.run([sys.executable, "-m", "lmu_jax.cli", *args], env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout, **popen)


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
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "carry": {}}
    step = jax.jit(lambda s, b: train_step(s, b, apply_fn=model.apply, optimizer=optimizer, microbatches=1,
                                           seed=0, skip_nonfinite=False))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, windows)
        losses.append(float(metrics["loss"]))
    return losses


# One tiny model per registered family (d_model 64: big enough that only vectors stay whole on an
# fsdp mesh; dropout off so that runs on different process layouts are comparable).
FAMILY_TINY = {
    "transformer": {"d_model": 64, "n_layers": 1, "n_heads": 2},
    "lmu": {"d_model": 64, "n_layers": 1, "order": 8},
    "lmu_attn": {"d_model": 64, "n_layers": 1, "order": 8, "n_heads": 2},
    "lstm": {"d_model": 64, "n_layers": 1},
    "transformer_xl": {"d_model": 64, "n_layers": 1, "n_head": 2, "dropout": 0.0, "mem_len": 16},
    "sch_txl": {"d_model": 64, "n_layers": 1, "n_head": 2, "dropout": 0.0, "mem_len": 16},
    "qrnn_hybrid": {"d_model": 64, "n_layers": 2, "n_head": 2, "dropout": 0.0},
    "multiscale": {"d_model": 64, "n_heads": 2, "n_layers": 3, "scale_layers": [1, 1, 1], "pool_factor": 2},
}


def start_job(commands: list[list[str]], *, devices: int = 4, envs: list[dict] | None = None, **popen):
    """Start ``python -m lmu_jax.cli COMMAND`` once per command as one jax.distributed job on 127.0.0.1
    (the environment lmu_jax.launch_local gives), process i with ``envs[i]`` on top; returns the Popens."""
    from lmu_jax.launch_local import free_port

    port = free_port()
    procs = []
    for index, command in enumerate(commands):
        env = subprocess_env(devices, LMU_JAX_COORDINATOR=f"127.0.0.1:{port}",
                             LMU_JAX_NUM_PROCESSES=len(commands), LMU_JAX_PROCESS_ID=index)
        env.update((envs or [{}] * len(commands))[index])
        procs.append(subprocess.Popen([sys.executable, "-m", "lmu_jax.cli", *command], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen))
    return procs


def finish_job(procs, timeout: float = 300) -> list[tuple[int, str]]:
    """(exit code, output) of every process of ``start_job``; all are killed on a timeout."""
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


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
