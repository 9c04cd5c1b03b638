"""A run that carries state (SCH-TXL memory with its ages, on ordered streams) stopped and resumed ends
bitwise equal to the uninterrupted run: the memory is part of the checkpointed train state."""

import jax
import numpy as np

from helpers import tiny_config, train_losses
from lmu_jax.config import config_from_dict
from lmu_jax.train.checkpoint import Checkpointer
from lmu_jax.train.loop import Trainer
from reliability_helpers import assert_each_step_once, assert_same_leaves, state_leaves, stop_after

STEPS = 8


def carried_state_config(cache):
    raw = tiny_config(cache, train={"steps": STEPS}, checkpoint={"every": 4, "keep": 2}, mesh={"data": 2})
    raw["model"] = {"family": "sch_txl", "d_model": 16, "n_layers": 3, "n_head": 2, "d_inner": 32, "dropout": 0.1,
                    "skip_prob_scale": 1.0, "ch_prob": 0.5}  # skips (ages) and permutations on every step
    return config_from_dict(raw)


def test_carried_state_resumes_bitwise(tmp_path, kjv_cache, monkeypatch):
    cfg = carried_state_config(kjv_cache)
    devices = jax.devices()[:2]
    straight = Trainer(cfg, tmp_path / "straight", devices=devices)
    assert straight.carried and "carry" in straight.abstract_state
    straight.train()

    stop_after(monkeypatch, 3)  # between checkpoints: SIGTERM's checkpoint of step 3 is the one resumed
    assert Trainer(cfg, tmp_path / "stopped", devices=devices).train()["status"] == "preempted"
    monkeypatch.undo()
    resumed = Trainer(cfg, tmp_path / "stopped", devices=devices)
    ckpt = Checkpointer(resumed.run.checkpoints.absolute(), cfg.checkpoint)
    state, meta = ckpt.restore_latest(resumed.abstract_state)
    ckpt.close()
    assert meta["step"] == 3 and set(state["carry"]) == {"mems", "valid", "age"}
    assert np.asarray(state["carry"]["valid"]).max() > 0  # step 3's memory, not a fresh one
    assert resumed.train()["status"] == "done"

    assert train_losses(tmp_path / "stopped") == train_losses(tmp_path / "straight")
    assert_each_step_once(tmp_path / "stopped", STEPS)
    assert_same_leaves(state_leaves(tmp_path / "stopped", cfg, devices=devices),
                       [np.asarray(x) for x in jax.tree.leaves(straight.final_state)])
