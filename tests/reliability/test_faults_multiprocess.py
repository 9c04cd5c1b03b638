"""Two processes over jax.distributed (lmu_jax.launch_local): one is SIGKILLed, the survivor stops by
itself within distributed.timeout_s (no hang) and the launcher says which process failed first and
how; the relaunch resumes from the last checkpoint. Then SIGTERM to the launcher preempts both
processes at the same step (jax's preemption service), and the next launch finishes the run."""

import os
import re
import signal
import time

import jax
import numpy as np
import pytest

from helpers import tiny_config, train_losses, write_config
from lmu_jax.config import config_from_dict
from lmu_jax.train.loop import Trainer
from reliability_helpers import Launch, assert_each_step_once, checkpoint_steps, last_logged_step

TIMEOUT_S = 10
STEPS = 40


def pids(launch) -> dict:
    return {int(i): int(pid) for i, pid in re.findall(r"^\[launch\] process (\d+): pid (\d+)$", launch.out, re.M)}


def resumed_from(launch) -> int:
    found = re.search(r"^\[0\] resuming .* from step (\d+)$", launch.out, re.M)
    return int(found.group(1)) if found else 0


@pytest.mark.slow
def test_a_dead_process_stops_the_other_in_time_and_the_run_resumes(tmp_path, kjv_cache, run_env):
    raw = tiny_config(kjv_cache, train={"steps": STEPS}, mesh={"data": 2},
                      checkpoint={"every": 4, "keep": 2}, distributed={"timeout_s": TIMEOUT_S})
    config, run, logs = write_config(tmp_path / "c.yaml", raw), tmp_path / "run", tmp_path / "logs"
    # the reference: one process with the same global mesh (one device per process keeps steps cheap)
    Trainer(config_from_dict(raw), tmp_path / "one", devices=jax.devices()[:2]).train()
    args = ["--processes", "2", "--devices-per-process", "1", "--grace", "120", "--",
            "train", "--config", str(config), "--run-dir", str(run)]

    first = Launch(args, run_env(), logs, module="lmu_jax.launch_local")
    first.wait_until(lambda: checkpoint_steps(run) and max(checkpoint_steps(run)) >= 8, "checkpoint 8")
    reached = last_logged_step(run)
    os.kill(pids(first)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    assert first.finish(timeout=TIMEOUT_S + 90) == 128 + signal.SIGKILL
    summary = first.err.strip().splitlines()[-1]
    assert summary.startswith(f"error: process 1 (pid {pids(first)[1]}) was killed by SIGKILL first; "
                              "process 0 "), summary
    lag = float(re.search(r"process 0 .* ([\d.]+) s later", summary).group(1))
    assert lag <= TIMEOUT_S + 5 and "stopped by the launcher" not in summary, summary  # it stopped by itself
    assert time.monotonic() - killed_at < TIMEOUT_S + 60
    assert "run the same command again to resume" in summary

    second = Launch(args, run_env(), logs, module="lmu_jax.launch_local")
    second.wait_until(lambda: resumed_from(second), "the resume")
    resumed = resumed_from(second)
    assert resumed >= 8
    print(f"FAULT process 1 of 2 SIGKILLed: survivor stopped {lag:.1f} s later (timeout {TIMEOUT_S} s); "
          f"reached step {reached}, resumed from {resumed}, steps lost {reached - resumed}")
    second.wait_until(lambda: last_logged_step(run) >= resumed + 3, "progress after the resume")
    second.proc.send_signal(signal.SIGTERM)  # preemption: the launcher passes it on to both processes
    assert second.finish(timeout=120) == 0, second.out + second.err
    saved = [int(s) for s in re.findall(r"^\[(?:0)\] SIGTERM: saved a checkpoint at step (\d+)", second.out, re.M)]
    assert len(saved) == 1 and saved[0] == max(checkpoint_steps(run)) == last_logged_step(run), second.out

    third = Launch(args, run_env(), logs, module="lmu_jax.launch_local")
    assert third.finish() == 0, third.out + third.err
    assert resumed_from(third) == saved[0]
    print(f"FAULT SIGTERM to 2 processes: both stopped at step {saved[0]}, resumed from it, steps lost 0")
    assert (run / "DONE").exists() and not (run / ".lock").exists()
    assert_each_step_once(run, STEPS)
    np.testing.assert_allclose([loss for _, loss in train_losses(run)],
                               [loss for _, loss in train_losses(tmp_path / "one")], rtol=1e-5)
