"""Decoder-only transformer: pre-norm blocks of causal self-attention and a GELU MLP.

Positions are rotary (default) or a learned table. With ``tie_embeddings`` the output projection is
the transposed input embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import flax.linen as nn
import jax.numpy as jnp

from lmu_jax.errors import bad_value
from lmu_jax.models.base import Family, ModelConfig, ShapeRule, attention_flops, dense_flops
from lmu_jax.models.layers import DEFAULT_INIT, CausalSelfAttention, Embedder, Mlp, Norm, dtype_of, partitioned


@dataclass(frozen=True)
class TransformerConfig(ModelConfig):
    n_heads: int = 4  # attention heads; must divide d_model
    d_ff: int = 0  # MLP hidden width (0 = 4 * d_model)
    positions: str = "rope"  # rope | learned
    max_len: int = 0  # learned positions: table length (0 = data.seq_len)

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.d_model

    def validate(self) -> None:
        super().validate()
        if self.n_heads <= 0 or self.d_model % self.n_heads:
            raise bad_value("model.n_heads", self.n_heads, f"a positive divisor of model.d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2 and self.positions == "rope":
            raise bad_value("model.n_heads", self.n_heads, "a head width d_model/n_heads that is even (rotary)")
        if self.positions not in ("rope", "learned"):
            raise bad_value("model.positions", self.positions, "rope or learned")
        if self.d_ff < 0 or self.max_len < 0:
            raise bad_value("model.d_ff", self.d_ff, "0 (4*d_model) or a positive int")

    def resolved(self, vocab_size: int, seq_len: int) -> "TransformerConfig":
        cfg = super().resolved(vocab_size, seq_len)
        return replace(cfg, max_len=cfg.max_len or seq_len)


class Block(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + MLP(norm(x)). ``attention`` makes the attention
    sublayer (named ``attn``); the multiscale family's blocks override it."""

    cfg: TransformerConfig

    def attention(self, dtype):
        cfg = self.cfg
        return CausalSelfAttention(cfg.n_heads, rope=cfg.positions == "rope", n_layers=cfg.n_layers, dtype=dtype,
                                   name="attn")

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        x = x + self.attention(dtype)(Norm(dtype, name="norm_attn")(x))
        return x + Mlp(cfg.ff_width, cfg.n_layers, dtype, name="mlp")(Norm(dtype, name="norm_mlp")(x))


class Transformer(nn.Module):
    """Embedding -> ``trunk`` -> final norm -> output projection. ``trunk`` is what the multiscale family
    overrides (its hourglass or retina layers)."""

    cfg: TransformerConfig

    def trunk(self, x):
        cfg = self.cfg
        if cfg.positions == "learned":
            table = self.param("pos_embedding", partitioned(DEFAULT_INIT, ("position", "embed")),
                               (cfg.max_len, cfg.d_model), jnp.float32)
            x = x + table[: x.shape[1]].astype(x.dtype)
        for i in range(cfg.n_layers):
            x = Block(cfg, name=f"block_{i}")(x)
        return x

    @nn.compact
    def __call__(self, tokens, carry, *, train: bool = False):
        """(logits, carry): stateless, the (empty) carry passes through (``Family.initial_carry``)."""
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        embedder = Embedder(cfg.vocab_size, cfg.d_model, cfg.tie_embeddings, dtype, name="embed")
        return embedder.logits(Norm(dtype, name="norm_out")(self.trunk(embedder.embed(tokens)))), carry


def block_flops(cfg, attention: float) -> float:
    """One ``Block`` per token: the QKV and output projections and the MLP, plus ``attention``, the
    score and value FLOPs of whatever keys the block attends (the multiscale family's blocks too)."""
    d = cfg.d_model
    return dense_flops(d, 3 * d) + dense_flops(d, d) + dense_flops(d, cfg.ff_width) + dense_flops(cfg.ff_width, d) \
        + attention


def forward_flops_per_token(cfg: TransformerConfig, seq_len: int, *, feeds_carry: bool = False) -> float:
    """Matmuls (QKV, output, MLP, unembedding) + causal attention; the embedding gather is free. No carry,
    so ``feeds_carry`` changes nothing."""
    d = cfg.d_model
    return cfg.n_layers * block_flops(cfg, attention_flops(d, seq_len)) + dense_flops(d, cfg.vocab_size)


FAMILIES = [
    Family("transformer", TransformerConfig, Transformer, forward_flops_per_token,
           "decoder-only pre-norm transformer (rotary or learned positions)",
           shape_rule=ShapeRule(heads="n_heads", scaled=("d_ff",), depth=True), cpu_microbatches=True),
]
