"""A run's program (lmu_jax/train/builder.py): config + mesh -> model, state layout, jitted steps, with no
data and no run directory; the one batch/mesh check; the one validation of the resolved model config."""

import jax
import pytest

from lmu_jax.config import load_config
from lmu_jax.errors import UserError
from lmu_jax.sharding import make_mesh
from lmu_jax.train.builder import Program

# a corpus that does not exist: building the program must not read data
NO_DATA = ["data.corpus=files:/nonexistent/*.txt", "data.seq_len=16", "model.d_model=32", "model.n_layers=1",
           "model.n_heads=2"]


def program(*overrides, devices=8):
    cfg = load_config(None, [*NO_DATA, *overrides])
    return Program(cfg, make_mesh(cfg.mesh, jax.devices()[:devices]))


def test_program_builds_and_lowers_without_data_or_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built = program("train.batch_size=8", "train.microbatches=auto", "mesh.fsdp=2")
    assert dict(built.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert built.cfg.train.microbatches == 1  # auto made concrete for the platform (CPU: 8 x 16 tokens < 512)
    assert built.model_cfg.vocab_size == 258 and built.model_cfg.max_len == 16  # resolved from the config alone
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(built.state_shardings["params"]))
    text = built.lower_train_step().as_text()
    assert "tensor<8x17xi32>" in text  # the global batch of seq_len + 1 token windows
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=12"], "train.batch_size=12 is invalid: a multiple of the data-parallel size 8"),
    (["train.batch_size=16", "train.microbatches=4"],
     "train.microbatches=4 is invalid: a value leaving microbatches of a multiple of 8 sequences"),
])
def test_batch_that_does_not_divide_over_the_mesh_is_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        program(*overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_model_config_is_validated_once_resolved_at_load():
    # the cutoffs pass on their own and fail against the byte vocabulary (258) the run will have: refused
    # when the config is loaded, not when a trainer, compile or sweep later resolves it
    with pytest.raises(UserError, match=r"model.adaptive_cutoffs=\[100, 300\] is invalid: .*vocab_size=258"):
        load_config(None, ["model.family=transformer_xl", "model.adaptive_cutoffs=[100, 300]"])
