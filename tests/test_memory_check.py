"""A run that cannot fit in device memory is refused in one line before anything is allocated
(lmu_jax/train/memory_check.py)."""

import logging

import jax
import pytest

from lmu_jax.cli import main
from lmu_jax.config import config_from_dict
from lmu_jax.train import memory_check
from lmu_jax.train.builder import Program
from lmu_jax.train.loop import Trainer

from helpers import FAMILY_TINY, tiny_config, write_config


@pytest.mark.parametrize("family,mesh", [("transformer", {"data": 1, "fsdp": 8}),
                                         ("transformer_xl", {"data": 2, "fsdp": 2, "tensor": 2})])
def test_state_need_is_xla_per_device_state(family, mesh, tmp_path, kjv_cache, caplog):
    """The state figure, from shapes and shardings alone, is exactly the state XLA's memory analysis
    counts per device (the donated, aliased arguments; the arguments less the batch), under fsdp and
    tensor sharding and with a carried state (Transformer-XL memory). The run's check and its first step
    reuse that one compile of the step."""
    raw = tiny_config(kjv_cache, mesh=mesh)
    raw["model"] = dict(FAMILY_TINY[family], family=family)
    trainer = Trainer(config_from_dict(raw), tmp_path / "run")
    program = trainer.program
    inputs = program.step_input_shapes()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        compiled = program.lower_train_step().compile()
        trainer.check_memory()
        program.train_step(program.init_state(), *trainer.inputs(0))
    assert sum("Compiling jit(train_step)" in r.getMessage() for r in caplog.records) == 1
    analysis = compiled.memory_analysis()
    need = memory_check.step_need(program.abstract_state, compiled)
    assert need.state == analysis.alias_size_in_bytes
    assert need.state + sum(memory_check.state_need(x).state for x in inputs) == analysis.argument_size_in_bytes
    assert need.temporaries == analysis.temp_size_in_bytes and need.state < need.step

    replicated = dict(raw, mesh={"data": 8})
    whole = memory_check.state_need(Trainer(config_from_dict(replicated), tmp_path / "r").program.abstract_state).state
    divided = need.state * mesh.get("fsdp", 1) * mesh.get("tensor", 1)
    # sharding divides it: k devices hold the whole state once, plus k copies of the few replicated
    # vectors (at most mesh.sharding_tolerance = 2 % of the parameter bytes)
    assert whole <= divided < 1.15 * whole


@pytest.mark.parametrize("shape", [["model.d_model=16384", "model.n_layers=4"],
                                   ["model.d_model=65536", "model.n_layers=8"]], ids=["16k-x4", "64k-x8"])
def test_oversized_model_is_refused_before_compiling(shape, tmp_path, capsys, kjv_cache, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the check should have refused the run before this")

    monkeypatch.setattr(Trainer, "fresh_state", must_not_run)
    monkeypatch.setattr(Program, "lower_train_step", must_not_run)  # i.e. before the step compiles
    config = write_config(tmp_path / "c.yaml", tiny_config(kjv_cache))
    code = main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), *shape])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for words in ("does not fit in memory", "parameters and optimizer state alone need", "GiB per device",
                  "a CPU device here has", "host's available memory", "mesh.fsdp=8", "model.d_model"):
        assert words in err, (words, err)
    assert not (tmp_path / "run").exists()


def test_activations_that_do_not_fit_are_refused_from_the_compiled_step(tmp_path, capsys, kjv_cache, monkeypatch):
    """A small state with large activations passes the first figure and is refused by XLA's analysis of
    the compiled step (here against a device of 1 MiB)."""
    small = memory_check.Capacity(2**20, "a test device has 1 MiB")
    monkeypatch.setattr(memory_check, "device_capacity", lambda device, shared=1: small)
    monkeypatch.setattr(Trainer, "fresh_state", lambda self: pytest.fail("allocated before the check"))
    config = write_config(tmp_path / "c.yaml", tiny_config(kjv_cache, data={"seq_len": 256},
                                                           train={"batch_size": 64, "microbatches": 1}))
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for words in ("its train step needs", "temporaries", "XLA's memory analysis", "a test device has 1 MiB",
                  "train.microbatches (now 1", "data.seq_len"):
        assert words in err, (words, err)
    assert err.index("train.microbatches") < err.index("mesh.fsdp")  # the activations are most of it
    assert not (tmp_path / "run").exists()
