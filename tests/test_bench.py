"""`lmu-jax bench --quick`: every section runs and writes a well-formed JSON and markdown table."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import peers
from benchmarks.suite import dot_flops_per_instruction
from lmu_jax.cli import main


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One family keeps the test short (the sharding section always runs a transformer); the others
    # run the same code paths.
    assert main(["bench", "--quick", "--families", "lmu", "--out", str(out)]) == 0
    return out, json.loads((out / "cpu_quick.json").read_text())


def test_quick_bench_structure(quick_results):
    out, results = quick_results
    assert results["platform"] == "cpu" and results["quick"] is True
    ceiling = results["ceiling"]
    for key in ("matmul_float32_gflops", "matmul_bfloat16_gflops", "copy_gb_per_s"):
        assert ceiling[key] > 0 and ceiling["start"][key] > 0 and ceiling["end"][key] > 0
    # the quick grid's one width, at a step's and a microbatch's tokens
    assert [(m["rows"], m["d_model"]) for m in ceiling["model_matmuls"]] == [(1024, 64), (256, 64)]
    assert all(m["gflops"] > 0 and 0 < m["of_ceiling"] < 2 for m in ceiling["model_matmuls"])
    assert {p["family"] for p in results["train"]} == {"lmu"}
    # the grid's point, then the same step accumulated over 4 microbatches of 256 tokens
    assert [(p["tokens_per_step"], p["microbatches"]) for p in results["train"]] == [(1024, 1), (1024, 4)]
    for point in results["train"]:
        assert "error" not in point, point
        assert point["step_s"] > 0 and point["tokens_per_s"] > 0 and point["peak_bytes"] > 0
        assert 0 < point["mfu"] < 1.5
        assert point["flops_per_token"] > 0
        if point["microbatches"] == 1:
            assert point["xla_over_model_flops"] > 1.0  # the chunked memory does more than the FFT count credited
        else:
            assert point["xla_over_model_flops"] is None  # the accumulation scan: XLA counts its body once
    for point in results["loop"]:
        assert point["step_s"] > 0 and 0 < point["loop_over_bare"] < 10
    for family, scaling in results["scaling"].items():
        assert [p["n"] for p in scaling["points"]] == [256, 1024]
        assert all(p["step_s"] > 0 and p["peak_bytes"] > 0 for p in scaling["points"])
        slopes = scaling["slopes"]
        for key in ("step_time_per_batch", "peak_memory_per_batch"):
            assert math.isfinite(slopes[key])
        assert slopes["step_time_per_sequence"] == pytest.approx(slopes["step_time_per_batch"] + 1)
    sharding = results["sharding"]
    assert sharding["runs"]["1"]["devices"] == 1 and sharding["runs"]["8"]["devices"] == 8
    assert sharding["slowdown_8_vs_1"] > 0
    assert 0 <= sharding["runs"]["8"]["collective_fraction"] < 1  # gradients are all-reduced: a trace shows it
    assert results["lmu_memory"]["points"] and all(p["auto"] for p in results["lmu_memory"]["points"])
    assert {g["status"] for g in results["goals"]} <= {"met", "missed", "not run"}
    assert len(results["goals"]) == 7
    lmu_goal = next(g for g in results["goals"] if g["goal"].startswith("LMU (best impl)"))
    assert lmu_goal["at"].startswith("d 64, n 128, 1024 tokens")  # which point the best MFU is

    table = (out / "cpu_quick.md").read_text()
    assert "## Ceiling" in table and "## Goals" in table and "## Sequence-length scaling" in table
    assert "| (1024 x 64) @ (64 x 256) float32 |" in table
    assert "| lmu | 64 | 128 | 1024 | 1 |" in table and "| lmu | 64 | 128 | 1024 | 4 |" in table
    assert "## Where the time goes" in table
    profiled = [p for p in results["train"] if "top_ops" in p]
    assert [p["family"] for p in profiled] == ["lmu"]
    assert 0 < profiled[0]["matmul_time_share"] <= 1 and profiled[0]["matmul_gflops"] > 0
    assert "## LMU memory kernels" in table


def test_unknown_family_is_a_user_error(capsys, tmp_path):
    assert main(["bench", "--quick", "--families", "transformer,gru", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --families='transformer,gru' is invalid") and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_unknown_section_is_a_user_error(capsys, tmp_path):
    assert main(["bench", "--sections", "loop,speed", "--out", str(tmp_path)]) == 2
    assert "--sections='loop,speed' is invalid" in capsys.readouterr().err


def test_peers_compile_needs_the_peers(capsys, tmp_path):
    assert main(["bench", "--peers-compile", "--sections", "loop", "--out", str(tmp_path)]) == 2
    assert "--peers-compile=True is invalid: used with --peers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_dot_flops_are_read_from_the_compiled_module():
    """2 x output elements x contracted size, for a plain dot and for dots inside a fusion and a batch."""
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    flops = dot_flops_per_instruction(jax.jit(lambda a, b: jnp.tanh(a @ b) + 1).lower(a, b).compile().as_text())
    assert sum(flops.values()) == 2 * 64 * 16 * 32
    x, y = jnp.ones((3, 8, 5)), jnp.ones((3, 5, 7))
    flops = dot_flops_per_instruction(jax.jit(jnp.matmul).lower(x, y).compile().as_text())
    assert sum(flops.values()) == 2 * 3 * 8 * 7 * 5


@pytest.mark.skipif(peers.torch_available() is not None, reason=peers.torch_available() or "")
def test_quick_peers_bench(tmp_path):
    """`--peers` alone runs only the ceiling and the PyTorch peers, and writes <platform>_peers_quick.*"""
    assert main(["bench", "--quick", "--peers", "--families", "lstm", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "cpu_peers_quick.json").read_text())
    assert results["sections"] == ["peers"] and "train" not in results
    (point,) = results["peers"]["points"]
    assert point["family"] == "lstm" and point["torch_params"] == point["params"]
    assert point["ours_step_s"] > 0 and point["torch_eager_step_s"] > 0
    assert point["ours_over_torch_eager"] == pytest.approx(point["ours_step_s"] / point["torch_eager_step_s"])
    assert point["ours_over_torch_eager_no_onednn"] == pytest.approx(
        point["ours_step_s"] / point["torch_eager_no_onednn_step_s"])  # the LSTM also without oneDNN's kernel
    for matmul in results["ceiling"]["model_matmuls"]:  # the same shapes in torch.mm, beside XLA's
        assert matmul["torch_gflops"] > 0
    markdown = (tmp_path / "cpu_peers_quick.md").read_text()
    assert "| torch.mm GFLOP/s | XLA ÷ torch speed |" in markdown
    assert "| lstm | 64 | 1 | 4 x 64 |" in markdown and "| eager, no oneDNN s | ours ÷ that |" in markdown
