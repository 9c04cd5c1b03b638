"""benchmarks/xla_flags.py: variants of the train step compiled with other XLA options, timed interleaved,
their losses compared with the default's, an option this build rejects recorded as an error."""

from __future__ import annotations

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
