"""Numerical faults, injected through LMU_JAX_TEST_NONFINITE_STEP (lmu_jax/train/loop.py): the run stops
with exit code 3 and one line naming the step and the last good checkpoint, or, with
train.nonfinite=skip, drops that step's update, logs the skip and goes on."""

import logging
import math

import numpy as np
import pytest

from helpers import tiny_config, write_config
from lmu_jax.cli import main
from lmu_jax.config import config_from_dict
from lmu_jax.train.builder import NONFINITE_ENV
from reliability_helpers import checkpoint_steps, state_leaves, train_records


def stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_nan_loss_stops_with_the_step_and_a_loadable_checkpoint(tmp_path, kjv_cache, capsys, monkeypatch):
    raw = tiny_config(kjv_cache, train={"steps": 12}, checkpoint={"every": 4, "keep": 2})
    config, run = write_config(tmp_path / "c.yaml", raw), tmp_path / "run"
    monkeypatch.setenv(NONFINITE_ENV, "6")
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 3
    err = stderr_line(capsys)
    assert "non-finite loss or gradient at step 6 (loss nan" in err, err
    assert f"the last good checkpoint is step 4 in {run / 'checkpoints'}, intact" in err, err
    assert checkpoint_steps(run) == [4]  # nothing after the blow-up was saved
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4, 5]
    assert not (run / "DONE").exists() and not (run / ".lock").exists()
    leaves = state_leaves(run, config_from_dict(raw))
    assert leaves[-1] == 4 and all(np.isfinite(x).all() for x in leaves)
    print("FAULT NaN loss at step 6 (stop): exit 3, last good checkpoint 4 loads")


def test_inf_gradient_with_a_finite_loss_also_stops(tmp_path, kjv_cache, capsys, monkeypatch):
    raw = tiny_config(kjv_cache, train={"steps": 8}, checkpoint={"every": 4, "keep": 2})
    config, run = write_config(tmp_path / "c.yaml", raw), tmp_path / "run"
    monkeypatch.setenv(NONFINITE_ENV, "3:grad:inf")
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 3
    err = stderr_line(capsys)
    loss = float(err.split("(loss ")[1].split(",")[0])
    assert math.isfinite(loss) and ("grad_norm inf" in err or "grad_norm nan" in err), err
    assert "at step 3 " in err and "the last good checkpoint is none" in err, err
    assert checkpoint_steps(run) == []
    print("FAULT Inf gradient at step 3 (stop): exit 3 before any checkpoint")


CARRY_MODEL = {"family": "transformer_xl", "d_model": 16, "n_layers": 1, "n_head": 2, "dropout": 0.0}


@pytest.mark.parametrize("model", [None, CARRY_MODEL], ids=["empty_carry", "carry"])
def test_skip_drops_the_update_logs_it_and_goes_on(tmp_path, kjv_cache, caplog, monkeypatch, capsys, model):
    raw = tiny_config(kjv_cache, train={"steps": 8, "nonfinite": "skip"}, checkpoint={"every": 1, "keep": 8},
                      log={"every": 4})
    if model:
        raw["model"] = model
    config, run = write_config(tmp_path / "c.yaml", raw), tmp_path / "run"
    monkeypatch.setenv(NONFINITE_ENV, "6")
    with caplog.at_level(logging.WARNING, logger="lmu_jax"):
        assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    assert "done:" in capsys.readouterr().out
    assert any(r.getMessage().startswith("step 6: non-finite loss or gradient") and "skipped" in r.getMessage()
               for r in caplog.records)
    logged = {r["step"]: r for r in train_records(run)}
    assert sorted(logged) == [4, 6, 8]  # log.every=4, but a skipped step is always logged
    assert logged[6]["finite"] is False and math.isnan(logged[6]["loss"])
    assert logged[8]["finite"] is True and math.isfinite(logged[8]["loss"])
    cfg = config_from_dict(raw)
    before, after = state_leaves(run, cfg, step=5), state_leaves(run, cfg, step=6)
    for x, y in zip(before[:-1], after[:-1]):  # parameters, optimizer state (and carry): untouched by step 6
        np.testing.assert_array_equal(x, y)
    assert (before[-1], after[-1]) == (5, 6)
    seven = state_leaves(run, cfg, step=7)
    assert any(not np.array_equal(x, y) for x, y in zip(after[:-1], seven[:-1]))  # step 7 trains again
    print("FAULT NaN loss at step 6 (skip): update dropped, run finished, steps lost 0")
