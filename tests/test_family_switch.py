"""One override switches the family of the documented default config; typos stay errors."""

import jax
import jax.numpy as jnp
import pytest

from lmu_jax.cli import main
from lmu_jax.config import load_config
from lmu_jax.models import FAMILIES, build_model

from helpers import REPO, write_config

DEFAULT = REPO / "experiments" / "configs" / "default.yaml"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_config_switches_to_every_family(family, capsys):
    cfg = load_config(DEFAULT, [f"model.family={family}"])
    notice = capsys.readouterr().err
    assert type(cfg.model) is FAMILIES[family].config_cls
    assert (cfg.model.d_model, cfg.model.n_layers) == (128, 2)  # the keys every family shares carry over
    if family == "transformer":
        assert notice == ""
    else:
        assert len(notice.splitlines()) == 1 and notice.startswith("notice: ") and "default.yaml" in notice
        assert "model.max_len" in notice  # a transformer-only key, dropped
    model_cfg = cfg.resolved_model()  # validated by load_config
    params = jax.eval_shape(lambda: build_model(model_cfg).init(jax.random.PRNGKey(0),
                                                                jnp.zeros((1, cfg.data.seq_len), jnp.int32), {}))
    assert jax.tree.leaves(params)


def test_switched_family_trains(tmp_path, capsys, kjv_cache):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", str(DEFAULT), "--run-dir", str(run_dir), "model.family=lstm",
                 "model.d_model=32", "model.n_layers=1", "data.seq_len=32", f"data.cache_dir={kjv_cache}",
                 "data.max_bytes=300000", "data.val_windows=8", "train.steps=2", "train.batch_size=8",
                 "train.eval_every=0", "log.progress=false", "log.tensorboard=false"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "notice: model.family=lstm has no model.n_heads" in err and "done:" in out
    assert "n_heads" not in (run_dir / "config.yaml").read_text()  # the run records the lstm's keys only


@pytest.mark.parametrize("overrides,words", [
    (["model.family=lstm", "model.d_modle=64"], ["model.d_modle", "not a known key", "d_model"]),
    (["model.family=lstm", "model.n_heads=2"], ["model.n_heads", "model.family=lstm", "remove it", "transformer"]),
], ids=["typo", "other-family-key-given-explicitly"])
def test_explicit_unknown_key_is_refused_in_one_line(overrides, words, capsys):
    assert main(["flops", "--config", str(DEFAULT), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, (word, err)


def test_keys_in_the_file_stay_strict(tmp_path, capsys):
    # a misspelled key in the file is not one of its family's keys: switching family does not hide it
    typo = write_config(tmp_path / "typo.yaml", {"model": {"family": "transformer", "n_haeds": 2}})
    assert main(["flops", "--config", str(typo), "model.family=lstm"]) == 2
    assert "model.n_haeds is not a known key" in capsys.readouterr().err
    # a file naming its own family may only hold that family's keys
    mixed = write_config(tmp_path / "mixed.yaml", {"model": {"family": "lstm", "n_heads": 2}})
    assert main(["flops", "--config", str(mixed)]) == 2
    assert "model.n_heads is not a key of model.family=lstm" in capsys.readouterr().err
