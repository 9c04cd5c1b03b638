"""FLOP accounting and sizing for the transformer, lstm, lmu and lmu_attn families: the paper's Table 2
worked example, analytic forward FLOPs against XLA's cost analysis, the size solver, the transformer's
causality (the other families test theirs in their own files), and the `lmu-jax flops` table.

What the XLA comparison compares (like with like). XLA's ``cost_analysis()`` of one jitted forward
(batch 1, so per-forward terms like folding the L_i into the kernels count once per sequence, as Table 2
counts them) against the family's analytic ``forward_flops_per_token`` x tokens, with two counting
differences put back on the analytic side:
- attention: XLA counts the full n x n QKᵀ and AV that ``jax.nn.dot_product_attention`` computes under
  its causal mask; the analytic convention counts the causal half. The analytic side adds the other half.
- FFT: the paper counts a real transform of length N = 2n as 2.5 N log2 N (Table 2: 5(log2 n + 1) per
  token); XLA's HloCostAnalysis charges 8 log2(N) per element of the transform's operand, a complex
  multiply as 1 flop, and sees the folding of the L_i done in frequency space (two (3q' x q) @ (q x F)
  real matmuls). ``fft_path_as_xla_counts`` is that count of the implementation in lmu_jax/ops.
- LSTM: XLA counts a while loop's body once, not once per iteration, so the LSTM is compiled with its
  scan fully unrolled (``unroll`` = sequence length) for the comparison.
Element-wise work (GELU, softmax, norms, gate non-linearities) is outside the analytic convention and
inside XLA's count; at these sizes it stays within the 15 % band.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmu_jax.config import load_config
from lmu_jax.errors import UserError
from lmu_jax.flops import param_counts, xla_flops
from lmu_jax.models import FAMILIES, build_model
from lmu_jax.models.base import attention_flops
from lmu_jax.models.lmu import LMUConfig, forward_flops_per_token, memory_flops_per_token, table2_flops
from lmu_jax.ops import fft_length
from lmu_jax.sizing import non_embedding_params, paper_width, solve
from lmu_jax.train.commands import flops_table

VOCAB = 256


def test_table2_worked_example_exactly():
    """docs/flops.md's worked example: d = 204, q = 250, q' = 25, n = 1024, d' = 4d, per token per layer."""
    terms = table2_flops(d=204, q=250, q_reduced=25, seq_len=1024, d_ff=4 * 204)
    assert terms == {"lmu_qkv": 1_004_460, "scores": 255_000, "mix": 260_100, "readout": 10_200, "ffn": 1_331_712}


def test_lmu_forward_flops_are_table2_per_layer_plus_unembedding():
    cfg = LMUConfig(d_model=204, n_layers=3, order=250, vocab_size=50257).resolved(50257, 1024)
    assert cfg.reduced_order == 25
    per_layer = sum(table2_flops(204, 250, 25, 1024, 816).values())
    assert forward_flops_per_token(cfg, 1024) == 3 * per_layer + 2 * 204 * 50257
    # The other memory paths are counted by their own formulas, and cost more per token at q = 250.
    assert memory_flops_per_token(cfg, 1024, "chunked") > memory_flops_per_token(cfg, 1024, "fft")
    assert memory_flops_per_token(cfg, 1024, "sequential") == 204 * (2 * 250**2 + 2 * 250 + 6 * 250 * 25)


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs vs XLA


def fft_path_as_xla_counts(cfg, seq_len: int) -> float:
    """Per token, one layer: the folded FFT memory of lmu_jax/ops as XLA's cost analysis counts it."""
    n_fft = fft_length(seq_len)
    bins = n_fft // 2 + 1
    d, q, r = cfg.d_model, cfg.order, 3 * cfg.reduced_order
    per_channel = 8 * math.log2(n_fft) * n_fft + r * 8 * math.log2(n_fft) * bins + r * bins  # rfft, irffts, products
    fold = 2 * (2 * r * q * bins)  # R @ Re(rfft H), R @ Im(rfft H), once per forward
    return (d * per_channel + fold) / seq_len


def analytic_as_xla_counts(cfg, seq_len: int, memory_impl: str | None) -> float:
    family = FAMILIES[cfg.family]
    if cfg.family.startswith("lmu"):
        flops = forward_flops_per_token(cfg, seq_len, memory_impl)
        if memory_impl == "fft":
            flops += cfg.n_layers * (fft_path_as_xla_counts(cfg, seq_len) - memory_flops_per_token(cfg, seq_len, "fft"))
    else:
        flops = family.forward_flops_per_token(cfg, seq_len)
    if cfg.family in ("transformer", "lmu_attn"):  # XLA: the full attention map
        flops += cfg.n_layers * (attention_flops(cfg.d_model, seq_len, causal=False)
                                 - attention_flops(cfg.d_model, seq_len, causal=True))
    return flops


def xla_forward_flops_per_token(cfg, seq_len: int) -> float:
    model = build_model(cfg)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, {}))["params"])
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t, {})[0])
    return xla_flops(forward.lower(params, tokens).compile()) / seq_len


SIZES = [(48, 2, 64), (96, 2, 128), (192, 2, 128)]  # (d_model, n_layers, seq_len)
CASES = [
    ("transformer", {}, None),
    ("lstm", {}, None),
    ("lmu", {"memory_impl": "fft"}, "fft"),
    ("lmu_attn", {"memory_impl": "fft"}, "fft"),
]


