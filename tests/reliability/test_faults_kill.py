"""Kill and preempt a real training process (SIGKILL x3, one of them mid checkpoint write; SIGTERM x1);
every restart resumes, and the end result is bitwise the uninterrupted run's (CPU).

The kill points are drawn from a seeded generator; RELIABILITY_SEED=<int> draws other ones (the suite
uses the default)."""

import json
import os
import random
import signal

import jax
import numpy as np
import pytest

from helpers import tiny_config, train_losses, write_config
from lmu_jax.cli import main
from lmu_jax.config import config_from_dict
from lmu_jax.train.loop import Trainer
from reliability_helpers import (Launch, assert_each_step_once, assert_same_leaves, checkpoint_steps,
                                 last_logged_step, state_leaves)

STEPS = 36


def resumed_from(launch) -> int:
    """The step a launch said it resumed from (0: it started fresh)."""
    for line in launch.out.splitlines():
        if line.startswith("resuming "):
            return int(line.rsplit(" ", 1)[1])
    return 0


def metrics_inode(run):
    try:
        return os.stat(run / "metrics.jsonl").st_ino
    except FileNotFoundError:
        return None


def restored(run, before) -> bool:
    """Has the new launch restored? It replaces the killed launch's metrics.jsonl (inode ``before``,
    whose lines may run past where it resumes) once it has restored and cleaned up."""
    return metrics_inode(run) not in (None, before)


def stepped_past(run, target: int, before):
    """Has the new launch logged ``target``? Until it has restored, the lines are the killed launch's."""
    return lambda: restored(run, before) and last_logged_step(run) >= target


@pytest.mark.slow
def test_killed_three_times_and_preempted_once_ends_bitwise_equal(tmp_path, kjv_cache, run_env, capsys):
    rng = random.Random(int(os.environ.get("RELIABILITY_SEED", "1122")))
    # one device (the launches get one too): 8 fake devices would only make every step slower
    raw = tiny_config(kjv_cache, train={"steps": STEPS}, checkpoint={"every": 4, "keep": 2}, mesh={"data": 1})
    config = write_config(tmp_path / "c.yaml", raw)
    cfg = config_from_dict(raw)
    reference = Trainer(cfg, tmp_path / "straight", devices=jax.devices()[:1])  # also fills the compile cache
    reference.train()
    run, logs = tmp_path / "killed", tmp_path / "logs"
    args = ["train", "--config", str(config), "--run-dir", str(run)]
    table = []  # (fault, step reached when it hit, step the next launch resumed from)

    # 1. SIGKILL at a random step. Meanwhile a second launch into the same directory is refused.
    first = Launch(args, run_env(devices=1), logs)
    target = rng.randint(3, 10)
    first.wait_until(lambda: last_logged_step(run) >= target, f"step {target}")
    lock, config_text = (run / ".lock").read_text(), (run / "config.yaml").read_text()
    assert main(args + ["mesh.data=-1"]) == 2  # (this process has 8 devices; the mesh may change on resume)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert f"in use by pid {first.proc.pid}" in err, err
    assert (run / ".lock").read_text() == lock and (run / "config.yaml").read_text() == config_text
    first.kill()
    table.append(["SIGKILL at a random step", last_logged_step(run)])
    assert (run / ".lock").exists()  # left behind by the dead process: the next launch must not mind

    # 2. SIGKILL while an async checkpoint write is in flight (the test hook holds it open for 60 s)
    before = metrics_inode(run)
    second = Launch(args, run_env(devices=1, LMU_JAX_TEST_CKPT_DELAY_S=60), logs)

    def new_write_in_flight():
        if not restored(run, before):
            return None
        return next((run / "checkpoints").glob("*.orbax-checkpoint-tmp*"), None)

    in_flight = second.wait_until(new_write_in_flight, "a checkpoint write")
    second.kill()
    table[-1].append(resumed_from(second))
    table.append(["SIGKILL during an async checkpoint write", last_logged_step(run)])
    step_in_flight = int(in_flight.name.split(".")[0])
    assert in_flight.exists() and step_in_flight not in checkpoint_steps(run)  # killed before the commit

    # 3. SIGKILL at another random step
    before = metrics_inode(run)
    third = Launch(args, run_env(devices=1), logs)
    third.wait_until(lambda: "resuming" in third.out, "the resume")
    target = resumed_from(third) + rng.randint(1, 6)
    third.wait_until(stepped_past(run, target, before), f"step {target}")
    third.kill()
    table[-1].append(resumed_from(third))
    table.append(["SIGKILL at a random step", last_logged_step(run)])

    # 4. SIGTERM: a checkpoint of the step in flight, a message, exit code 0
    before = metrics_inode(run)
    fourth = Launch(args, run_env(devices=1), logs)
    fourth.wait_until(lambda: "resuming" in fourth.out, "the resume")
    table[-1].append(resumed_from(fourth))
    target = resumed_from(fourth) + rng.randint(1, 3)
    fourth.wait_until(stepped_past(run, target, before), f"step {target}")
    signalled_at = last_logged_step(run)
    fourth.proc.send_signal(signal.SIGTERM)
    assert fourth.finish(timeout=60) == 0, fourth.err
    saved = int(fourth.out.split("SIGTERM: saved a checkpoint at step ")[1].split()[0])
    assert "Run the same command again to resume" in fourth.out
    assert signalled_at <= saved == max(checkpoint_steps(run)) == last_logged_step(run)  # stopped right there
    table.append(["SIGTERM", saved])

    # 5. the last launch finishes the run
    fifth = Launch(args, run_env(devices=1), logs)
    assert fifth.finish() == 0, fifth.err
    table[-1].append(resumed_from(fifth))
    assert resumed_from(fifth) == saved

    assert (run / "DONE").exists() and not (run / ".lock").exists()
    assert train_losses(run) == train_losses(tmp_path / "straight")  # bitwise: floats round-trip in JSON
    assert_each_step_once(run, STEPS)
    assert_same_leaves(state_leaves(run, cfg, devices=jax.devices()[:1]),
                       [np.asarray(x) for x in jax.tree.leaves(reference.final_state)])
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit()]
    assert leftovers == [], leftovers  # the interrupted write was cleaned up; nothing was unusable
    assert json.loads((run / "eval.json").read_text()) == json.loads((tmp_path / "straight" / "eval.json").read_text())
    for fault, reached, resumed in table:
        print(f"FAULT {fault}: reached step {reached}, resumed from {resumed}, steps lost {reached - resumed}")
