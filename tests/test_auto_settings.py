"""`auto` speed settings (lmu_jax.config.resolve_auto): what they pick, that the Trainer records the pick,
and that the update is the one of the explicit setting."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import yaml

from lmu_jax.cli import main
from lmu_jax.config import config_from_dict, resolve_auto, run_id
from lmu_jax.train.loop import Trainer
from tests.helpers import FAMILY_TINY, tiny_config, train_losses, write_config


def resolved(platform, dp=1, **sections):
    return resolve_auto(config_from_dict(sections), platform, dp)


def test_cpu_accumulates_in_parts_of_512_tokens():
    train = {"batch_size": 16}
    assert resolved("cpu", data={"seq_len": 256}, train=train).train.microbatches == 8  # 2 sequences a part
    assert resolved("cpu", data={"seq_len": 1024}, train=train).train.microbatches == 16  # one sequence
    assert resolved("cpu", data={"seq_len": 32}, train=train).train.microbatches == 1  # 512 tokens in all
    # rows per part stay a multiple of the data-parallel size
    assert resolved("cpu", 8, data={"seq_len": 256}, train=train).train.microbatches == 2
    # the LSTM's recurrent matmuls need the rows: one pass
    assert resolved("cpu", model={"family": "lstm"}, data={"seq_len": 256}, train=train).train.microbatches == 1
    assert resolved("gpu", data={"seq_len": 256}, train=train).train.microbatches == 1


def test_the_lstm_hoists_its_input_matmul_on_cpu_from_d_512():
    assert resolved("cpu", model={"family": "lstm", "d_model": 512}).model.hoist_inputs is True
    assert resolved("cpu", model={"family": "lstm", "d_model": 256}).model.hoist_inputs is False
    assert resolved("gpu", model={"family": "lstm", "d_model": 1024}).model.hoist_inputs is False
    assert resolved("cpu", model={"family": "lstm", "d_model": 256, "hoist_inputs": True}).model.hoist_inputs is True


def test_remat_is_off_on_cpu_only():
    assert resolved("cpu", model={"family": "lmu"}).model.remat is False
    assert resolved("tpu", model={"family": "lmu_attn", "n_heads": 2}).model.remat is True
    assert resolved("cpu", model={"family": "lmu", "remat": True}).model.remat is True  # explicit: kept
    assert resolved("cpu", train={"microbatches": 4}).train.microbatches == 4


@pytest.mark.parametrize("model,override,allowed", [
    ({}, "train.microbatches=some", "auto or a positive int"),
    ({}, "train.microbatches=0", "auto or a positive int"),
    ({"family": "lmu", "d_model": 32, "n_layers": 1}, "model.remat=maybe", "true, false or auto"),
    ({"family": "lstm", "d_model": 32, "n_layers": 1}, "model.hoist_inputs=maybe", "true, false or auto")])
def test_bad_auto_values(model, override, allowed, capsys, kjv_cache, tmp_path):
    raw = tiny_config(kjv_cache)
    raw["model"] = model or raw["model"]
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and override.split("=")[0] in err and allowed in err, err
    assert not (tmp_path / "run").exists()


def test_auto_trains_as_its_explicit_setting(kjv_cache, tmp_path):
    """A 1024-token batch on one CPU device: auto is 2 parts of 512 tokens; the run records 2, and its
    losses are bitwise those of train.microbatches=2 (and equal to one pass's to float rounding)."""
    raw = tiny_config(kjv_cache, data={"seq_len": 64}, train={"batch_size": 16, "steps": 3},
                      checkpoint={"every": 0, "async_save": False})
    losses = {}
    for setting in ("auto", 2, 1):
        cfg = config_from_dict({**raw, "train": {**raw["train"], "microbatches": setting}})
        trainer = Trainer(cfg, tmp_path / f"run_{setting}", devices=[jax.devices()[0]])
        assert trainer.cfg.train.microbatches == (2 if setting == "auto" else setting)
        trainer.train()
        losses[setting] = [loss for _, loss in train_losses(trainer.run.path)]
        if setting == "auto":  # the run id is the config's as given (a sweep plans by it)
            assert json.loads((trainer.run.path / "eval.json").read_text())["run_id"] == run_id(cfg)
    recorded = yaml.safe_load((tmp_path / "run_auto" / "config.yaml").read_text())
    assert recorded["train"]["microbatches"] == 2
    (settings,) = [json.loads(line) for line in (tmp_path / "run_auto" / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "settings"]  # and so do its metrics
    assert settings["platform"] == "cpu" and settings["chosen"] == {"train.microbatches": 2}
    assert losses["auto"] == losses[2]
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)


def test_a_resumed_run_keeps_the_choices_its_config_yaml_records(kjv_cache, tmp_path):
    """A run written before microbatches/remat became auto (or on another host) resumes with its values."""
    from lmu_jax.config import dump_config
    from lmu_jax.train.rundir import RunDir

    raw = tiny_config(kjv_cache)
    raw["model"] = {"family": "lmu", **FAMILY_TINY["lmu"]}  # a family with both auto settings
    cfg = config_from_dict(raw)
    assert cfg.train.microbatches == "auto" and cfg.model.remat == "auto"
    run = RunDir(tmp_path / "run")
    assert run.with_earlier_choices(cfg) == cfg  # nothing recorded yet: auto stays for resolve_auto
    run.path.mkdir()
    recorded = resolve_auto(cfg, "gpu")  # microbatches 1, remat on: not what auto picks on this CPU
    run.config_path.write_text(dump_config(recorded))
    kept = run.with_earlier_choices(cfg)
    assert (kept.train.microbatches, kept.model.remat) == (1, True)
    assert resolve_auto(kept, "cpu") == recorded
