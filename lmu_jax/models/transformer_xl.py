"""Transformer-XL (Dai et al. 2019) and Skip Cross-head Transformer-XL (Vishnu & Sekhar 2023):
families ``transformer_xl`` and ``sch_txl`` (docs/architectures.md).

One layer, post-LN as in the reference code (``pre_lnorm`` moves the norms in front):

    h̃ = [SG(memory) ; h]                                 memory = this layer's *input* from earlier segments
    q = h W_q,  k = h̃ W_k,  v = h̃ W_v,  r = sinusoid(distance) W_r
    score_ij = ((q_i + u)·k_j + rel_shift((q + v)·rᵀ)_ij) / √d_head,   distance(i, j) = i + M − j
    h = LN(h + W_o softmax(mask(score)) v);   h = LN(h + W_2 ReLU(W_1 h + b_1) + b_2)

u, v are shared by all layers (PyTorch reference; ``untie_r`` gives each layer its own, as the TF WT103
scripts). Embeddings are scaled by √d_model; dropout hits the word and the positional embeddings, every
sublayer output, the FF hidden layer and the final hidden state. Keys and values of the memory rows are
re-projected every segment (the reference also computes and discards their queries; we do not).

The carry (the memory a trainer feeds from segment to segment of ordered contiguous streams):

    logits, carry = model.apply(variables, tokens, carry, train=..., rngs=...)   memory in, memory out
    carry = initial_carry(cfg, batch, evaluation=False)                          an empty memory: all zeros
    logits, {} = model.apply(variables, tokens, {}, train=..., rngs=...)         the empty carry: no memory

The carry is a dict of arrays whose leading axis is the batch row:
``mems`` (batch, n_layers, M, d_model) -- each layer's input over the last M positions, oldest first;
``valid`` (batch, n_layers) int32 -- how many of those M rows hold real inputs (the rest are masked);
``age`` (batch, n_layers) int32, ``sch_txl`` only -- how many segments older than usual the memory is.
A fresh stream is all zeros, so the trainer resets row b by zeroing row b of every leaf
(``lmu_jax.models.reset_rows``). M is read from the carry's shape, so evaluation may use a longer memory
(``evaluation=True`` -> ``eval_mem_len``). Gradients never flow into the carry (stop-gradient).

``clamp_len`` and ``same_length`` act only when ``train=False`` (the reference run scripts pass them
to eval.py only). The first segment of a stream with a zero carry equals the call with the empty one.

Softmax: full (``adaptive_cutoffs=()``) or adaptive (Grave et al. 2017; Baevski & Auli 2019) with
``div_val``. The adaptive head returns normalised log-probabilities over the whole vocabulary, so the
trainer's log-softmax leaves them unchanged; the output layer always has a bias, as in the reference.

SCH-TXL adds, in training only, with randomness from the ``skip`` rng stream (replicated, so every
device draws the same): phase-1 "skip-retain" -- layer l is the identity with probability
``skip_prob_scale``·l/L (the last layer never), its memory is kept and ages, and the aged memory's
distances grow by age·L; and the cross-head regulariser -- per layer and step, with probability
``ch_prob``, query head h uses the keys, values and positional keys of head π(h). Phase 2 is
``skip_prob_scale=0``. With both off it runs exactly the Transformer-XL code path.

Where the official SCH-TXL code (vishwajit-vishnu/Memory-efficient-Stochastic-methods-for-Memory-based-
Transformers, models.py) differs from this, the definition here wins (our Transformer-XL + the two
mechanisms): its attention has no rel_shift (the positional term depends on the key's distance from the
segment's end, not from the query); its per-layer counter ``mem_block_position += 1`` makes a memory's age
1 + (skips so far) rather than the segments since it was written (``skip_age=cumulative`` reproduces
that; it is rebased after each evaluation pass there); u, v start at N(0, 1); its adaptive softmax orders
the cluster logits the other way round (a relabelling).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmu_jax.errors import bad_value
from lmu_jax.models.base import Family, ModelConfig, dense_flops
from lmu_jax.models.layers import DEFAULT_INIT, Dense, Norm, dtype_of, partitioned

PROJ_INIT = nn.initializers.normal(stddev=0.01)  # adaptive-IO projections (reference proj_init_std)
MASKED = -1e30  # score of a masked key; finite, so a row is never NaN


def layer_norm_scale_init(key, shape, dtype=jnp.float32):
    """LayerNorm weight ~ N(1, 0.02), as the reference's weights_init."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


