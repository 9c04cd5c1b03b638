"""Configs: YAML + dotted overrides, strict validation, and one-line errors with exit code 2."""

import dataclasses

import pytest
import yaml

from lmu_jax.cli import main
from lmu_jax.config import RunConfig, dump_config, load_config, run_id
from lmu_jax.errors import UserError

from helpers import tiny_config, write_config


def test_defaults_and_overrides(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"model": {"d_model": 64, "n_heads": 4}})
    cfg = load_config(path, ["train.steps=7", "optim.lr=1e-3", "model.positions=learned"])
    assert cfg.model.d_model == 64 and cfg.train.steps == 7 and cfg.optim.lr == 1e-3
    assert cfg.model.positions == "learned"
    assert type(cfg.model).__name__ == "TransformerConfig"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3


def test_dump_roundtrip_and_run_id_ignores_mesh(tmp_path):
    cfg = load_config(None, ["model.d_model=48", "model.n_heads=4"])
    again = load_config(write_config(tmp_path / "c.yaml", yaml.safe_load(dump_config(cfg))))
    assert again == cfg
    assert run_id(cfg) == run_id(load_config(None, ["model.d_model=48", "model.n_heads=4", "mesh.data=2",
                                                    "mesh.fsdp=4"]))
    assert run_id(cfg) != run_id(load_config(None, ["model.d_model=48", "model.n_heads=4", "train.seed=1"]))


def test_ints_from_yaml_floats():
    cfg = load_config(None, ["train.steps=1e3"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)


def test_default_config_file_is_documented_and_valid():
    from helpers import REPO

    path = REPO / "experiments" / "configs" / "default.yaml"
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    lines = [l for l in path.read_text().splitlines() if l.strip() and not l.strip().startswith("#")]
    keys = [l for l in lines if not l.rstrip().endswith(":")]  # leaf keys, not section headers
    undocumented = [l for l in keys if "#" not in l]
    assert not undocumented, f"keys without a comment: {undocumented}"
    # every field of every section appears in the documented default
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f"  {f.name}:" in path.read_text(), f"{section.name}.{f.name} missing from default.yaml"


BAD_CONFIGS = [
    # (overrides, words the one-line message must contain)
    (["train.stepz=3"], ["train.stepz", "not a known key"]),
    (["optimizer.lr=3"], ["optimizer", "not a known section"]),
    (["train.steps=abc"], ["train.steps", "integer"]),
    (["train.steps=-5"], ["train.steps", "positive"]),
    (["model.family=gpt9"], ["model.family", "gpt9", "transformer"]),
    (["model.d_model=30", "model.n_heads=4"], ["model.n_heads", "divisor"]),
    (["train.batch_size=12", "train.microbatches=5"], ["train.microbatches", "divisor"]),
    (["optim.schedule=linear"], ["optim.schedule", "cosine"]),
    (["mesh.data=3"], ["mesh", "8"]),
    (["mesh.data=-1", "mesh.fsdp=-1"], ["mesh", "at most one"]),
    (["train.batch_size=6", "mesh.data=4", "mesh.fsdp=2"], ["train.batch_size", "data-parallel"]),
    (["model.dtype=float16"], ["model.dtype", "bfloat16"]),
    (["log.progress=maybe"], ["log.progress", "true or false"]),
    (["data.tokenizer=wordpiece"], ["data.tokenizer", "sentencepiece"]),
    (["nonsense"], ["override", "key=value"]),
    (["data.corpus=files:/nonexistent/dir/*.txt"], ["data.corpus", "/nonexistent"]),
    (["data.corpus=shakespeare"], ["data.corpus", "shakespeare"]),
    (["data.seq_len=100000000"], ["data.seq_len"]),
]


@pytest.mark.parametrize("overrides,words", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_one_line_exit_2(overrides, words, tmp_path, capsys, kjv_cache):
    base = write_config(tmp_path / "c.yaml", tiny_config(kjv_cache))
    run_dir = tmp_path / "run"
    code = main(["train", "--config", str(base), "--run-dir", str(run_dir), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, (word, err)
    assert not (run_dir / "checkpoints").exists()  # nothing half-made


def test_bad_files(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert main(["train", "--config", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_empty_and_short_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("In the beginning")
    for corpus, word in [("empty.txt", "empty"), ("short.txt", "large enough")]:
        code = main(["train", f"data.corpus=files:{tmp_path / corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                     "data.seq_len=64", "--run-dir", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert word in err.lower(), err


def test_user_error_is_one_line():
    assert "\n" not in str(UserError("a\nb   c"))
