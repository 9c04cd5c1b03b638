"""QRNN (Bradbury et al. 2016) and hybrid RNN-transformer stacks: family ``qrnn_hybrid``
(docs/architectures.md).

A model is a layer pattern over three sublayer types, each with a residual connection and a
LayerNorm (post-LN by default, as Transformer-XL; ``pre_lnorm`` moves it in front):

    A   Transformer-XL relative attention with segment memory (transformer_xl.RelativeAttention)
    F   position-wise feed-forward d -> d_inner -> d, ReLU (transformer_xl.FeedForward)
    Q   QRNN with fo-pooling over a causal convolution of window k

Pattern language: symbols A, F, Q; ``Qk`` gives one Q block window k (else ``qrnn_window``);
``(...)`` groups; ``*n`` repeats the item before it; spaces are ignored. The stack is the pattern
repeated ``n_layers`` times: Transformer-XL-12 is ``pattern=AF, n_layers=12``; ``Q2Q*3`` is AWD-QRNN's
4 layers (window 2 first). The paper's Attn-QRNN, PAR and Hybrid patterns are [PDF-CHECK] (docs/architectures.md);
experiments/configs/ carries our reconstructions, marked as such.

QRNN, in the paper's gate convention (the PyTorch code uses f ↦ 1 − f):

    Z = tanh(W_z ∗ X),  F = σ(W_f ∗ X + b_f),  O = σ(W_o ∗ X)     one matmul over [x_{t-k+1} ... x_t]
    c_t = f_t ⊙ c_{t-1} + (1 − f_t) ⊙ z_t,   h_t = o_t ⊙ c_t    (zoneout: 1 − f_t dropped to 0 in training)

The pooling is the diagonal linear recurrence c_t = a_t c_{t-1} + b_t (a = f, b = (1 − f) z), run by
``jax.lax.associative_scan`` (``qrnn_scan=sequential``: ``lax.scan``, faster on CPU). A carried
cell c_0 is folded into the first element, b_0 ← a_0 c_0 + b_0.

The carry, as Transformer-XL's (see its module docstring): ``apply(vars, tokens, carry, ...)`` returns
``(logits, carry)``; ``initial_carry(cfg, batch)`` is all zeros; every leaf is batch-leading:
``mems``/``valid`` for the A blocks, ``qrnn_cell`` (batch, n_Q, d_h) float32 (the cell c, not h) and
``qrnn_inputs`` (batch, n_Q, k_max − 1, d) -- the last inputs, so the convolution is continuous across
segments. A and Q parts advance in lock-step and are reset together. With the empty carry, memory is
empty and c_0 = 0, x_{<0} = 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmu_jax.errors import bad_value
from lmu_jax.models.base import Family, dense_flops
from lmu_jax.models.layers import DEFAULT_INIT, Dense, dtype_of, partitioned
from lmu_jax.models.transformer_xl import (AdaptiveIO, FeedForward, LayerNorm, RelativeAttention, TransformerXLConfig,
                                           adaptive_io_flops, attention_flops_per_token, attention_mask,
                                           feed_forward_flops_per_token, layer_biases, layer_memory,
                                           positional_embeddings, relative_bias_params, stacked_carry,
                                           update_memory)

SCANS = ("associative", "sequential")


def parse_pattern(pattern: str, default_window: int) -> tuple[tuple[str, int], ...]:
    """'(AQ2)*2F' -> (('A', 0), ('Q', 2), ('A', 0), ('Q', 2), ('F', 0)); raises UserError if malformed."""
    text = re.sub(r"\s+", "", pattern)
    position = 0

    def fail(why):
        return bad_value("model.pattern", pattern, f"{why} at character {position}; symbols A, F, Q[k], "
                         "groups (...), repeats *n, e.g. (AF)*2Q")

    def number():
        nonlocal position
        digits = re.match(r"\d+", text[position:])
        if not digits:
            return None
        position += len(digits.group())
        return int(digits.group())

    def sequence(depth):
        nonlocal position
        blocks = []
        while position < len(text) and text[position] != ")":
            symbol = text[position]
            position += 1
            if symbol == "(":
                item = sequence(depth + 1)
                if position >= len(text) or text[position] != ")":
                    raise fail("unclosed group")
                position += 1
            elif symbol in "AF":
                item = [(symbol, 0)]
            elif symbol == "Q":
                window = number()
                if window == 0:
                    raise fail("a Q window must be >= 1")
                item = [("Q", window or default_window)]
            else:
                raise fail(f"unknown symbol {symbol!r}")
            if position < len(text) and text[position] == "*":
                position += 1
                repeats = number()
                if not repeats:
                    raise fail("'*' needs a positive count")
                item = item * repeats
            blocks += item
        if depth == 0 and position < len(text):
            raise fail("unmatched ')'")
        return blocks

    blocks = sequence(0)
    if not blocks:
        raise fail("empty pattern")
    return tuple(blocks)


@dataclass(frozen=True)
class HybridConfig(TransformerXLConfig):
    """The A blocks take every Transformer-XL key (n_head, d_head, mem_len, clamp_len, ...); F blocks d_inner."""

    family: str = "qrnn_hybrid"
    pattern: str = "QF"  # one period of the stack (DSL in the module docstring), repeated n_layers times
    qrnn_window: int = 2  # k of Q blocks without their own digit
    qrnn_hidden: int = 0  # QRNN width d_h (0 = d_model); otherwise a d_h -> d_model projection follows
    qrnn_forget_bias: float = 0.0  # initial b_f (paper convention: larger keeps more of c_{t-1})
    qrnn_zoneout: float = 0.0  # probability of forcing f_t = 1 (keep) per unit and step in training
    qrnn_scan: str = "associative"  # associative (jax.lax.associative_scan) | sequential (lax.scan)

    @property
    def blocks(self) -> tuple[tuple[str, int], ...]:
        return parse_pattern(self.pattern, self.qrnn_window) * self.n_layers

    @property
    def qrnn_width(self) -> int:
        return self.qrnn_hidden or self.d_model

    def validate(self) -> None:
        super().validate()
        if self.qrnn_window < 1 or self.qrnn_hidden < 0:
            raise bad_value("model.qrnn_window", self.qrnn_window, "a window >= 1 (and qrnn_hidden >= 0)")
        if not 0.0 <= self.qrnn_zoneout < 1.0:
            raise bad_value("model.qrnn_zoneout", self.qrnn_zoneout, "a probability in [0, 1)")
        if self.qrnn_scan not in SCANS:
            raise bad_value("model.qrnn_scan", self.qrnn_scan, " or ".join(SCANS))
        self.blocks  # noqa: B018 -- parses the pattern, raising a UserError naming model.pattern


# ---------------------------------------------------------------------------------------------
# The QRNN sublayer


def linear_recurrence(a, b, method: str = "associative"):
    """c_t = a_t ⊙ c_{t-1} + b_t along axis 1, c_{-1} = 0 (fold a carried c_0 into b_0 first)."""
    if method == "associative":
        def combine(earlier, later):  # (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)
            return earlier[0] * later[0], later[0] * earlier[1] + later[1]

        return jax.lax.associative_scan(combine, (a, b), axis=1)[1]

    def step(c, ab):
        c = ab[0] * c + ab[1]
        return c, c

    _, cells = jax.lax.scan(step, jnp.zeros_like(b[:, 0]), (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
    return jnp.swapaxes(cells, 0, 1)


def _gate_bias_init(forget_bias: float):
    def init(key, shape, dtype=jnp.float32):  # (3, d_h): Z, F, O; only F's bias starts non-zero
        return jnp.zeros(shape, dtype).at[1].set(forget_bias)

    return init


class QRNN(nn.Module):
    """One Q sublayer: masked convolution gates, fo-pooling, residual and LayerNorm."""

    window: int
    hidden: int
    forget_bias: float = 0.0
    zoneout: float = 0.0
    dropout: float = 0.0
    pre_lnorm: bool = False
    scan: str = "associative"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, carry=None, *, train: bool):
        """x (B, T, d); carry (c (B, d_h) float32, last inputs (B, window − 1, d)) -> (y, carry)."""
        batch, length, d = x.shape
        norm = LayerNorm(self.dtype, name="norm")
        inputs = norm(x) if self.pre_lnorm else x
        if carry is None:
            carry = (jnp.zeros((batch, self.hidden), jnp.float32), jnp.zeros((batch, self.window - 1, d), x.dtype))
        cell, previous = carry
        padded = jnp.concatenate([previous.astype(inputs.dtype), inputs], axis=1)  # left context only: causal
        windowed = jnp.concatenate([padded[:, i:i + length] for i in range(self.window)], axis=-1)  # oldest first
        kernel = self.param("gate_kernel", partitioned(DEFAULT_INIT, ("embed", None, "mlp")),
                            (self.window * d, 3, self.hidden), jnp.float32)
        bias = self.param("gate_bias", partitioned(_gate_bias_init(self.forget_bias), (None, "mlp")),
                          (3, self.hidden), jnp.float32)
        gates = (windowed @ kernel.reshape(self.window * d, 3 * self.hidden).astype(self.dtype))
        gates = gates.reshape(batch, length, 3, self.hidden).astype(jnp.float32) + bias
        z, forget, output = jnp.tanh(gates[:, :, 0]), jax.nn.sigmoid(gates[:, :, 1]), jax.nn.sigmoid(gates[:, :, 2])
        write = 1.0 - forget
        if self.zoneout:  # zoneout keeps a unit's old cell: its write share 1 − f is dropped (not rescaled)
            if train:
                write = write * jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.zoneout, write.shape)
            else:
                write = write * (1.0 - self.zoneout)
            forget = 1.0 - write
        b = (write * z).at[:, 0].add(forget[:, 0] * cell)  # fold the carried cell into the first step
        cells = linear_recurrence(forget, b, self.scan)  # float32
        h = (output * cells).astype(self.dtype)
        if self.hidden != d:
            h = Dense(d, ("mlp", "embed"), use_bias=False, dtype=self.dtype, name="proj")(h)
        out = nn.Dropout(self.dropout)(h, deterministic=not train)
        y = x + out if self.pre_lnorm else norm(x + out)
        new_carry = (cells[:, -1], padded[:, length:])  # c_T (not h) and the last window − 1 inputs
        return y, jax.lax.stop_gradient(new_carry)


# ---------------------------------------------------------------------------------------------
# The hybrid stack


class HybridLM(nn.Module):
    cfg: HybridConfig

    def setup(self):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        self.io = AdaptiveIO(cfg.vocab_size, cfg.d_model, tuple(cfg.adaptive_cutoffs), cfg.div_val,
                             cfg.tie_embeddings, dtype)
        blocks = []
        for kind, window in cfg.blocks:
            if kind == "A":
                blocks.append(RelativeAttention(cfg.n_head, cfg.head_width, cfg.dropout, cfg.dropatt, cfg.pre_lnorm,
                                                dtype))
            elif kind == "F":
                blocks.append(FeedForward(cfg.ff_width, cfg.dropout, cfg.pre_lnorm, dtype))
            else:
                blocks.append(QRNN(window, cfg.qrnn_width, cfg.qrnn_forget_bias, cfg.qrnn_zoneout, cfg.dropout,
                                   cfg.pre_lnorm, cfg.qrnn_scan, dtype))
        self.blocks = blocks
        self.drop = nn.Dropout(cfg.dropout)
        n_attention = sum(kind == "A" for kind, _ in cfg.blocks)
        if n_attention:  # u, v shared by the A blocks (per block with untie_r), as Transformer-XL
            self.r_w_bias, self.r_r_bias = relative_bias_params(self, cfg, n_attention)

    def __call__(self, tokens, carry, *, train: bool = False):
        """(logits, next carry); the empty carry is the stateless call (module docstring)."""
        cfg = self.cfg
        batch, seg_len = tokens.shape
        mem_len = carry["mems"].shape[2] if "mems" in carry else 0
        window = mem_len if (not train and cfg.same_length and mem_len) else 0
        h = self.drop(self.io.embed(tokens), deterministic=not train)
        if any(kind == "A" for kind, _ in cfg.blocks):
            pos_emb = self.drop(positional_embeddings(cfg, mem_len + seg_len, train=train), deterministic=not train)
        next_carry = {key: [] for key in carry}
        n_attention = n_qrnn = 0
        for (kind, block_window), block in zip(cfg.blocks, self.blocks):
            if kind == "A":
                memory, valid = layer_memory(carry, n_attention, batch)
                u, v = layer_biases(cfg, self.r_w_bias, self.r_r_bias, n_attention)
                out = block(h, memory, attention_mask(seg_len, mem_len, valid, window), pos_emb, u, v, train=train)
                if "mems" in carry:
                    memory, valid = update_memory(memory, valid, h)
                    next_carry["mems"].append(memory)
                    next_carry["valid"].append(valid)
                h, n_attention = out, n_attention + 1
            elif kind == "F":
                h = block(h, train=train)
            elif "qrnn_cell" in carry:
                kept = carry["qrnn_inputs"].shape[2]
                h, (cell, inputs) = block(h, (carry["qrnn_cell"][:, n_qrnn],
                                              carry["qrnn_inputs"][:, n_qrnn, kept - (block_window - 1):]), train=train)
                inputs = jnp.pad(inputs, ((0, 0), (kept - inputs.shape[1], 0), (0, 0)))
                next_carry["qrnn_cell"].append(cell)
                next_carry["qrnn_inputs"].append(inputs.astype(carry["qrnn_inputs"].dtype))
                n_qrnn += 1
            else:  # the empty carry: c_0 = 0, x_{<0} = 0
                h, _ = block(h, train=train)
        return self.io.logits(self.drop(h, deterministic=not train)), stacked_carry(next_carry)


def initial_carry(cfg: HybridConfig, batch: int, evaluation: bool = False) -> dict:
    """All zeros: empty attention memories, zero QRNN cells and zero previous inputs."""
    dtype = dtype_of(cfg.dtype)
    n_attention = sum(kind == "A" for kind, _ in cfg.blocks)
    windows = [window for kind, window in cfg.blocks if kind == "Q"]
    carry = {}
    if n_attention:
        carry["mems"] = jnp.zeros((batch, n_attention, cfg.memory_length(evaluation), cfg.d_model), dtype)
        carry["valid"] = jnp.zeros((batch, n_attention), jnp.int32)
    if windows:
        carry["qrnn_cell"] = jnp.zeros((batch, len(windows), cfg.qrnn_width), jnp.float32)
        carry["qrnn_inputs"] = jnp.zeros((batch, len(windows), max(windows) - 1, cfg.d_model), dtype)
    return carry


def qrnn_flops_per_token(cfg: HybridConfig, window: int) -> float:
    """2·k·d·3·d_h for the gate matmul (+ the d_h -> d projection); element-wise pooling excluded."""
    d, d_h = cfg.d_model, cfg.qrnn_width
    return dense_flops(window * d, 3 * d_h) + (dense_flops(d_h, d) if d_h != d else 0.0)


def forward_flops_per_token(cfg: HybridConfig, seq_len: int, feeds_carry: bool = True) -> float:
    """A: Transformer-XL attention with memory mem_len when the carry is fed (else none); F: 4·d·d_inner;
    Q: as above (the carried cell and inputs cost nothing extra); plus the softmax."""
    mem_len = cfg.mem_len if feeds_carry else 0
    per_kind = {"A": lambda _: attention_flops_per_token(cfg, seq_len, mem_len),
                "F": lambda _: feed_forward_flops_per_token(cfg),
                "Q": lambda window: qrnn_flops_per_token(cfg, window)}
    return sum(per_kind[kind](window) for kind, window in cfg.blocks) + adaptive_io_flops(cfg)


FAMILIES = [
    Family("qrnn_hybrid", HybridConfig, HybridLM, forward_flops_per_token,
           "QRNN / attention / feed-forward stacks from a layer pattern (Attn-QRNN, PAR, Hybrid Transformer)",
           initial_carry=initial_carry),
]
