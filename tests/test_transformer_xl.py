"""Transformer-XL and SCH-TXL: relative shift and memory positions against a naive loop, segment memory
equals one long pass, causality across segments, same_length / clamp_len, per-row resets, the reference
parameter counts, SCH-TXL = Transformer-XL bitwise with its mechanisms off, skip-retain bookkeeping,
shared random draws across devices, FLOPs against XLA, and a few train steps."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lmu_jax.cli import main as cli_main
from lmu_jax.config import config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.flops import param_counts, xla_flops
from lmu_jax.models import get_family, reset_rows
from lmu_jax.models.transformer_xl import (RelativeAttention, SkipCrossHeadConfig, TransformerXL, TransformerXLConfig,
                                           adaptive_io_flops, attention_mask, expected_skip_fraction,
                                           forward_flops_per_token, initial_carry, positional_embeddings, rel_shift,
                                           sinusoid, skip_probabilities)

from helpers import repeated_batch_losses

VOCAB, SEG = 23, 5


def tiny(cls=TransformerXLConfig, **keys):
    defaults = dict(d_model=16, n_layers=2, n_head=2, d_inner=32, dropout=0.0, mem_len=2 * SEG)
    cfg = cls(**{**defaults, **keys}).resolved(VOCAB, SEG)
    cfg.validate()
    return cfg


def init_params(cfg, seed=0):
    tokens = jnp.zeros((1, SEG), jnp.int32)
    return nn.meta.unbox(TransformerXL(cfg).init(jax.random.PRNGKey(seed), tokens, {})["params"])


def random_tokens(seed, batch=2, length=SEG):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, VOCAB)


# ---------------------------------------------------------------------------------------------
# Relative positions against a naive O(L²) loop


def test_rel_shift_equals_gather_at_distance():
    q_len, mem_len = 4, 6
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 3, q_len, mem_len + q_len)))
    shifted = np.asarray(rel_shift(jnp.asarray(x)))
    klen = mem_len + q_len
    for i in range(q_len):
        for j in range(i + mem_len + 1):  # the rest is masked garbage
            # column c of x holds distance klen-1-c; (i, j) needs distance i + mem_len - j
            np.testing.assert_array_equal(shifted[..., i, j], x[..., i, klen - 1 - (i + mem_len - j)])


def numpy_sinusoid(distance, d):
    inv_freq = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    return np.concatenate([np.sin(distance * inv_freq), np.cos(distance * inv_freq)])


def naive_attention(params, h, memory, u, v, valid, distance, head_perm=None):
    """The attention sublayer written as loops over (batch, head, query, key) with an explicit distance."""
    ctx = np.concatenate([memory, h], axis=1)
    batch, q_len, d = h.shape
    mem_len, klen = memory.shape[1], ctx.shape[1]
    wq, wkv = params["query"]["kernel"], params["key_value"]["kernel"]
    wr, wo = params["position"]["kernel"], params["out"]["kernel"]
    n_head, d_head = wq.shape[1:]
    perm = np.arange(n_head) if head_perm is None else np.asarray(head_perm)
    q = np.einsum("bid,dhk->bihk", h, wq)
    k = np.einsum("bjd,dhk->bjhk", ctx, wkv[:, 0])
    val = np.einsum("bjd,dhk->bjhk", ctx, wkv[:, 1])
    out = np.zeros((batch, q_len, n_head, d_head))
    for b in range(batch):
        for hd in range(n_head):
            src = perm[hd]
            for i in range(q_len):
                scores = np.full(klen, -np.inf)
                for j in range(klen):
                    dist = distance(i, j)
                    if dist < 0 or j < mem_len - valid[b]:
                        continue
                    r = numpy_sinusoid(dist, d) @ wr[:, src]
                    scores[j] = ((q[b, i, hd] + u[hd]) @ k[b, j, src] + (q[b, i, hd] + v[hd]) @ r) / math.sqrt(d_head)
                probs = np.exp(scores - scores.max())
                out[b, i, hd] = (probs / probs.sum()) @ val[b, :, src]
    y = h + np.einsum("bihk,hkd->bid", out, wo)
    norm = params["norm"]["LayerNorm_0"]
    mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    return (y - mean) / np.sqrt(var + 1e-5) * norm["scale"] + norm["bias"]


@pytest.mark.parametrize("case", ["standard", "partial_memory", "aged_memory", "clamped", "cross_head"])
def test_relative_attention_matches_naive_loop(case):
    batch, q_len, mem_len, d, n_head, d_head = 2, 4, 5, 8, 2, 3
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    h = np.asarray(jax.random.normal(keys[0], (batch, q_len, d)))
    memory = np.asarray(jax.random.normal(keys[1], (batch, mem_len, d)))
    u, v = (np.asarray(jax.random.normal(k, (n_head, d_head))) for k in keys[2:4])
    valid = np.array([mem_len, 2]) if case == "partial_memory" else np.array([mem_len, mem_len])
    cfg = TransformerXLConfig(d_model=d, clamp_len=3 if case == "clamped" else 0)
    klen, age_offset = mem_len + q_len, 7.0
    pos_emb = positional_embeddings(cfg, klen, train=case != "clamped")
    aged = positional_embeddings(cfg, klen, train=True, offset=age_offset) if case == "aged_memory" else None
    perm = jnp.array([1, 0]) if case == "cross_head" else None
    module = RelativeAttention(n_head, d_head)
    args = (jnp.asarray(h), jnp.asarray(memory), attention_mask(q_len, mem_len, jnp.asarray(valid)), pos_emb,
            jnp.asarray(u), jnp.asarray(v))
    params = module.init(keys[4], *args, train=False)["params"]
    got = module.apply({"params": params}, *args, train=False, aged_pos_emb=aged, head_perm=perm)

    def distance(i, j):
        dist = i + mem_len - j  # memory keys are further away than segment keys
        if case == "aged_memory" and j < mem_len:
            dist += age_offset  # a retained memory's distances grow by its age
        if case == "clamped":
            dist = min(dist, cfg.clamp_len) if dist >= 0 else dist
        return dist

    want = naive_attention(jax.tree.map(np.asarray, nn.meta.unbox(params)), h, memory, u, v, valid, distance, perm)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_retained_memory_distances_follow_the_age():
    """Spec §2.2a: for a memory of age a = c − b_l, key distances seen from the segment's last query run
    a·T + M − 1 ... a·T for the memory and T − 1 ... 0 for the segment; a = 1 is plain Transformer-XL.
    The carry stores the extra age a − 1, which offsets the memory's sinusoids by (a − 1)·T."""
    cfg, seg_len, mem_len = TransformerXLConfig(d_model=8), 4, 6
    standard = np.asarray(positional_embeddings(cfg, mem_len + seg_len, train=True))
    segment = np.stack([numpy_sinusoid(x, 8) for x in range(seg_len - 1, -1, -1)])
    np.testing.assert_allclose(standard[mem_len:], segment, atol=1e-5)
    for age in (1, 2, 5):
        aged = np.asarray(positional_embeddings(cfg, mem_len + seg_len, train=True, offset=(age - 1) * seg_len))
        memory = np.stack([numpy_sinusoid(x, 8) for x in range(age * seg_len + mem_len - 1, age * seg_len - 1, -1)])
        np.testing.assert_allclose(aged[:mem_len], memory, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Segment memory


@pytest.fixture(scope="module")
def txl():
    cfg = tiny()
    return cfg, TransformerXL(cfg), init_params(cfg)


def run_segments(model, params, tokens, carry, **kw):
    logits = []
    for start in range(0, tokens.shape[1], SEG):
        out, carry = model.apply({"params": params}, tokens[:, start:start + SEG], carry, **kw)
        logits.append(out)
    return jnp.concatenate(logits, axis=1), carry


def test_segment_memory_equals_one_long_pass(txl):
    """Spec §7.2: with mem_len >= everything before a segment, segment k with memory = the same positions
    of one pass over all segments. Three segments of 5 with M = 10; the first equals the call with the empty carry."""
    cfg, model, params = txl
    tokens = random_tokens(3, length=3 * SEG)
    one_pass = model.apply({"params": params}, tokens, {})[0]
    segmented, carry = run_segments(model, params, tokens, initial_carry(cfg, 2))
    np.testing.assert_allclose(segmented, one_pass, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(carry["valid"], np.full((2, cfg.n_layers), cfg.mem_len))
    first = model.apply({"params": params}, tokens[:, :SEG], {})[0]
    # to rounding: the empty memory's masked columns change the matmul shapes, hence XLA's summation order
    np.testing.assert_allclose(model.apply({"params": params}, tokens[:, :SEG], initial_carry(cfg, 2))[0], first,
                               rtol=1e-5, atol=1e-7)


def test_causal_within_and_across_segments(txl):
    """Segment 2's logits never see segment 2's future tokens, and do see segment 1 (through the memory)."""
    cfg, model, params = txl
    seg1, seg2 = random_tokens(4), random_tokens(5)
    _, memory = model.apply({"params": params}, seg1, initial_carry(cfg, 2))
    before, _ = model.apply({"params": params}, seg2, memory)
    t = 2
    changed = seg2.at[:, t + 1:].set((seg2[:, t + 1:] + 5) % VOCAB)
    after, _ = model.apply({"params": params}, changed, memory)
    np.testing.assert_array_equal(after[:, : t + 1], before[:, : t + 1])
    assert np.abs(after[:, t + 1:] - before[:, t + 1:]).max() > 1e-4
    _, other_memory = model.apply({"params": params}, (seg1 + 3) % VOCAB, initial_carry(cfg, 2))
    assert np.abs(model.apply({"params": params}, seg2, other_memory)[0] - before).max() > 1e-4
    stateless = model.apply({"params": params}, seg2, {})[0]
    for t in (0, 3):  # and the path without memory is causal too
        changed = seg2.at[:, t + 1:].set((seg2[:, t + 1:] + 1) % VOCAB)
        after = model.apply({"params": params}, changed, {})[0]
        np.testing.assert_array_equal(after[:, : t + 1], stateless[:, : t + 1])


def test_reset_rows_starts_a_fresh_stream(txl):
    cfg, model, params = txl
    tokens = random_tokens(6, length=2 * SEG)
    _, carry = run_segments(model, params, tokens, initial_carry(cfg, 2))
    carry = reset_rows(carry, jnp.array([True, False]))
    assert not np.any(carry["mems"][0]) and np.all(carry["valid"][0] == 0) and np.all(carry["valid"][1] > 0)
    nxt = random_tokens(7)
    logits, _ = model.apply({"params": params}, nxt, carry)
    np.testing.assert_allclose(logits[0], model.apply({"params": params}, nxt, {})[0][0], rtol=1e-6, atol=1e-6)
    assert np.abs(logits[1] - model.apply({"params": params}, nxt, {})[0][1]).max() > 1e-4


def test_same_length_and_clamp_len_act_at_evaluation():
    cfg = tiny(mem_len=SEG, same_length=True, clamp_len=2)
    model, params = TransformerXL(cfg), init_params(cfg)
    # same_length: every query sees exactly M keys, so the oldest memory row (distance >= M) is invisible
    mask = attention_mask(SEG, SEG, jnp.array([SEG]), window=SEG)
    np.testing.assert_array_equal(mask.sum(-1), SEG)
    _, carry = model.apply({"params": params}, random_tokens(8), initial_carry(cfg, 2))
    poked = dict(carry, mems=carry["mems"].at[:, :, 0].add(3.0))
    tokens = random_tokens(9)
    same = model.apply({"params": params}, tokens, carry)[0]
    np.testing.assert_array_equal(model.apply({"params": params}, tokens, poked)[0], same)
    plain = TransformerXL(dataclasses.replace(cfg, same_length=False, clamp_len=0))
    assert np.abs(plain.apply({"params": params}, tokens, poked)[0]
                  - plain.apply({"params": params}, tokens, carry)[0]).max() > 1e-4
    # clamp_len: distances above it reuse its embedding, at evaluation only
    clamped = positional_embeddings(cfg, 6, train=False)
    np.testing.assert_array_equal(clamped, sinusoid(jnp.array([2, 2, 2, 2, 1, 0.0]), cfg.d_model))
    np.testing.assert_array_equal(positional_embeddings(cfg, 6, train=True), sinusoid(jnp.arange(5, -1, -1.0), 16))
    train_same = model.apply({"params": params}, tokens, carry, train=True, rngs={"dropout": jax.random.PRNGKey(0)})[0]
    train_plain = plain.apply({"params": params}, tokens, carry, train=True, rngs={"dropout": jax.random.PRNGKey(0)})[0]
    np.testing.assert_array_equal(train_same, train_plain)


@pytest.mark.parametrize("div_val", [1, 2])
def test_adaptive_softmax_is_a_normalised_two_level_distribution(div_val):
    """log p(token in tail i) = log p_head(cluster i) + log p_tail_i(token): the vocabulary sums to 1."""
    cfg = tiny(adaptive_cutoffs=(6, 15), div_val=div_val, tie_embeddings=div_val == 1)
    model, params = TransformerXL(cfg), init_params(cfg)
    for name in ("cluster_weight", "out_bias"):  # non-trivial cluster logits and biases
        params["io"][name] = jax.random.normal(jax.random.PRNGKey(4), params["io"][name].shape)
    log_probs, _ = model.apply({"params": params}, random_tokens(18), {})
    np.testing.assert_allclose(np.exp(np.asarray(log_probs, np.float64)).sum(-1), 1.0, rtol=1e-5)
    # the trainer's log_softmax leaves normalised log-probabilities as they are
    np.testing.assert_allclose(jax.nn.log_softmax(log_probs, axis=-1), log_probs, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Parameter counts of the reference configurations (docs/architectures.md)


def reference_count(vocab, n_layer, d, n_head, d_head, d_inner, cutoffs=(), div_val=1, tied=True):
    """Parameters of kimiyoung/transformer-xl MemTransformerLM (and the SCH-TXL code, same layers):
    qkv/o/r nets without bias, two LayerNorms, FF with biases, shared u and v; the (adaptive) input
    embedding and a (projected adaptive) softmax whose out_layers always have a bias."""
    attn = d * 3 * n_head * d_head + n_head * d_head * d + d * n_head * d_head + 2 * d
    ff = d * d_inner + d_inner + d_inner * d + d + 2 * d
    ends = (0, *cutoffs, vocab)
    widths = [d] if div_val == 1 else [d // div_val**i for i in range(len(ends) - 1)]
    sizes = [vocab] if div_val == 1 else [ends[i + 1] - ends[i] for i in range(len(ends) - 1)]
    tables = sum(w * n for w, n in zip(widths, sizes))
    projections = 0 if div_val == 1 else sum(w * d for w in widths)
    clusters = len(cutoffs) * (d + 1)
    io = (1 if tied else 2) * (tables + projections) + vocab + clusters
    return n_layer * (attn + ff) + 2 * n_head * d_head + io, n_layer * (attn + ff) + 2 * n_head * d_head


PAPER_CONFIGS = {  # (config, total M, non-embedding M) as the references give them; None = not stated
    "enwik8 base 12L": (TransformerXLConfig(vocab_size=204, d_model=512, n_layers=12, n_head=8, d_head=64,
                                            d_inner=2048), "41.06", None),
    "WT103 base": (TransformerXLConfig(vocab_size=267735, d_model=410, n_layers=16, n_head=10, d_head=41, d_inner=2100,
                                       adaptive_cutoffs=(20000, 40000, 200000)), "151.1", "41.07"),
    "enwik8 24L": (TransformerXLConfig(vocab_size=204, d_model=1024, n_layers=24, n_head=8, d_head=128,
                                       d_inner=3072), None, "277.0"),
    "SCH-TXL WT103": (SkipCrossHeadConfig(vocab_size=267735, d_model=624, n_layers=15, n_head=16, d_head=39,
                                          d_inner=2496, adaptive_cutoffs=(20000, 40000, 200000), div_val=4,
                                          tie_embeddings=False), "122.2", "76.0"),
}


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
def test_parameter_counts_match_the_papers(name):
    cfg, total_m, non_embedding_m = PAPER_CONFIGS[name]
    cfg.validate()
    counts = param_counts(cfg)
    decimals = lambda text: len(text.split(".")[1])  # noqa: E731
    if total_m:
        assert f"{counts['total'] / 1e6:.{decimals(total_m)}f}" == total_m, counts
    if non_embedding_m:
        assert f"{counts['non_embedding'] / 1e6:.{decimals(non_embedding_m)}f}" == non_embedding_m, counts
    total, layers = reference_count(cfg.vocab_size, cfg.n_layers, cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_inner,
                                    cfg.adaptive_cutoffs, cfg.div_val, cfg.tie_embeddings)
    assert (counts["total"], counts["non_embedding"]) == (total, layers)


def test_24_layer_total_includes_the_byte_embedding():
    """The reference's 277.0 M is the layer count; with the 204-symbol embedding and output bias the total is
    277.23 M (stated here so nobody 'fixes' one into the other)."""
    cfg = PAPER_CONFIGS["enwik8 24L"][0]
    assert param_counts(cfg)["total"] == 277_231_820


# ---------------------------------------------------------------------------------------------
# SCH-TXL


def test_sch_txl_with_mechanisms_off_is_transformer_xl_bitwise(txl):
    cfg, model, params = txl
    sch = TransformerXL(tiny(SkipCrossHeadConfig, skip_prob_scale=0.0, ch_prob=0.0, dropout=0.1))
    base = TransformerXL(dataclasses.replace(cfg, dropout=0.1))
    tokens, rngs = random_tokens(10, length=2 * SEG), {"dropout": jax.random.PRNGKey(1), "skip": jax.random.PRNGKey(2)}
    for train in (True, False):
        got = run_segments(sch, params, tokens, initial_carry(sch.cfg, 2), train=train, rngs=rngs)[0]
        want = run_segments(base, params, tokens, initial_carry(base.cfg, 2), train=train, rngs=rngs)[0]
        np.testing.assert_array_equal(got, want)
    # in evaluation, the phase-1 defaults (skips, cross-head) are off as well
    default_sch = TransformerXL(tiny(SkipCrossHeadConfig))
    carry = initial_carry(default_sch.cfg, 2)
    np.testing.assert_array_equal(default_sch.apply({"params": params}, tokens[:, :SEG], carry)[0],
                                  model.apply({"params": params}, tokens[:, :SEG], initial_carry(cfg, 2))[0])


def test_skip_schedule_and_expected_saving():
    assert skip_probabilities(4, 0.5) == (0.0, 0.125, 0.25, 0.0)  # first and last layers never skipped
    assert round(100 * expected_skip_fraction(12), 1) == 19.1
    assert round(100 * expected_skip_fraction(15), 1) == 20.2
    cfg = tiny(SkipCrossHeadConfig, n_layers=12, vocab_size=VOCAB)
    full = forward_flops_per_token(dataclasses.replace(cfg, skip_prob_scale=0.0), SEG)
    io = adaptive_io_flops(cfg)
    assert forward_flops_per_token(cfg, SEG) - io == pytest.approx((full - io) * (1 - expected_skip_fraction(12)))


def test_skip_retain_keeps_and_ages_the_memory():
    cfg = tiny(SkipCrossHeadConfig, n_layers=4, skip_prob_scale=1.0, ch_prob=0.0)
    model, params = TransformerXL(cfg), init_params(cfg)
    _, carry = model.apply({"params": params}, random_tokens(11), initial_carry(cfg, 2))
    carry = dict(carry, age=jnp.full_like(carry["age"], 3))
    tokens, skipped_layers = random_tokens(12), set()
    apply = jax.jit(lambda key: model.apply({"params": params}, tokens, carry, train=True,
                                            rngs={"dropout": key, "skip": key})[1])
    for seed in range(6):
        new = apply(jax.random.PRNGKey(seed))
        for layer in range(cfg.n_layers):
            kept = bool(np.array_equal(new["mems"][:, layer], carry["mems"][:, layer]))
            if kept:  # skipped: memory and its valid count kept, one segment older
                skipped_layers.add(layer)
                np.testing.assert_array_equal(new["age"][:, layer], 4)
                np.testing.assert_array_equal(new["valid"][:, layer], SEG)
            else:  # ran: this segment's input appended (M = 2 segments now full), age back to 0
                np.testing.assert_array_equal(new["age"][:, layer], 0)
                np.testing.assert_array_equal(new["valid"][:, layer], 2 * SEG)
                np.testing.assert_array_equal(new["mems"][:, layer, :SEG], carry["mems"][:, layer, SEG:])
    assert skipped_layers and skipped_layers <= {1, 2}, skipped_layers  # p = 0, 1/4, 1/2, 0


def test_aged_memory_positions_are_used_by_the_model():
    """Skip path with zero extra age = plain Transformer-XL (to rounding: the layer then runs inside a
    compiled lax.cond, the plain model op by op); an aged memory changes the output."""
    cfg = tiny(SkipCrossHeadConfig, n_layers=3, skip_prob_scale=1e-9, ch_prob=0.0)  # skip path on, never skips
    model, params = TransformerXL(cfg), init_params(cfg)
    for layer in range(cfg.n_layers):  # strong positional attention, so positions show in the logits
        attn = params[f"layers_{layer}"]["attn"]
        for name in ("query", "position"):
            attn[name]["kernel"] = attn[name]["kernel"] * 30.0
    base = TransformerXL(tiny(n_layers=3))
    _, carry = model.apply({"params": params}, random_tokens(13), initial_carry(cfg, 2))
    tokens, rngs = random_tokens(14), {"dropout": jax.random.PRNGKey(0), "skip": jax.random.PRNGKey(0)}
    fresh = model.apply({"params": params}, tokens, carry, train=True, rngs=rngs)[0]
    base_carry = {k: carry[k] for k in ("mems", "valid")}
    np.testing.assert_allclose(fresh, base.apply({"params": params}, tokens, base_carry, train=True, rngs=rngs)[0],
                               rtol=1e-5, atol=1e-6)
    aged = dict(carry, age=carry["age"].at[:, 1].set(2))
    assert np.abs(model.apply({"params": params}, tokens, aged, train=True, rngs=rngs)[0] - fresh).max() > 1e-5


def test_cross_head_permutes_in_training_only():
    cfg = tiny(SkipCrossHeadConfig, n_head=4, skip_prob_scale=0.0, ch_prob=1.0)
    model, params = TransformerXL(cfg), init_params(cfg)
    off = TransformerXL(dataclasses.replace(cfg, ch_prob=0.0))
    tokens, rngs = random_tokens(15), {"dropout": jax.random.PRNGKey(0), "skip": jax.random.PRNGKey(3)}
    train_on = model.apply({"params": params}, tokens, {}, train=True, rngs=rngs)[0]
    assert np.abs(train_on - off.apply({"params": params}, tokens, {}, train=True, rngs=rngs)[0]).max() > 1e-4
    np.testing.assert_array_equal(model.apply({"params": params}, tokens, {})[0],
                                  off.apply({"params": params}, tokens, {})[0])


def test_random_draws_are_shared_across_devices():
    """Skips and permutations come from the replicated `skip` key: a batch split over 8 devices gives the
    rows of the single-device run."""
    cfg = tiny(SkipCrossHeadConfig, n_layers=3, n_head=4, skip_prob_scale=1.0, ch_prob=0.5)
    model, params = TransformerXL(cfg), init_params(cfg)
    tokens = random_tokens(16, batch=8)
    rngs = {"dropout": jax.random.PRNGKey(0), "skip": jax.random.PRNGKey(7)}
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t, {}, train=True, rngs=rngs)[0])
    single = apply(params, tokens)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = apply(params, jax.device_put(tokens, NamedSharding(mesh, P("data", None))))
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Config, registry, FLOPs, training


def test_config_keys_resolve_and_validate():
    cfg = config_from_dict({"model": {"family": "transformer_xl", "n_head": 4, "d_head": 8, "d_inner": 64,
                                      "adaptive_cutoffs": [100, 200], "div_val": 2}}).model
    assert cfg.adaptive_cutoffs == (100, 200) and cfg.resolved(300, 64).mem_len == 64
    for bad in ({"n_head": 0}, {"dropout": 1.0}, {"adaptive_cutoffs": [5, 3]}, {"div_val": 0}, {"mem_len": -1}):
        with pytest.raises(UserError):
            config_from_dict({"model": {"family": "transformer_xl", **bad}})
    with pytest.raises(UserError):
        config_from_dict({"model": {"family": "sch_txl", "skip_age": "sometimes"}})


def test_families_are_listed(capsys):
    assert cli_main(["flops", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"transformer_xl", "sch_txl"} <= set(listed)
    assert get_family("sch_txl").initial_carry is initial_carry


@pytest.mark.parametrize("with_memory", [True, False])
def test_analytic_flops_match_xla(with_memory):
    """Forward FLOPs of one segment: the analytic count (× tokens) against XLA's cost_analysis of the
    compiled forward. XLA also counts element-wise work (softmax, norms, masks) and r_net; the analytic
    count is matmuls and score maps only, so a few percent above 1 is expected."""
    batch, seg_len = 4, 32
    cfg = TransformerXLConfig(d_model=128, n_layers=2, n_head=4, d_inner=512, dropout=0.0, mem_len=seg_len,
                              adaptive_cutoffs=(64, 128), div_val=2).resolved(256, seg_len)
    model, tokens = TransformerXL(cfg), jnp.zeros((batch, seg_len), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, {}))["params"])
    if with_memory:
        forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s)[0])
        xla = xla_flops(forward.lower(params, tokens, initial_carry(cfg, batch)).compile())
    else:  # the empty carry: no memory rows computed
        xla = xla_flops(jax.jit(lambda p, t: model.apply({"params": p}, t, {})[0]).lower(params, tokens).compile())
    analytic = forward_flops_per_token(cfg, seg_len, feeds_carry=with_memory) * batch * seg_len
    assert 0.95 < xla / analytic < 1.15, (xla, analytic)