@dataclass(frozen=True)
class TransformerXLConfig(ModelConfig):
    family: str = "transformer_xl"
    n_head: int = 2  # attention heads
    d_head: int = 0  # width of one head (0 = d_model // n_head); n_head * d_head may differ from d_model
    d_inner: int = 0  # feed-forward hidden width (0 = 4 * d_model)
    mem_len: int = 0  # M: inputs cached per layer in training (0 = data.seq_len, as in the base configs)
    eval_mem_len: int = 0  # M at evaluation (0 = mem_len); the reference evaluates enwik8 base with 2100
    clamp_len: int = 0  # evaluation: distances above this reuse clamp_len's embedding (0 = off)
    same_length: bool = False  # evaluation: every query attends to exactly its M most recent keys
    pre_lnorm: bool = False  # norms before the sublayers (reference option; default post-LN)
    dropout: float = 0.1  # embeddings, positional embeddings, sublayer outputs, FF hidden, final hidden
    dropatt: float = 0.0  # on the attention probabilities
    untie_r: bool = False  # per-layer u, v (TF WT103 scripts) instead of one pair shared by all layers
    adaptive_cutoffs: tuple[int, ...] = ()  # adaptive input+softmax cluster starts, e.g. [20000, 40000, 200000]
    div_val: int = 1  # adaptive: cluster i has width d_model // div_val**i (1 = one table, no projections)

    @property
    def head_width(self) -> int:
        return self.d_head or max(1, self.d_model // self.n_head)

    @property
    def attn_width(self) -> int:
        return self.n_head * self.head_width

    @property
    def ff_width(self) -> int:
        return self.d_inner or 4 * self.d_model

    def memory_length(self, evaluation: bool = False) -> int:
        return (self.eval_mem_len or self.mem_len) if evaluation else self.mem_len

    def eval_context(self) -> dict:
        return {"memory_length": self.memory_length(evaluation=True), "clamp_len": self.clamp_len,
                "same_length": self.same_length}

    def skip_probabilities(self) -> tuple[float, ...]:
        return (0.0,) * self.n_layers  # Transformer-XL never skips

    def resolved(self, vocab_size: int, seq_len: int) -> "TransformerXLConfig":
        cfg = super().resolved(vocab_size, seq_len)
        return replace(cfg, mem_len=cfg.mem_len or seq_len)

    def validate(self) -> None:
        super().validate()
        if self.n_head <= 0:
            raise bad_value("model.n_head", self.n_head, "a positive int")
        for name in ("d_head", "d_inner", "mem_len", "eval_mem_len", "clamp_len"):
            if getattr(self, name) < 0:
                raise bad_value(f"model.{name}", getattr(self, name), "0 (default) or a positive int")
        for name in ("dropout", "dropatt"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad_value(f"model.{name}", getattr(self, name), "a probability in [0, 1)")
        cutoffs = self.adaptive_cutoffs
        vocab_ok = self.vocab_size == 0 or (cutoffs and cutoffs[-1] < self.vocab_size)
        if cutoffs and (cutoffs[0] <= 0 or list(cutoffs) != sorted(set(cutoffs)) or not vocab_ok):
            raise bad_value("model.adaptive_cutoffs", list(cutoffs),
                            f"strictly increasing ints in (0, vocab_size={self.vocab_size}), or [] (full softmax)")
        if self.div_val < 1 or self.d_model // self.div_val ** len(cutoffs) < 1:
            raise bad_value("model.div_val", self.div_val,
                            f"an int >= 1 with d_model // div_val**{len(cutoffs)} >= 1")


# ---------------------------------------------------------------------------------------------
# Relative positions


def sinusoid(positions, d_model: int):
    """The reference's position embedding: [sin(p·f), cos(p·f)] (sin block, then cos block). An odd
    d_model (which the reference cannot run) drops the last cos column, so every width can be sized."""
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)[:, :d_model]


def rel_shift(x):
    """The reference's _rel_shift on the last two axes (queries, keys): out[i, j] = x[i, j + q − 1 − i].

    x[..., i, c] scores query i against the position embedding of column c, whose distance is
    klen − 1 − c; after the shift, column j holds distance i + (klen − q) − j. Entries with
    j > i + klen − q read the next row (garbage); the causal mask removes them.
    """
    *lead, q, k = x.shape
    padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # zero column on the left
    return padded.reshape(*lead, k + 1, q)[..., 1:, :].reshape(*lead, q, k)


def attention_mask(q_len: int, mem_len: int, valid, window: int = 0):
    """(batch, 1, q_len, mem_len + q_len) True where query i may see key j.

    Keys are [memory (mem_len rows, of which the last `valid` are real) ; the segment]; distance
    i + mem_len − j must be >= 0 (causal) and, with `window` > 0 (same_length), < window.
    """
    i = jnp.arange(q_len)[:, None]
    j = jnp.arange(mem_len + q_len)[None, :]
    distance = i + mem_len - j
    allowed = distance >= 0
    if window:
        allowed &= distance < window
    real = j[None] >= (mem_len - valid)[:, None, None]  # (batch, 1, klen)
    return (allowed[None] & real)[:, None]


# ---------------------------------------------------------------------------------------------
# Sublayers (also the A and F blocks of the hybrid in qrnn.py)


class LayerNorm(Norm):
    """The project's float32 LayerNorm with the reference's epsilon and N(1, 0.02) weight init."""

    epsilon: float = 1e-5
    scale_init: Callable = layer_norm_scale_init


def _head_projection(features, name, dtype, use_bias=False):
    return nn.DenseGeneral(features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, name=name,
                           kernel_init=partitioned(DEFAULT_INIT, ("embed",) + (None,) * (len(features) - 2)
                                                   + ("heads", "kv")))


class RelativeAttention(nn.Module):
    """One attention sublayer: relative multi-head attention over [memory ; h], residual and LayerNorm."""

    n_head: int
    d_head: int
    dropout: float = 0.0
    dropatt: float = 0.0
    pre_lnorm: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, memory, mask, pos_emb, u, v, *, train: bool, aged_pos_emb=None, head_perm=None):
        """h (B, L, d); memory (B, M, d) or None; mask (B, 1, L, M+L); pos_emb (M+L, d) for distances
        M+L−1 ... 0; aged_pos_emb: the same for the memory columns of an aged (retained) memory;
        head_perm (n_head,) int: key/value/position head used by each query head (cross-head)."""
        norm = LayerNorm(self.dtype, name="norm")
        context = h if memory is None else jnp.concatenate([memory.astype(h.dtype), h], axis=1)
        mem_len = context.shape[1] - h.shape[1]
        if self.pre_lnorm:
            context = norm(context)
        heads = (self.n_head, self.d_head)
        q = _head_projection(heads, "query", self.dtype)(context[:, mem_len:])
        k, val = jnp.moveaxis(_head_projection((2,) + heads, "key_value", self.dtype)(context), -3, 0)
        r_net = _head_projection(heads, "position", self.dtype)
        r = r_net(pos_emb.astype(self.dtype))  # (klen, heads, d_head), shared by the batch
        if head_perm is not None:  # cross-head: query head h reads head perm[h]'s K, V and R
            k, val, r = k[:, :, head_perm], val[:, :, head_perm], r[:, head_perm]

        ac = jnp.einsum("bihd,bjhd->bhij", q + u.astype(q.dtype), k, preferred_element_type=jnp.float32)
        q_pos = q + v.astype(q.dtype)
        bd = rel_shift(jnp.einsum("bihd,jhd->bhij", q_pos, r, preferred_element_type=jnp.float32))
        if aged_pos_emb is not None:  # memory columns: distances grown by the memory's extra age
            r_aged = r_net(aged_pos_emb.astype(self.dtype))
            if head_perm is not None:
                r_aged = r_aged[:, head_perm]
            bd_aged = rel_shift(jnp.einsum("bihd,jhd->bhij", q_pos, r_aged, preferred_element_type=jnp.float32))
            bd = jnp.concatenate([bd_aged[..., :mem_len], bd[..., mem_len:]], axis=-1)
        scores = jnp.where(mask, (ac + bd) / math.sqrt(self.d_head), MASKED)
        probs = nn.Dropout(self.dropatt)(jax.nn.softmax(scores, axis=-1), deterministic=not train)
        attended = jnp.einsum("bhij,bjhd->bihd", probs.astype(self.dtype), val)
        out = nn.DenseGeneral(h.shape[-1], axis=(-2, -1), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=partitioned(DEFAULT_INIT, ("heads", "kv", "embed")), name="out")(attended)
        out = nn.Dropout(self.dropout)(out, deterministic=not train)
        return h + out if self.pre_lnorm else norm(h + out)


