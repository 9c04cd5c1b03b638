"""Multi-scale transformer language models (Subramanian et al. 2020, arXiv 2005.00581): family ``multiscale``.

Only the paper's abstract is verified; this is the parameterised reconstruction described in
docs/architectures.md, leak-free by construction. Blocks are the project's pre-norm transformer
blocks (rotary positions at each block's own scale, GELU MLP). Three topologies:

- ``bottom_up`` and ``top_down``: an hourglass. ``scale_layers = (n_0, n_1, ..., n_S, ..., n_1', n_0')`` runs
  n_0 layers on the tokens, pools by k = ``pool_factor`` to scale 1, ..., n_S layers at the coarsest scale
  (length T/k^S), then on the way back upsamples each scale and adds it to the stream saved before its
  pooling, followed by n_s' layers. Bottom-up starts with token-level layers (n_0 > 0, e.g. (2, 8, 2));
  top-down pools the embeddings directly (n_0 = 0, e.g. (0, 8, 4)): the coarse summary conditions the
  fine layers that predict.
- ``retina``: ``n_layers`` single-resolution layers whose queries see the last w_0 tokens at full
  resolution and, further back, w_ℓ mean-pooled blocks of k^ℓ tokens at level ℓ (``retina_spans``; a final 0
  reaches back to the start). Only complete blocks are seen, levels tile the past without gaps or overlap
  (each level's region starts on a block boundary of the next), and a pooled key sits at its block's
  last position for the rotary encoding (distance to the block end).

Causal pooling (Hourglass, Nawrot et al. 2021): shift right by k − 1, then pool, so coarse position j
summarises tokens jk−k+1 .. jk; upsampling gives token t the coarse position ⌊t/k⌋, which has seen nothing
after t. ``pool``: mean | linear (over the k concatenated vectors); ``upsample``: repeat | linear (d -> k·d).
A length not divisible by k needs no padding on the right: the last coarse position already ends at T−1.
Loss and perplexity are per token at the fine scale; coarse positions are never scored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from lmu_jax.errors import bad_value
from lmu_jax.models import transformer
from lmu_jax.models.base import Family, ModelConfig, ShapeRule, attention_flops, dense_flops
from lmu_jax.models.layers import CausalSelfAttention, Dense, dtype_of, rotary

TOPOLOGIES = ("bottom_up", "top_down", "retina")


@dataclass(frozen=True)
class MultiscaleConfig(ModelConfig):
    family: str = "multiscale"
    topology: str = "bottom_up"  # bottom_up | top_down (hourglass of scale_layers) | retina (n_layers layers)
    n_heads: int = 4  # attention heads; d_model / n_heads must be even (rotary)
    d_ff: int = 0  # MLP hidden width (0 = 4 * d_model)
    pool_factor: int = 4  # k: each scale is k times shorter than the one below it
    scale_layers: tuple[int, ...] = (1, 2, 1)  # hourglass: layers at scales 0, 1, ..., S, ..., 1, 0 (odd length)
    scale_spans: tuple[int, ...] = ()  # hourglass: attention span per entry of scale_layers, in that scale's
    #                                    positions (0 = full causal); () = full everywhere
    pool: str = "mean"  # mean | linear: how k shifted positions become one coarse position
    upsample: str = "repeat"  # repeat | linear: how a coarse position returns to its k fine positions
    retina_spans: tuple[int, ...] = (64, 16, 0)  # retina: w_0 tokens, then w_l blocks of k^l tokens (last 0 = all)

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def n_scales(self) -> int:
        """S: the coarsest scale of the hourglass."""
        return len(self.scale_layers) // 2

    def spans(self) -> tuple[int, ...]:
        return tuple(self.scale_spans) or (0,) * len(self.scale_layers)

    def resolved(self, vocab_size: int, seq_len: int) -> "MultiscaleConfig":
        cfg = super().resolved(vocab_size, seq_len)
        if cfg.topology != "retina":  # the depth of an hourglass is its layer count
            cfg = replace(cfg, n_layers=sum(cfg.scale_layers))
        return cfg

    def validate(self) -> None:
        super().validate()
        if self.topology not in TOPOLOGIES:
            raise bad_value("model.topology", self.topology, " | ".join(TOPOLOGIES))
        if self.n_heads <= 0 or self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise bad_value("model.n_heads", self.n_heads,
                            f"a divisor of d_model={self.d_model} leaving an even head width")
        if self.d_ff < 0:
            raise bad_value("model.d_ff", self.d_ff, "0 (4 * d_model) or a positive int")
        if self.pool_factor < 2:
            raise bad_value("model.pool_factor", self.pool_factor, "an int >= 2")
        if self.pool not in ("mean", "linear") or self.upsample not in ("repeat", "linear"):
            raise bad_value("model.pool", (self.pool, self.upsample), "pool mean|linear, upsample repeat|linear")
        layers = self.scale_layers
        if len(layers) < 3 or len(layers) % 2 == 0 or min(layers) < 0 or layers[len(layers) // 2] == 0:
            raise bad_value("model.scale_layers", list(layers),
                            "an odd-length list (>= 3) of layer counts >= 0 with layers at the coarsest scale")
        if self.topology == "top_down" and layers[0] != 0:
            raise bad_value("model.scale_layers", list(layers), "top_down pools the embeddings: scale_layers[0] = 0")
        if self.topology == "bottom_up" and layers[0] == 0:
            raise bad_value("model.scale_layers", list(layers), "bottom_up starts at the tokens: scale_layers[0] > 0")
        if self.scale_spans and (len(self.scale_spans) != len(layers) or min(self.scale_spans) < 0):
            raise bad_value("model.scale_spans", list(self.scale_spans),
                            f"[] or {len(layers)} spans >= 0 (one per entry of scale_layers; 0 = full)")
        spans = self.retina_spans
        if not spans or spans[0] < 1 or min(spans[:-1] or (1,)) < 1 or spans[-1] < 0:
            raise bad_value("model.retina_spans", list(spans),
                            "w_0 >= 1 tokens, then blocks per level >= 1; only the last may be 0 (= all)")


# ---------------------------------------------------------------------------------------------
# Causal pooling and upsampling


def causal_pool_blocks(h, factor: int):
    """(B, n, d) -> (B, ceil(n/k), k, d): block j holds positions jk−k+1 .. jk (zeros before 0)."""
    batch, length, d = h.shape
    coarse = -(-length // factor)
    shifted = jnp.pad(h, ((0, 0), (factor - 1, 0), (0, 0)))[:, : coarse * factor]
    return shifted.reshape(batch, coarse, factor, d)


def aligned_pool_blocks(h, size: int):
    """(B, n, d) -> (B, ceil(n/size), size, d): block b holds positions b·size .. b·size + size − 1."""
    batch, length, d = h.shape
    blocks = -(-length // size)
    return jnp.pad(h, ((0, 0), (0, blocks * size - length), (0, 0))).reshape(batch, blocks, size, d)


def retina_mask(length: int, spans: tuple[int, ...], factor: int) -> np.ndarray:
    """(length, length + Σ_l ceil(length/k^l)) bool: which tokens (level 0) and pooled blocks (levels >= 1)
    query t sees. Going back from t, level l covers [start_l, end_l) with end_0 = t + 1 and end_l = start_{l−1};
    start_l is end_l − w_l·k^l rounded down to a multiple of k^{l+1} (so the next level starts on its block
    boundary), the last level's start is end − w·k^l (or 0 when w = 0); all clipped at 0."""
    t = np.arange(length)
    end = t + 1
    columns = []
    for level, span in enumerate(spans):
        size = factor**level
        if level == len(spans) - 1:
            start = np.zeros_like(t) if span == 0 else np.maximum(end - span * size, 0)
        else:
            align = size * factor
            start = np.maximum((end - span * size) // align * align, 0)
        block_start = np.arange(-(-length // size)) * size
        columns.append((block_start[None] >= start[:, None]) & (block_start[None] + size <= end[:, None]))
        end = start
    return np.concatenate(columns, axis=1)


# ---------------------------------------------------------------------------------------------
# Blocks


class MultiscaleAttention(CausalSelfAttention):
    """Causal self-attention with rotary positions; a span (sliding window) or the retina key set."""

    span: int = 0  # keys (i − span, i]; 0 = all of the past
    retina_spans: tuple[int, ...] = ()  # retina: levels of pooled keys (see retina_mask)
    pool_factor: int = 4

    def attend(self, q, k, v):
        batch, length, n_heads, head_dim = q.shape
        positions = jnp.arange(length)
        q = rotary(q, positions)
        if self.retina_spans:
            keys, values = [rotary(k, positions)], [v]
            for level in range(1, len(self.retina_spans)):
                size = self.pool_factor**level
                pooled_k = aligned_pool_blocks(k.reshape(batch, length, -1), size).mean(axis=2)
                pooled_v = aligned_pool_blocks(v.reshape(batch, length, -1), size).mean(axis=2)
                block_ends = jnp.arange(pooled_k.shape[1]) * size + size - 1
                keys.append(rotary(pooled_k.reshape(batch, -1, n_heads, head_dim), block_ends))
                values.append(pooled_v.reshape(batch, -1, n_heads, head_dim))
            mask = jnp.asarray(retina_mask(length, self.retina_spans, self.pool_factor))[None, None]
            return jax.nn.dot_product_attention(q, jnp.concatenate(keys, 1), jnp.concatenate(values, 1), mask=mask)
        window = (self.span - 1, 0) if 0 < self.span < length else None
        return jax.nn.dot_product_attention(q, rotary(k, positions), v, is_causal=True, local_window_size=window)


class Block(transformer.Block):
    """The transformer's pre-norm block with ``MultiscaleAttention``."""

    cfg: MultiscaleConfig
    span: int = 0

    def attention(self, dtype):
        cfg = self.cfg
        retina = tuple(cfg.retina_spans) if cfg.topology == "retina" else ()
        return MultiscaleAttention(cfg.n_heads, n_layers=cfg.n_layers, span=self.span, retina_spans=retina,
                                   pool_factor=cfg.pool_factor, dtype=dtype, name="attn")


class MultiscaleLM(transformer.Transformer):
    """The transformer LM with the retina layers or the hourglass as its trunk."""

    cfg: MultiscaleConfig

    def trunk(self, x):
        if self.cfg.topology != "retina":
            return self.hourglass(x, 0)
        for i in range(self.cfg.n_layers):
            x = Block(self.cfg, name=f"block_{i}")(x)
        return x

    def hourglass(self, h, scale: int):
        """Layers at `scale`; above the coarsest: pool -> coarser scales -> upsample + residual -> layers."""
        cfg, k, dtype = self.cfg, self.cfg.pool_factor, dtype_of(self.cfg.dtype)
        spans, top, mirror = cfg.spans(), cfg.n_scales, len(cfg.scale_layers) - 1 - scale
        for i in range(cfg.scale_layers[scale]):
            h = Block(cfg, spans[scale], name=f"scale{scale}_down_{i}" if scale < top else f"scale{scale}_{i}")(h)
        if scale == top:
            return h
        blocks = causal_pool_blocks(h, k)  # (B, n/k, k, d)
        if cfg.pool == "mean":
            coarse = blocks.mean(axis=2)
        else:
            coarse = Dense(cfg.d_model, ("mlp", "embed"), dtype=dtype, name=f"pool_{scale}")(
                blocks.reshape(*blocks.shape[:2], -1))
        coarse = self.hourglass(coarse, scale + 1)
        if cfg.upsample == "repeat":
            up = jnp.repeat(coarse, k, axis=1)
        else:
            up = Dense(k * cfg.d_model, ("embed", "mlp"), dtype=dtype, name=f"upsample_{scale}")(coarse)
            up = up.reshape(up.shape[0], -1, cfg.d_model)
        h = h + up[:, : h.shape[1]]
        for i in range(cfg.scale_layers[mirror]):
            h = Block(cfg, spans[mirror], name=f"scale{scale}_up_{i}")(h)
        return h


# ---------------------------------------------------------------------------------------------
# FLOPs and the memory model


def _block_flops(cfg: MultiscaleConfig, length: int, span: int) -> float:
    """Per position of a block on a sequence of `length`: projections, MLP and causal attention
    (span-limited: every query sees at most `span` keys)."""
    if 0 < span < length:
        return transformer.block_flops(cfg, attention_flops(cfg.d_model, span, causal=False))
    return transformer.block_flops(cfg, attention_flops(cfg.d_model, length))


def scale_lengths(cfg: MultiscaleConfig, seq_len: int) -> list[int]:
    lengths = [seq_len]
    for _ in range(cfg.n_scales):
        lengths.append(-(-lengths[-1] // cfg.pool_factor))
    return lengths


def forward_flops_per_token(cfg: MultiscaleConfig, seq_len: int, *, feeds_carry: bool = False) -> float:
    """Per fine token: each layer at its own scale's length, weighted by that length / seq_len; linear
    pool/upsample; the unembedding. Retina: the keys are the tokens plus every pooled block, attended
    densely under the mask (which is what runs), counted causally like the transformer. No carry, so
    ``feeds_carry`` changes nothing."""
    d, k = cfg.d_model, cfg.pool_factor
    if cfg.topology == "retina":
        keys = seq_len + sum(-(-seq_len // k**level) for level in range(1, len(cfg.retina_spans)))
        return cfg.n_layers * transformer.block_flops(cfg, attention_flops(d, keys)) + dense_flops(d, cfg.vocab_size)
    lengths, spans, total = scale_lengths(cfg, seq_len), cfg.spans(), 0.0
    for index, layers in enumerate(cfg.scale_layers):
        scale = min(index, len(cfg.scale_layers) - 1 - index)
        total += layers * _block_flops(cfg, lengths[scale], spans[index]) * lengths[scale] / seq_len
    for scale in range(1, cfg.n_scales + 1):
        coarse = lengths[scale] / seq_len
        total += coarse * ((cfg.pool == "linear") + (cfg.upsample == "linear")) * dense_flops(k * d, d)
    return total + dense_flops(d, cfg.vocab_size)


def memory_footprint(cfg: MultiscaleConfig, batch: int, seq_len: int) -> dict:
    """The activation-memory model of docs/architectures.md, in elements: attention maps
    Σ_layers B·heads·n·min(w, n) at each layer's length n and span w (retina: all keys it attends
    densely), and residual-stream activations Σ_layers B·n·d. A model to compare topologies, not a
    measurement."""
    heads, d = cfg.n_heads, cfg.d_model
    if cfg.topology == "retina":
        keys = retina_mask(seq_len, tuple(cfg.retina_spans), cfg.pool_factor).shape[1]
        return {"attention_maps": cfg.n_layers * batch * heads * seq_len * keys,
                "activations": cfg.n_layers * batch * seq_len * d}
    lengths, spans, maps, activations = scale_lengths(cfg, seq_len), cfg.spans(), 0, 0
    for index, layers in enumerate(cfg.scale_layers):
        n = lengths[min(index, len(cfg.scale_layers) - 1 - index)]
        maps += layers * batch * heads * n * min(spans[index] or n, n)
        activations += layers * batch * n * d
    return {"attention_maps": maps, "activations": activations}


FAMILIES = [
    Family("multiscale", MultiscaleConfig, MultiscaleLM, forward_flops_per_token,
           "multi-scale transformer: causal-pooling hourglass (bottom-up / top-down) or retina attention",
           shape_rule=ShapeRule(heads="n_heads", scaled=("d_ff",))),
]
