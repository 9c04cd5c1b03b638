"""Building blocks shared by the families. Every parameter carries logical axis names.

Logical axes: ``embed`` (residual width), ``vocab``, ``mlp`` (FFN hidden), ``heads``, ``kv`` (per-head
width), ``position`` (learned position table), ``norm`` (norm scales). ``lmu_jax.sharding`` maps them onto
the mesh axes ``data``, ``fsdp``, ``tensor``.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmu_jax.ops.memory import target_platform

DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def partitioned(init, axes: tuple):
    return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
    """y = x W (+ b) over the last axis, with logical axes (in_axis, out_axis) on W."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    init_scale: float = 1.0  # multiplies the std of the default init (residual projections use < 1)

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(stddev=0.02 * self.init_scale)
        return nn.Dense(
            self.features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=partitioned(init, self.axes),
            bias_init=partitioned(nn.initializers.zeros, (self.axes[1],)),
        )(x)


class Norm(nn.Module):
    """LayerNorm computed in float32 (flax's epsilon and unit scale init unless a subclass says otherwise)."""

    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(
            epsilon=self.epsilon, dtype=jnp.float32, param_dtype=jnp.float32,
            scale_init=partitioned(self.scale_init, ("norm",)),
            bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        )(x.astype(jnp.float32))
        return y.astype(self.dtype)


class Mlp(nn.Module):
    """The FFN of eq. 11 (LMU paper) and of the transformer: GELU(x W1 + b1) W2 + b2."""

    d_ff: int
    n_layers: int = 1  # scales the output init (GPT-2 style 1/sqrt(2L))
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
        h = nn.gelu(h)
        return Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="down",
                     init_scale=1 / math.sqrt(2 * self.n_layers))(h)


def rotary(x, positions, base: float = 10000.0):
    """Rotary position embedding on x[..., time, heads, head_dim] (half-split convention)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # (time, half)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


# Causal attention's query blocks on CPU: at least this many queries a block, at most this many blocks
ATTENTION_MIN_BLOCK, ATTENTION_MAX_BLOCKS = 64, 8


def causal_attention(q, k, v):
    """softmax(q k^T / sqrt(head_dim), causal) v on (batch, time, heads, head_dim) arrays.

    Accelerators: ``jax.nn.dot_product_attention`` (cuDNN / fused kernels). XLA:CPU runs that as one
    (time x time) score tensor through a softmax whose backward makes several passes over it, memory
    bound. Here the queries go in blocks, each against only the keys up to its end (the causal upper
    triangle is never computed), and the normalisation divides the (block x head_dim) output instead
    of the (block x keys) probabilities, with the row max held out of the gradient (softmax is shift
    invariant). README "Performance" has what this saves on CPU.
    """
    if target_platform() != "cpu":  # the platform compiled for (an AOT compile's target, not the host)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    time, head_dim = q.shape[1], q.shape[-1]
    blocks = ATTENTION_MAX_BLOCKS
    while blocks > 1 and (time % blocks or time // blocks < ATTENTION_MIN_BLOCK):
        blocks //= 2
    size = time // blocks
    q = q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)
    outputs = []
    for b in range(blocks):
        end = (b + 1) * size
        scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, b * size:end], k[:, :end],
                            preferred_element_type=jnp.float32)
        causal = jnp.arange(b * size, end)[:, None] >= jnp.arange(end)[None, :]
        scores = jnp.where(causal, scores, -jnp.inf)
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v[:, :end],
                         preferred_element_type=jnp.float32)
        outputs.append(out / jnp.swapaxes(weights.sum(-1), 1, 2)[..., None])
    return jnp.concatenate(outputs, axis=1).astype(v.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: query, key and value projections, ``attend``, and the output
    projection. A subclass that attends differently (other key sets, spans) overrides ``attend`` only,
    so its parameters are these, under these names."""

    n_heads: int
    rope: bool = True
    n_layers: int = 1
    dtype: jnp.dtype = jnp.float32

    def attend(self, q, k, v):
        """q, k, v (batch, time, heads, head_dim) -> the attended values, same shape."""
        if self.rope:
            positions = jnp.arange(q.shape[1])
            q, k = rotary(q, positions), rotary(k, positions)
        return causal_attention(q, k, v)

    @nn.compact
    def __call__(self, x):
        d_model = x.shape[-1]
        head_dim = d_model // self.n_heads
        # One matmul for the three projections (fewer, wider dots: faster on CPU); the parameters stay
        # three DenseGeneral-shaped leaves under their own names. Stacked on a new axis, not concatenated,
        # so a heads-sharded kernel stays sharded the same way.
        kernels, biases = zip(*(_Projection((self.n_heads, head_dim), name=name)(d_model)
                                for name in ("query", "key", "value")))
        qkv = jnp.einsum("btd,dshk->btshk", x.astype(self.dtype), jnp.stack(kernels, 1).astype(self.dtype)) \
            + jnp.stack(biases).astype(self.dtype)
        out = self.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return nn.DenseGeneral(
            d_model, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32, name="out",
            kernel_init=partitioned(nn.initializers.normal(0.02 / math.sqrt(2 * self.n_layers)),
                                    ("heads", "kv", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
        )(out)


class _Projection(nn.Module):
    """The parameters of an ``nn.DenseGeneral(features)`` from d_in (kernel (d_in, *features), bias
    features; the same names, shapes and initialisers), returned rather than applied."""

    features: tuple[int, int]

    @nn.compact
    def __call__(self, d_in: int):
        kernel = self.param("kernel", partitioned(DEFAULT_INIT, ("embed", "heads", "kv")), (d_in, *self.features),
                            jnp.float32)
        return kernel, self.param("bias", partitioned(nn.initializers.zeros, ("heads", "kv")), self.features,
                                  jnp.float32)


class Embedder(nn.Module):
    """Token embedding (logical axes vocab x embed) and the output projection (tied or separate)."""

    vocab_size: int
    d_model: int
    tie: bool = True
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.table = self.param("embedding", partitioned(DEFAULT_INIT, ("vocab", "embed")),
                                (self.vocab_size, self.d_model), jnp.float32)
        if not self.tie:
            self.head = Dense(self.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype)

    def embed(self, tokens):
        return jnp.take(self.table, tokens, axis=0).astype(self.dtype)

    def logits(self, x):
        """float32 logits: the softmax and the loss never run in bf16."""
        if self.tie:
            return jnp.einsum("btd,vd->btv", x, self.table.astype(x.dtype)).astype(jnp.float32)
        return self.head(x).astype(jnp.float32)