def test_sch_txl_flops_match_xla():
    """SCH-TXL in training (skip-retain and cross-head on, memory carried). XLA counts a lax.cond as the
    layer running, so it is compared with the count of a step that skips nothing; the analytic count of
    phase 1 is that times the expected share of layers that run (test_skip_schedule_and_expected_saving)."""
    batch, seg_len = 4, 32
    cfg = SkipCrossHeadConfig(d_model=128, n_layers=3, n_head=4, d_inner=512, dropout=0.0, mem_len=seg_len,
                              skip_prob_scale=1.0, ch_prob=0.5).resolved(256, seg_len)
    model, tokens = TransformerXL(cfg), jnp.zeros((batch, seg_len), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, {}))["params"])
    rngs = {"dropout": jax.random.PRNGKey(0), "skip": jax.random.PRNGKey(1)}
    forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s, train=True, rngs=rngs)[0])
    xla = xla_flops(forward.lower(params, tokens, initial_carry(cfg, batch)).compile())
    every_layer = forward_flops_per_token(dataclasses.replace(cfg, skip_prob_scale=0.0), seg_len) * batch * seg_len
    assert 0.95 < xla / every_layer < 1.15, (xla, every_layer)


def test_sch_txl_is_causal_across_segments_with_its_mechanisms_on():
    """Training mode, skips and cross-head permutations on (the same draws for both calls): changing
    tokens after t in segment 2 never changes its logits at <= t; segment 1 reaches it through the memory."""
    cfg = tiny(SkipCrossHeadConfig, n_layers=4, n_head=4, skip_prob_scale=1.0, ch_prob=1.0)
    model, params = TransformerXL(cfg), init_params(cfg)
    rngs = {"dropout": jax.random.PRNGKey(0), "skip": jax.random.PRNGKey(5)}
    apply = jax.jit(lambda t, s: model.apply({"params": params}, t, s, train=True, rngs=rngs))
    seg1, seg2 = random_tokens(20), random_tokens(21)
    _, memory = apply(seg1, initial_carry(cfg, 2))
    before = apply(seg2, memory)[0]
    for t in (0, 2):
        after = apply(seg2.at[:, t + 1:].set((seg2[:, t + 1:] + 4) % VOCAB), memory)[0]
        np.testing.assert_array_equal(after[:, :t + 1], before[:, :t + 1])
        assert np.abs(after[:, t + 1:] - before[:, t + 1:]).max() > 1e-4
    _, other_memory = apply((seg1 + 2) % VOCAB, initial_carry(cfg, 2))
    assert np.abs(apply(seg2, other_memory)[0] - before).max() > 1e-4


