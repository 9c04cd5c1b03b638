"""Trainer features beyond the basics: schedule values, gradient accumulation, bf16 compute, checkpoint
retention with synchronous saves, TensorBoard events, the progress bar, and `lmu-jax eval` on a run."""

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmu_jax.cli import main as cli_main
from lmu_jax.config import OptimConfig, config_from_dict
from lmu_jax.models import FAMILIES
from lmu_jax.train.loop import Trainer
from lmu_jax.train.optim import make_schedule
from lmu_jax.train.step import train_step

from helpers import tiny_config, train_losses


def lr_at(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_cosine_schedule_warms_up_from_above_zero_and_ends_at_the_floor():
    cfg = OptimConfig(lr=1e-2, warmup_steps=9, schedule="cosine", min_lr_ratio=0.1)
    schedule = make_schedule(cfg, steps=109)
    warm, peak, mid, end = lr_at(schedule, [0, 9, 59, 109])
    assert warm == pytest.approx(1e-3)  # step 0: lr / (warmup + 1), never 0
    assert peak == pytest.approx(1e-2)
    assert mid == pytest.approx(1e-3 + 0.5 * 9e-3, rel=1e-6)  # half way: (peak + floor) / 2
    assert end == pytest.approx(1e-3, rel=1e-6)  # the floor exactly at the run's horizon
    assert np.all(np.diff(lr_at(schedule, range(9, 110))) <= 1e-12)  # monotone after warmup


def test_wsd_schedule_is_flat_then_cools_down_linearly_to_the_floor():
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    schedule = make_schedule(cfg, steps=100)  # cooldown over the last 20 steps
    assert np.all(lr_at(schedule, range(4, 80)) == pytest.approx(1e-2))
    cooldown = lr_at(schedule, range(80, 100))
    np.testing.assert_allclose(cooldown, 1e-2 * (1 - np.arange(1, 21) / 20), rtol=1e-6, atol=1e-9)
    constant = make_schedule(OptimConfig(lr=1e-2, warmup_steps=4, schedule="constant"), steps=100)
    assert np.all(lr_at(constant, range(4, 100)) == pytest.approx(1e-2))


@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_equals_one_big_batch(microbatches):
    family = FAMILIES["transformer"]
    cfg = family.config_cls(d_model=32, n_layers=1, n_heads=2).resolved(64, 16)
    model = family.build(cfg)
    windows = jax.random.randint(jax.random.PRNGKey(1), (8, 17), 0, 64)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), windows[:, :-1], {})["params"]
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    optimizer = optax.sgd(1.0)  # the update is the gradient itself (Adam would amplify float noise)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "carry": {}}

    def run(parts):
        step = jax.jit(lambda s, b: train_step(s, b, apply_fn=model.apply, optimizer=optimizer,
                                               microbatches=parts, seed=0, skip_nonfinite=False))
        return step(state, windows)

    (one_state, one), (acc_state, acc) = run(1), run(microbatches)
    np.testing.assert_allclose(acc["loss"], one["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc["grad_norm"], one["grad_norm"], rtol=1e-5)
    for a, b, p in zip(*(jax.tree.leaves(s["params"]) for s in (acc_state, one_state, state))):
        np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-7)


def test_bf16_compute_keeps_float32_parameters_and_loss(tmp_path, kjv_cache):
    cfg = config_from_dict(tiny_config(kjv_cache, model={"dtype": "bfloat16"}, train={"steps": 6},
                                       checkpoint={"every": 0}))
    trainer = Trainer(cfg, tmp_path / "bf16")
    result = trainer.train()
    assert {x.dtype for x in jax.tree.leaves(trainer.final_state["params"])} == {jnp.dtype(jnp.float32)}
    losses = [loss for _, loss in train_losses(tmp_path / "bf16")]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert math.isfinite(result["loss"])
    logits, _ = trainer.program.model.apply({"params": trainer.final_state["params"]}, jnp.zeros((1, 8), jnp.int32), {})
    assert logits.dtype == jnp.float32  # the softmax and the loss never run in bf16


def test_synchronous_saves_retention_tensorboard_progress_and_eval(tmp_path, kjv_cache, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # tqdm draws only on a terminal
    cfg = tiny_config(kjv_cache, train={"steps": 10},
                      checkpoint={"every": 2, "keep": 1, "keep_every": 4, "async_save": False},
                      log={"tensorboard": True, "progress": True})
    run = tmp_path / "run"
    Trainer(config_from_dict(cfg), run).train()
    err = capsys.readouterr().err
    assert "loss=" in err and "tok_s=" in err and "10/10" in err  # tqdm: position, loss and tokens/s

    # keep 1 newest (10) + every 4th forever (4, 8); 2 and 6 were pruned once a newer one verified
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 10]

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"loss" in events[0].read_bytes()

    assert cli_main(["eval", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval.json").read_text())
    assert summary["step"] == 10
    assert summary["loss"] == pytest.approx(saved["loss"], rel=1e-6)
    assert summary["bits_per_byte"] == pytest.approx(saved["bits_per_byte"], rel=1e-6)