class FeedForward(nn.Module):
    """Position-wise FF sublayer: ReLU(x W_1 + b_1) W_2 + b_2 with residual and LayerNorm."""

    d_inner: int
    dropout: float = 0.0
    pre_lnorm: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        norm = LayerNorm(self.dtype, name="norm")
        hidden = Dense(self.d_inner, ("embed", "mlp"), dtype=self.dtype, name="up")(norm(x) if self.pre_lnorm else x)
        hidden = nn.Dropout(self.dropout)(nn.relu(hidden), deterministic=not train)
        out = Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="down")(hidden)
        out = nn.Dropout(self.dropout)(out, deterministic=not train)
        return x + out if self.pre_lnorm else norm(x + out)


class TXLLayer(nn.Module):
    cfg: TransformerXLConfig

    @nn.compact
    def __call__(self, h, memory, mask, pos_emb, u, v, *, train, aged_pos_emb=None, head_perm=None):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        h = RelativeAttention(cfg.n_head, cfg.head_width, cfg.dropout, cfg.dropatt, cfg.pre_lnorm, dtype,
                              name="attn")(h, memory, mask, pos_emb, u, v, train=train,
                                           aged_pos_emb=aged_pos_emb, head_perm=head_perm)
        return FeedForward(cfg.ff_width, cfg.dropout, cfg.pre_lnorm, dtype, name="ff")(h, train=train)


