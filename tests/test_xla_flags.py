"""benchmarks/xla_flags.py and step_profile.py. xla_flags: variants of the train step compiled with other
XLA options, timed interleaved, their losses compared with the default's, an option this build rejects
recorded as an error. step_profile: the step's traced time per dot signature."""

from __future__ import annotations

import pytest

from benchmarks import peers
from benchmarks.step_profile import profile
from benchmarks.step_profile import to_markdown as profile_markdown
from benchmarks.suite import dot_instructions
from benchmarks.xla_flags import VARIANTS, compare, to_markdown


def test_variants_are_timed_and_their_losses_compared(kjv_cache):
    variants = {"default": {}, "vector width 512": VARIANTS["vector width 512"],
                "rejected": {"xla_cpu_experimental_xnn_fusion_type": "dot"}}  # not an enum name: refused
    point = compare("lstm", 16, variants, rounds=2, cache_dir=str(kjv_cache))
    default, wide, rejected = (point["variants"][name] for name in variants)
    assert len(default["steps_s"]) == 2 and len(default["losses"]) == 3 and default["ratio"] == 1.0
    assert wide["ratio"] > 0 and wide["library_calls"] == default["library_calls"]  # the same dot library
    assert wide["max_loss_diff"] == 0.0  # a codegen preference: the same numbers
    assert "not a valid enum value" in rejected["error"]
    markdown = to_markdown({"cpu": "test", "jax": "x", "points": [point], "notes": ["a note"]})
    assert "| vector width 512 |" in markdown and "| rejected | failed:" in markdown and "- a note" in markdown


def test_step_profile_groups_every_dot_by_its_signature(kjv_cache):
    """The LSTM's forward matmul and its backward ones show apart, with their calls per step; the shares
    are of the traced op time."""
    point = profile("lstm", 16, str(kjv_cache), steps=2)
    assert point["step_s"] > 0 and 0 < point["dot_share"] <= 1
    signatures = [d["signature"] for d in point["dots"]]
    assert len(set(signatures)) == len(signatures) >= 3
    assert any(d["calls_per_step"] >= 256 for d in point["dots"])  # the per-time-step matmuls of the scans
    assert all(d["gflops"] > 0 and 0 < d["share"] <= 1 for d in point["dots"])
    wall = point["wall"]  # what runs during the step: the shares add up to it, and both dots and others run
    assert abs(sum(wall.values()) - 1) < 1e-9 and wall["matmul_share"] > 0 and wall["other_share"] > 0
    peer = point["peer"]  # the PyTorch LSTM split the same way: oneDNN's RNN kernel is its matmul time
    if peers.torch_available() is None:
        assert peer["step_s"] > 0 and peer["matmul_share"] > 0 and peer["other_share"] > 0
        assert peer["matmul_share"] + peer["other_share"] + peer["none_share"] == pytest.approx(1, abs=0.05)
    markdown = profile_markdown({"cpu": "test", "jax": "x", "load": [1.0, 1.0], "points": [point]})
    assert "## lstm d 16, 2 layers" in markdown and "| calls per step |" in markdown
    assert "| only other ops running |" in markdown


def test_wall_split_counts_side_by_side_ops_once():
    """A dot from 0 to 10, another op from 5 to 20, a gap, an op from 30 to 40 (ns): the dot runs 10 of
    40, only others 20, none 10. A while loop's event, which spans its body, is not an op here."""
    from benchmarks.step_profile import wall_split

    events = [("dot.1", 0, 10), ("fusion.2", 5, 15), ("fusion.3", 30, 10), ("while.4", 0, 40)]
    split = wall_split(events, {"dot.1"})
    assert split == {"matmul_share": 0.25, "other_share": 0.5, "none_share": 0.25}


def test_dot_signature_reads_shapes_and_contracting_dims():
    import jax
    import jax.numpy as jnp

    compiled = jax.jit(lambda a, w: a @ w.T).lower(jnp.ones((8, 4)), jnp.ones((16, 4))).compile()
    ((flops, signature),) = set(dot_instructions(compiled.as_text()).values())
    assert flops == 2 * 8 * 16 * 4
    assert signature.startswith("f32[8,4] x f32[16,4] -> f32[8,16], contract 1/1")


def test_input_gradient_dots_time_both_layouts_of_the_ffn_weights():
    from benchmarks.step_profile import input_gradient_dots

    up, down = input_gradient_dots("transformer", 16, microbatches=8, repeats=2)  # 512 rows
    assert up["shape"] == "(512 x 64) @ (64 x 16)" and down["shape"] == "(512 x 16) @ (16 x 64)"
    assert all(g["transposed_gflops"] > 0 and g["laid_out_gflops"] > 0 for g in (up, down))
    assert input_gradient_dots("lstm", 16, microbatches=1) == []
