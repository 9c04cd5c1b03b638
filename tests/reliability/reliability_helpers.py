"""Helpers of the fault-injection tests: subprocess launches, reading run directories back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np


class Launch:
    """`lmu-jax ARGS` in a subprocess; output goes to files, so a killed process never blocks a pipe.

    Each launch is a process group of its own: ``kill_group`` takes its children too, and whatever a
    test leaves running (it failed half-way) is killed after it (``stop_all``, from conftest)."""

    running: list["Launch"] = []

    def __init__(self, args: list[str], env: dict, logs: Path, module: str = "lmu_jax.cli"):
        logs.mkdir(parents=True, exist_ok=True)
        count = len(list(logs.glob("*.out")))
        self.out_path, self.err_path = logs / f"{count}.out", logs / f"{count}.err"
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=logs,
                                     stdout=self.out_path.open("w"), stderr=self.err_path.open("w"),
                                     start_new_session=True)
        Launch.running.append(self)

    @classmethod
    def stop_all(cls) -> None:
        for launch in cls.running:
            try:
                os.killpg(launch.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            launch.proc.wait(timeout=60)
        cls.running.clear()

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_until(self, condition, what: str, timeout: float = 300, poll: float = 0.02):
        """Poll ``condition()`` until it returns something truthy (returned); fail if the process ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"process ended ({self.proc.returncode}) before {what}:\n{self.out}\n{self.err}")
            time.sleep(poll)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.out}\n{self.err}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=120)

    def kill_group(self) -> None:
        """SIGKILL the whole process group (a job whose machine or scheduler killed everything)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=120)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not finish in {timeout} s:\n{self.out}\n{self.err}")


def train_records(run_dir, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return [r for r in records if r.get("kind") == kind]


def last_logged_step(run_dir) -> int:
    records = train_records(run_dir)
    return records[-1]["step"] if records else 0


def checkpoint_steps(run_dir) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def assert_each_step_once(run_dir, steps: int) -> None:
    """metrics.jsonl after any number of restarts: train steps 1..steps once each, evals at most once."""
    logged = [r["step"] for r in train_records(run_dir)]
    assert logged == list(range(1, steps + 1)), logged
    evals = [(r["step"], bool(r.get("final"))) for r in train_records(run_dir, "eval")]
    assert len(evals) == len(set(evals)), evals


def state_leaves(run_dir, cfg, step: int | None = None, devices=None):
    """The leaves of the newest good checkpoint (or of ``step``), restored in this process."""
    from lmu_jax.train.checkpoint import Checkpointer
    from lmu_jax.train.loop import Trainer

    trainer = Trainer(cfg, run_dir, devices=devices)
    ckpt = Checkpointer(trainer.run.checkpoints.absolute(), cfg.checkpoint)
    try:
        if step is None:
            state, _ = ckpt.restore_latest(trainer.program.abstract_state)
        else:
            state, _ = ckpt._restore(step, trainer.program.abstract_state)
    finally:
        ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def assert_same_leaves(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def stop_after(monkeypatch, step: int) -> None:
    """In-process stand-in for SIGTERM: the trainer checkpoints and stops after ``step``."""
    from lmu_jax.train import loop

    class AtStep(loop.Preemption):
        def __call__(self, current: int) -> bool:
            return current == step

    monkeypatch.setattr(loop, "Preemption", AtStep)


def biggest_data_file(step_dir) -> Path:
    """The largest array-data file of a checkpoint (OCDBT keeps array chunks under .../d/)."""
    files = [p for p in Path(step_dir).rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)