# ---------------------------------------------------------------------------------------------
# Adaptive input and softmax (full softmax when there are no cutoffs)


class AdaptiveIO(nn.Module):
    """Token embedding (× √d_model) and output layer, optionally adaptive with clusters.

    div_val = 1: one (vocab, d) table; the softmax is still split into a head (shortlist + one logit
    per tail cluster) and tails when there are cutoffs (TXL WT103 base). div_val > 1: cluster i has its
    own (size_i, d // div_val**i) table and a projection to d (SCH-TXL WT103). ``tie`` shares the
    tables and projections between input and output. Projections and cluster logits carry the
    ``vocab`` logical axis: they exist per vocabulary cluster and count as embedding parameters.
    """

    vocab_size: int
    d_model: int
    cutoffs: tuple[int, ...] = ()
    div_val: int = 1
    tie: bool = True
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.ends = (0, *self.cutoffs, self.vocab_size)
        n = len(self.ends) - 1
        if self.div_val == 1:
            self.widths = (self.d_model,)
            self.tables = [self.param("table_0", partitioned(DEFAULT_INIT, ("vocab", "embed")),
                                      (self.vocab_size, self.d_model), jnp.float32)]
        else:
            self.widths = tuple(self.d_model // self.div_val**i for i in range(n))
            self.tables = [self.param(f"table_{i}", partitioned(DEFAULT_INIT, ("vocab", "embed")),
                                      (self.ends[i + 1] - self.ends[i], w), jnp.float32)
                           for i, w in enumerate(self.widths)]
        self.projections = [self.param(f"proj_{i}", partitioned(PROJ_INIT, ("vocab", "embed")), (w, self.d_model),
                                       jnp.float32) for i, w in enumerate(self.widths) if self.div_val > 1]
        if self.tie:
            self.out_tables, self.out_projections = self.tables, self.projections
        else:
            self.out_tables = [self.param(f"out_table_{i}", partitioned(DEFAULT_INIT, ("vocab", "embed")), t.shape,
                                          jnp.float32) for i, t in enumerate(self.tables)]
            self.out_projections = [self.param(f"out_proj_{i}", partitioned(PROJ_INIT, ("vocab", "embed")), p.shape,
                                               jnp.float32) for i, p in enumerate(self.projections)]
        self.out_bias = self.param("out_bias", partitioned(nn.initializers.zeros, ("vocab",)),
                                   (self.vocab_size,), jnp.float32)
        if self.cutoffs:
            self.cluster_weight = self.param("cluster_weight", partitioned(DEFAULT_INIT, ("vocab", "embed")),
                                             (n - 1, self.widths[0]), jnp.float32)
            self.cluster_bias = self.param("cluster_bias", partitioned(nn.initializers.zeros, ("vocab",)),
                                           (n - 1,), jnp.float32)

    def embed(self, tokens):
        if self.div_val == 1:
            x = jnp.take(self.tables[0], tokens, axis=0).astype(self.dtype)
        else:  # every cluster's lookup + projection, kept where the token belongs to it
            x = jnp.zeros((*tokens.shape, self.d_model), self.dtype)
            for i, (table, proj) in enumerate(zip(self.tables, self.projections)):
                start, stop = self.ends[i], self.ends[i + 1]
                rows = jnp.take(table, jnp.clip(tokens - start, 0, stop - start - 1), axis=0).astype(self.dtype)
                inside = ((tokens >= start) & (tokens < stop))[..., None]
                x = x + jnp.where(inside, rows @ proj.astype(self.dtype), 0)
        return x * math.sqrt(self.d_model)

    def _cluster_logits(self, h, i):
        """float32 logits of cluster i's tokens (all of them for the full softmax)."""
        if self.div_val == 1:
            start, stop = self.ends[i], self.ends[i + 1]
            weight = self.out_tables[0][start:stop] if self.cutoffs else self.out_tables[0]
        else:
            h = jnp.einsum("btd,wd->btw", h, self.out_projections[i].astype(h.dtype))
            weight = self.out_tables[i]
        logits = jnp.einsum("btw,vw->btv", h, weight.astype(h.dtype), preferred_element_type=jnp.float32)
        return logits, h

    def logits(self, h):
        """Full softmax: logits (B, T, vocab). Adaptive: normalised log-probabilities (B, T, vocab)."""
        if not self.cutoffs:
            return self._cluster_logits(h, 0)[0] + self.out_bias
        head, head_hidden = self._cluster_logits(h, 0)
        shortlist = self.ends[1]
        clusters = jnp.einsum("btw,cw->btc", head_hidden, self.cluster_weight.astype(h.dtype),
                              preferred_element_type=jnp.float32)
        head_logp = jax.nn.log_softmax(jnp.concatenate([head + self.out_bias[:shortlist],
                                                        clusters + self.cluster_bias], axis=-1), axis=-1)
        parts = [head_logp[..., :shortlist]]
        for i in range(1, len(self.ends) - 1):
            tail = self._cluster_logits(h, i)[0] + self.out_bias[self.ends[i]:self.ends[i + 1]]
            parts.append(jax.nn.log_softmax(tail, axis=-1) + head_logp[..., shortlist + i - 1, None])
        return jnp.concatenate(parts, axis=-1)


# ---------------------------------------------------------------------------------------------
# The model


def positional_embeddings(cfg, klen: int, *, train: bool, offset=None):
    """Sinusoids for distances klen−1 ... 0 (+ offset), clamped at clamp_len in evaluation."""
    distances = jnp.arange(klen - 1, -1, -1, dtype=jnp.float32)
    if offset is not None:
        distances = distances + offset
    if not train and cfg.clamp_len > 0:
        distances = jnp.minimum(distances, cfg.clamp_len)
    return sinusoid(distances, cfg.d_model)


def relative_bias_params(module: nn.Module, cfg, n_attention: int):
    """u (``r_w_bias``) and v (``r_r_bias``), (n_head, d_head): one pair shared by the module's
    ``n_attention`` attention layers, or one pair per layer with ``untie_r``. Call from ``setup``."""
    shape = ((n_attention,) if cfg.untie_r else ()) + (cfg.n_head, cfg.head_width)
    axes = (("layers",) if cfg.untie_r else ()) + ("heads", "kv")
    return tuple(module.param(name, partitioned(DEFAULT_INIT, axes), shape, jnp.float32)
                 for name in ("r_w_bias", "r_r_bias"))


def layer_biases(cfg, r_w_bias, r_r_bias, layer: int):
    """The u, v that attention layer ``layer`` uses."""
    return (r_w_bias[layer], r_r_bias[layer]) if cfg.untie_r else (r_w_bias, r_r_bias)


def layer_memory(carry, layer: int, batch: int):
    """Attention layer ``layer``'s memory and count of valid rows; (None, zeros) where the carry holds no
    memory (the empty carry)."""
    if "mems" not in carry:
        return None, jnp.zeros((batch,), jnp.int32)
    return carry["mems"][:, layer], carry["valid"][:, layer]


def stacked_carry(per_layer: dict) -> dict:
    """The next carry: the per-layer lists of ``per_layer`` stacked on axis 1, as ``initial_carry`` lays
    them out (the empty carry for empty lists)."""
    return {key: jnp.stack(values, axis=1) for key, values in per_layer.items()}


def update_memory(memory, valid, h):
    """The next segment's memory: the last M rows of [memory ; h], gradient stopped."""
    mem_len, seg_len = memory.shape[1], h.shape[1]
    joined = jnp.concatenate([memory, h.astype(memory.dtype)], axis=1)[:, seg_len:]
    return jax.lax.stop_gradient(joined), jnp.minimum(valid + seg_len, mem_len)


class TransformerXL(nn.Module):
    cfg: TransformerXLConfig

    def setup(self):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        self.io = AdaptiveIO(cfg.vocab_size, cfg.d_model, tuple(cfg.adaptive_cutoffs), cfg.div_val,
                             cfg.tie_embeddings, dtype)
        self.layers = [TXLLayer(cfg) for _ in range(cfg.n_layers)]
        self.drop = nn.Dropout(cfg.dropout)
        self.r_w_bias, self.r_r_bias = relative_bias_params(self, cfg, cfg.n_layers)

    def __call__(self, tokens, carry, *, train: bool = False):
        """(logits, next carry); the empty carry is the stateless call (module docstring)."""
        cfg = self.cfg
        batch, seg_len = tokens.shape
        mem_len = carry["mems"].shape[2] if "mems" in carry else 0
        klen = mem_len + seg_len
        window = mem_len if (not train and cfg.same_length and mem_len) else 0
        skip_probs = cfg.skip_probabilities() if train else (0.0,) * cfg.n_layers
        cross_head = train and getattr(cfg, "ch_prob", 0.0) > 0
        # one key per step for skips and permutations: replicated, so every device draws the same
        skip_rng = self.make_rng("skip") if (any(skip_probs) or cross_head) else None

        h = self.drop(self.io.embed(tokens), deterministic=not train)
        pos_emb = self.drop(positional_embeddings(cfg, klen, train=train), deterministic=not train)
        next_carry = {key: [] for key in carry}
        for i in range(cfg.n_layers):
            memory, valid = layer_memory(carry, i, batch)
            age = carry["age"][:, i] if "age" in carry else None
            key_skip = key_perm = None
            if skip_rng is not None:
                key_skip, key_perm = jax.random.split(jax.random.fold_in(skip_rng, i))
            aged_pos_emb = None
            if skip_probs[i] and age is not None:  # a retained memory may be older than one segment
                offset = (jnp.max(age) * seg_len).astype(jnp.float32)  # the rows with real memory share one age
                aged_pos_emb = self.drop(positional_embeddings(cfg, klen, train=train, offset=offset),
                                         deterministic=not train)
            run = functools.partial(
                TransformerXL._run_layer, layer=i, mask=attention_mask(seg_len, mem_len, valid, window),
                pos_emb=pos_emb, aged_pos_emb=aged_pos_emb, train=train,
                head_perm=cross_head_permutation(key_perm, cfg.n_head, cfg.ch_prob) if cross_head else None)
            if skip_probs[i]:  # lax.cond runs one branch, so a skipped layer costs nothing
                skipped = jax.random.uniform(key_skip) < skip_probs[i]
                h, memory, valid, age = nn.cond(skipped, TransformerXL._skip_layer, run, self, h, memory, valid, age)
            else:
                h, memory, valid, age = run(self, h, memory, valid, age)
            for key, value in (("mems", memory), ("valid", valid), ("age", age)):
                if key in next_carry:
                    next_carry[key].append(value)

        return self.io.logits(self.drop(h, deterministic=not train)), stacked_carry(next_carry)

    def _run_layer(self, h, memory, valid, age, *, layer, mask, pos_emb, aged_pos_emb, head_perm, train):
        u, v = layer_biases(self.cfg, self.r_w_bias, self.r_r_bias, layer)
        out = self.layers[layer](h, memory, mask, pos_emb, u, v, train=train,
                                 aged_pos_emb=aged_pos_emb, head_perm=head_perm)
        if memory is not None:  # the memory caches the layer's input
            memory, valid = update_memory(memory, valid, h)
        return out, memory, valid, None if age is None else _next_age(self.cfg, age, skipped=False)

    def _skip_layer(self, h, memory, valid, age):
        """Skip-retain: the layer is the identity; its memory is kept and grows one segment older."""
        return h, memory, valid, None if age is None else _next_age(self.cfg, age, skipped=True)


def _next_age(cfg, age, *, skipped: bool):
    """Extra age of a layer's memory after this segment (0 = written by the previous segment)."""
    if skipped:
        return age + 1
    return age if getattr(cfg, "skip_age", "segment") == "cumulative" else jnp.zeros_like(age)


def cross_head_permutation(key, n_head: int, probability: float):
    """With `probability`, a random permutation of the heads; otherwise the identity."""
    key_draw, key_perm = jax.random.split(key)
    permute = jax.random.uniform(key_draw) < probability
    return jnp.where(permute, jax.random.permutation(key_perm, n_head), jnp.arange(n_head))


def initial_carry(cfg: TransformerXLConfig, batch: int, evaluation: bool = False) -> dict:
    """An empty memory for `batch` streams: all zeros (see the module docstring)."""
    mem_len = cfg.memory_length(evaluation)
    carry = {"mems": jnp.zeros((batch, cfg.n_layers, mem_len, cfg.d_model), dtype_of(cfg.dtype)),
             "valid": jnp.zeros((batch, cfg.n_layers), jnp.int32)}
    if any(cfg.skip_probabilities()):
        carry["age"] = jnp.zeros((batch, cfg.n_layers), jnp.int32)
    return carry


# ---------------------------------------------------------------------------------------------
# SCH-TXL


@dataclass(frozen=True)
class SkipCrossHeadConfig(TransformerXLConfig):
    family: str = "sch_txl"
    skip_prob_scale: float = 0.5  # phase 1: layer l is skipped w.p. scale·l/L, the last never; 0 = phase 2
    ch_prob: float = 0.1  # cross-head regulariser: per layer and step, probability of permuting K, V, R heads
    skip_age: str = "segment"  # segment: age = segments since the memory was written | cumulative:
    #                            the official code's counter, which grows by each skip and never goes back

    def skip_probabilities(self) -> tuple[float, ...]:
        return skip_probabilities(self.n_layers, self.skip_prob_scale)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.skip_prob_scale <= 1.0:
            raise bad_value("model.skip_prob_scale", self.skip_prob_scale, "a number in [0, 1] (0 = phase 2)")
        if not 0.0 <= self.ch_prob <= 1.0:
            raise bad_value("model.ch_prob", self.ch_prob, "a probability in [0, 1]")
        if self.skip_age not in ("segment", "cumulative"):
            raise bad_value("model.skip_age", self.skip_age, "segment or cumulative")


def skip_probabilities(n_layers: int, scale: float) -> tuple[float, ...]:
    """The "functional" schedule p_l = scale·l/L, with the last layer never skipped (and p_0 = 0)."""
    return tuple(0.0 if l == n_layers - 1 else scale * l / n_layers for l in range(n_layers))


def expected_skip_fraction(n_layers: int, scale: float = 0.5) -> float:
    """Σ p_l / L: the expected fraction of layer evaluations a phase-1 step skips."""
    return sum(skip_probabilities(n_layers, scale)) / n_layers


# ---------------------------------------------------------------------------------------------
# FLOPs


def adaptive_io_flops(cfg: TransformerXLConfig) -> float:
    """Per token: embedding projections (div_val > 1) and the (adaptive) softmax, every cluster computed."""
    d, vocab, cutoffs = cfg.d_model, cfg.vocab_size, tuple(cfg.adaptive_cutoffs)
    ends = (0, *cutoffs, vocab)
    if cfg.div_val == 1:
        return dense_flops(d, vocab + len(cutoffs))
    total = dense_flops(d, len(cutoffs))  # cluster logits
    for i in range(len(ends) - 1):
        width = d // cfg.div_val**i
        total += 2 * dense_flops(width, d) + dense_flops(width, ends[i + 1] - ends[i])  # in + out proj, logits
    return total


def attention_flops_per_token(cfg: TransformerXLConfig, seq_len: int, mem_len: int) -> float:
    """One attention sublayer (docs/flops.md, d_attn = n_head·d_head): Q and O on the segment, K and V
    on memory + segment, AC + BD + AV over all klen keys (the full map is computed, then masked)."""
    d, d_attn, klen = cfg.d_model, cfg.attn_width, seq_len + mem_len
    projections = 2 * dense_flops(d, d_attn) + 2 * dense_flops(d, d_attn) * klen / seq_len
    return projections + 3 * 2.0 * d_attn * klen


def feed_forward_flops_per_token(cfg: TransformerXLConfig) -> float:
    return dense_flops(cfg.d_model, cfg.ff_width) + dense_flops(cfg.ff_width, cfg.d_model)


def forward_flops_per_token(cfg: TransformerXLConfig, seq_len: int, feeds_carry: bool = True) -> float:
    """What one training segment computes: with the memory carried, M = mem_len rows every segment (the
    full memory is computed from a stream's first segment on, masked where it is still empty); without
    (the empty carry), M = 0. The r_net projection of the klen positions (2·d·d_attn·klen per segment,
    shared by the batch) is left out. SCH-TXL in phase 1 counts each layer times its probability of
    running, (1 − p_l)."""
    mem_len = cfg.mem_len if feeds_carry else 0
    per_layer = attention_flops_per_token(cfg, seq_len, mem_len) + feed_forward_flops_per_token(cfg)
    run_probability = sum(1.0 - p for p in cfg.skip_probabilities())
    return run_probability * per_layer + adaptive_io_flops(cfg)


FAMILIES = [
    Family("transformer_xl", TransformerXLConfig, TransformerXL, forward_flops_per_token,
           "Transformer-XL: segment memory, relative positions (AC+BD, rel_shift), adaptive softmax",
           initial_carry=initial_carry),
    Family("sch_txl", SkipCrossHeadConfig, TransformerXL, forward_flops_per_token,
           "Skip Cross-head Transformer-XL: skip-retain layers (phase 1) and cross-head K/V/R permutation",
           initial_carry=initial_carry),
]