@pytest.mark.parametrize("family,keys,memory_impl", CASES, ids=[c[0] for c in CASES])
def test_analytic_flops_within_15_percent_of_xla(family, keys, memory_impl):
    ratios = []
    for d, layers, seq_len in SIZES:
        extra = dict(keys)
        if family in ("transformer", "lmu_attn"):
            extra["n_heads"] = max(1, d // 64)
        if family == "lstm":
            seq_len = 8  # LSTM FLOPs per token do not depend on the length; unrolled, compiles stay short
            extra["unroll"] = seq_len
        cfg = FAMILIES[family].config_cls(family=family, d_model=d, n_layers=layers, **extra).resolved(VOCAB, seq_len)
        ratios.append(xla_forward_flops_per_token(cfg, seq_len) / analytic_as_xla_counts(cfg, seq_len, memory_impl))
    assert all(0.85 <= r <= 1.15 for r in ratios), ratios


def test_chunked_memory_count_within_15_percent_of_xla():
    cfg = LMUConfig(d_model=96, n_layers=2, memory_impl="chunked", chunk_len=32).resolved(VOCAB, 128)
    ratio = xla_forward_flops_per_token(cfg, 128) / analytic_as_xla_counts(cfg, 128, "chunked")
    assert 0.85 <= ratio <= 1.15, ratio


def test_xla_flops_counts_a_loop_body_once():
    """XLA's count of a matmul, and of ten of them in a while loop: the body once, whatever the trip count
    (why the bench reports no XLA count for a program with a loop)."""
    x = jnp.ones((64, 64))
    assert xla_flops(jax.jit(lambda a: a @ a).lower(x).compile()) == pytest.approx(2 * 64**3, rel=0.05)
    looped = jax.jit(lambda a: jax.lax.fori_loop(0, 10, lambda i, b: b @ a, a)).lower(x).compile()
    assert xla_flops(looped) == pytest.approx(2 * 64**3, rel=0.05)


# ---------------------------------------------------------------------------------------------
# Sizing


@pytest.mark.parametrize("family", ["transformer", "lstm", "lmu", "lmu_attn"])
def test_solver_hits_target_within_5_percent(family):
    widths = []
    for target in (50_000, 200_000, 1_000_000):
        cfg = solve(family, target, seq_len=128, vocab_size=VOCAB)
        assert cfg.family == family
        measured = param_counts(cfg.resolved(VOCAB, 128))["non_embedding"]
        assert abs(measured / target - 1) <= 0.05, (target, measured, cfg)
        widths.append(cfg.d_model)
    assert widths == sorted(widths)
    if family == "transformer":  # heads of width <= ~128, even for rotary
        assert cfg.d_model % cfg.n_heads == 0 and (cfg.d_model // cfg.n_heads) % 2 == 0
        assert cfg.d_model // cfg.n_heads <= 128


def test_solver_keeps_the_base_configs_fixed_keys():
    base = LMUConfig(n_layers=3, order=32, q_reduced=4)
    cfg = solve("lmu", 300_000, base_cfg=base, seq_len=64, vocab_size=VOCAB)
    assert (cfg.n_layers, cfg.order, cfg.q_reduced, cfg.theta) == (3, 32, 4, 0.0)
    assert abs(non_embedding_params(cfg, 64, VOCAB) / 300_000 - 1) <= 0.05


def test_fixed_depth_rule_keeps_the_transformers_layers():
    """The default rule gives a 107k transformer one layer (aspect 64); fixed_depth keeps the base's
    two and solves the width, as the LSTM's and LMU's rules do."""
    assert solve("transformer", 107_000, seq_len=256).n_layers == 1
    for target in (6_400, 107_000, 430_000):
        cfg = solve("transformer", target, seq_len=256, rule="fixed_depth")
        assert cfg.n_layers == 2
        assert abs(non_embedding_params(cfg, 256, 256) / target - 1) <= 0.05
    assert solve("transformer", 107_000, seq_len=256, rule="fixed_depth").d_model == 66
    with pytest.raises(UserError, match="search, fixed_depth or paper"):
        solve("transformer", 107_000, rule="widest")


def test_paper_width_rule():
    """d = sqrt(N/24): d ≈ 48 at 55 k and d ≈ 204 at 1 M (docs/lmu.md, the paper's experiment)."""
    assert paper_width(55_000) == 48 and paper_width(1_000_000) == 204
    assert solve("lmu_attn", 1_000_000, rule="paper").d_model == 204


# ---------------------------------------------------------------------------------------------
# Every registered family


def test_transformer_is_causal():
    """(lmu and lmu_attn, for every memory path, and lstm have theirs in their own test files.)"""
    seq_len, t = 24, 10
    cfg = FAMILIES["transformer"].config_cls(d_model=32, n_layers=2, n_heads=2).resolved(VOCAB, seq_len)
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, seq_len), 0, VOCAB)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens, {})["params"])
    params["embed"]["embedding"] = params["embed"]["embedding"] * 25.0  # logits O(1)
    apply = jax.jit(lambda p, t_: model.apply({"params": p}, t_, {})[0])
    before, after = apply(params, tokens), apply(params, tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 3) % VOCAB))
    scale = float(jnp.abs(before).max())
    np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-5 * scale)
    assert float(jnp.abs(after[:, t + 1:] - before[:, t + 1:]).max()) > 1e-3 * scale


@pytest.mark.parametrize("family", ["lstm", "lmu", "lmu_attn"])
def test_flops_table_for_new_families(family):
    cfg = load_config(None, [f"model.family={family}", "model.d_model=64", "data.seq_len=128"])
    rows = dict(flops_table(cfg))
    assert rows["family"] == family
    model_cfg = cfg.model.resolved(int(rows["vocab_size"]), 128)
    assert int(rows["params (non-embedding, N)"].replace(",", "")) == param_counts(model_cfg)["non_embedding"]
    assert float(rows["training FLOPs/token (3 x analytic forward)"]) == pytest.approx(
        3 * FAMILIES[family].forward_flops_per_token(model_cfg, 128), rel=1e-3)