@pytest.mark.parametrize("family", ["transformer_xl", "sch_txl"])
def test_a_few_train_steps_lower_the_loss(family):
    """The trainer call path with the empty carry (no memory); SCH-TXL with skips and cross-head on."""
    cls = SkipCrossHeadConfig if family == "sch_txl" else TransformerXLConfig
    cfg = tiny(cls, d_model=16, n_layers=3 if cls is SkipCrossHeadConfig else 2, n_head=2, d_inner=32, dropout=0.1)
    model = TransformerXL(cfg)
    windows = random_tokens(17, batch=4, length=12 + 1)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), windows[:, :-1], {})["params"])
    losses = repeated_batch_losses(model, params, windows, lr=1e-2, steps=6)
    assert all(math.isfinite(loss) for loss in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.15, losses


@pytest.mark.parametrize("family", ["transformer_xl", "sch_txl"])
def test_sizes_with_the_solver(family):
    from lmu_jax.sizing import solve

    cfg = solve(family, 100_000, seq_len=32).resolved(256, 32)
    cfg.validate()
    assert abs(param_counts(cfg, 32)["non_embedding"] / 100_000 - 1) <= 0.05


@pytest.mark.parametrize("name", ["transformer_xl_enwik8_base", "sch_txl_enwik8_phase1", "sch_txl_enwik8_phase2"])
def test_experiment_configs_load(name):
    from lmu_jax.config import load_config

    from helpers import REPO

    cfg = load_config(REPO / "experiments" / "configs" / f"{name}.yaml")
    model = cfg.model.resolved(258, cfg.data.seq_len)  # byte ids
    assert param_counts(model, 16)["total"] == 41_083_138  # the 41.06 M model with 258 instead of 204 ids
    assert model.mem_len == cfg.data.seq_len == 512 and model.memory_length(evaluation=True) > 512
