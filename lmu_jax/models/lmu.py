"""The LMU language model of Chilkuri et al. 2021 (arXiv 2110.02402): families ``lmu`` and ``lmu_attn``.

One block (docs/lmu.md, "The block and the model"; the paper leaves norms and residuals open), pre-norm:

    x += FFN(norm(x))                      ``lmu``;  ``lmu_attn``: causal global self-attention
    x += ImplicitAttention(norm(x))        Legendre memory M of every channel (q coefficients each),
                                           Q, K, V = GELU(L_i M) (q' x d each), M' = softmax(Q Kᵀ s) V,
                                           out = p M'  -- attention over the q' rows of *this* token
    x += FFN(norm(x))

The memory is the frozen LTI system m_t = Ā m_{t-1} + B̄ x_t (lmu_jax.ops) run on every channel.
Training uses the folded form (docs/lmu.md): the three L_i (q' x q) are stacked into one (3q' x q)
reduction and convolved into the kernel, so the (batch, time, channels, q) memory never exists.
The memory path computes in float32 whatever the compute dtype (XLA's FFT rejects bf16).

Recurrent inference (``init_recurrent_state`` / ``generate_step``) runs one token at a time with the
full q x d memory per layer and applies the L_i at each step: O(1) state for ``lmu``. ``lmu_attn``
also keeps a key/value cache for its global attention, which is O(n) in the tokens seen.

``remat`` wraps the memory + implicit-attention sub-block in ``nn.remat``: the backward pass
recomputes the GELU'd (batch, time, 3q', d) Q, K, V and their intermediates instead of saving them
(the saved residuals drop ~2.7x at q 64), at the cost of time (README "Performance" says how much on
CPU). XLA:CPU's own buffer assignment showed no peak-memory change, so the saving is for
accelerators, where activations bound the batch; ``auto`` (the default) turns it off on CPU.

FLOPs: ``forward_flops_per_token`` counts the memory by the paper's Table 2 (the FFT path), whatever
``memory_impl`` runs, so a model's FLOPs do not depend on the kernel picked for the hardware;
``memory_flops_per_token(cfg, n, "chunked" | "sequential")`` gives the other paths' counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmu_jax.errors import bad_value
from lmu_jax.models.base import Family, ModelConfig, ShapeRule, attention_flops, dense_flops
from lmu_jax.models.layers import (DEFAULT_INIT, Embedder, Mlp, Norm, causal_attention, dtype_of, partitioned,
                                   rotary)
from lmu_jax.ops import MEMORY_IMPLS, default_chunk_len, lmu_memory_folded, lmu_memory_step

MEMORY_IMPL_CHOICES = ("auto",) + MEMORY_IMPLS


@dataclass(frozen=True)
class LMUConfig(ModelConfig):
    family: str = "lmu"
    order: int = 64  # q: Legendre coefficients per channel (the paper's largest model: 250)
    q_reduced: int = 0  # q': rows of Q, K, V after the L_i (0 = max(1, order // 10), the paper's q/10)
    theta: float = 0.0  # memory window in tokens (0 = data.seq_len, the paper's theta = n)
    memory_impl: str = "auto"  # auto | fft | chunked | sequential: how the memory runs in training
    chunk_len: int = 0  # memory_impl=chunked: chunk length C (0 = lmu_jax.ops.default_chunk_len)
    d_ff: int = 0  # FFN hidden width d' (0 = 4 * d_model)
    attn_scale: float = 0.0  # implicit-attention logit scale s (0 = 1/sqrt(d_model); the paper writes none, i.e. 1)
    remat: bool | str = "auto"  # recompute memory + implicit attention in the backward pass (see module docstring);
    #                             auto: off on CPU, on elsewhere (lmu_jax.config.resolve_auto, called by the Trainer)

    @property
    def reduced_order(self) -> int:
        return self.q_reduced or max(1, self.order // 10)

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def logit_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.d_model)

    @property
    def global_attention(self) -> bool:
        return False

    def validate(self) -> None:
        super().validate()
        if self.order < 1:
            raise bad_value("model.order", self.order, "a positive int (Legendre coefficients per channel)")
        if not 0 <= self.q_reduced <= self.order:
            raise bad_value("model.q_reduced", self.q_reduced, f"0 (order // 10) or an int in [1, order={self.order}]")
        if self.theta < 0:
            raise bad_value("model.theta", self.theta, "0 (data.seq_len) or a positive number of tokens")
        if self.memory_impl not in MEMORY_IMPL_CHOICES:
            raise bad_value("model.memory_impl", self.memory_impl, f"one of {', '.join(MEMORY_IMPL_CHOICES)}")
        if self.chunk_len < 0:
            raise bad_value("model.chunk_len", self.chunk_len, "0 (the ops default) or a positive int")
        if self.d_ff < 0:
            raise bad_value("model.d_ff", self.d_ff, "0 (4*d_model) or a positive int")
        if self.attn_scale < 0:
            raise bad_value("model.attn_scale", self.attn_scale, "0 (1/sqrt(d_model)) or a positive number")
        self.check_auto_flag("remat", self.remat)

    def resolved(self, vocab_size: int, seq_len: int) -> "LMUConfig":
        cfg = super().resolved(vocab_size, seq_len)
        return replace(cfg, theta=cfg.theta or float(seq_len))

    def resolve_auto(self, platform: str) -> "LMUConfig":
        return replace(self, remat=platform != "cpu") if self.remat == "auto" else self


@dataclass(frozen=True)
class LMUAttnConfig(LMUConfig):
    family: str = "lmu_attn"
    n_heads: int = 4  # global attention heads; must divide d_model
    positions: str = "rope"  # global attention positions: rope | none (the paper does not say; recorded here)

    @property
    def global_attention(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if self.n_heads <= 0 or self.d_model % self.n_heads:
            raise bad_value("model.n_heads", self.n_heads, f"a positive divisor of model.d_model={self.d_model}")
        if self.positions not in ("rope", "none"):
            raise bad_value("model.positions", self.positions, "rope or none")
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise bad_value("model.n_heads", self.n_heads, "a head width d_model/n_heads that is even (rotary)")


# ---------------------------------------------------------------------------------------------
# Modules (setup-style, so that the parallel __call__ and the recurrent step share parameters)


class ImplicitAttention(nn.Module):
    """Legendre memory of every channel, then softmax attention over its q' reduced rows, per token."""

    cfg: LMUConfig

    def setup(self):
        cfg = self.cfg
        q, r = cfg.order, cfg.reduced_order
        # Fan-in init for the L_i; p starts at the residual-output scale (GPT-2's 1/sqrt(2L)).
        reduce_init = partitioned(nn.initializers.normal(1.0 / math.sqrt(q)), ("order_reduced", "order"))
        self.l_query = self.param("l_query", reduce_init, (r, q), jnp.float32)
        self.l_key = self.param("l_key", reduce_init, (r, q), jnp.float32)
        self.l_value = self.param("l_value", reduce_init, (r, q), jnp.float32)
        readout_std = 1.0 / math.sqrt(r * 2 * cfg.n_layers)
        self.readout = self.param("readout", partitioned(nn.initializers.normal(readout_std), ("order_reduced",)),
                                  (r,), jnp.float32)

    def reduction(self):
        """L_1; L_2; L_3 stacked: (3q', q)."""
        return jnp.concatenate([self.l_query, self.l_key, self.l_value])

    def __call__(self, x):
        """x (batch, time, d) -> (batch, time, d); the memory runs in float32."""
        cfg = self.cfg
        reduced = lmu_memory_folded(x, self.reduction(), cfg.order, cfg.theta, cfg.memory_impl,
                                    cfg.chunk_len or None)  # (batch, time, 3q', d)
        return self.attend(reduced).astype(x.dtype)

    def step(self, x_t, memory):
        """One token: x_t (batch, d), memory (batch, d, q) float32 -> (out (batch, d), new memory)."""
        cfg = self.cfg
        memory = lmu_memory_step(memory, x_t, cfg.order, cfg.theta)
        reduced = jnp.einsum("bdo,ro->brd", memory, self.reduction(), precision=jax.lax.Precision.HIGHEST)
        return self.attend(reduced).astype(x_t.dtype), memory

    def attend(self, reduced):
        """(..., 3q', d) reduced memory rows -> (..., d): eqs. 8-10, contracting over the channels d.
        Channels last: every elementwise pass runs along d, and the split into Q, K, V is along a
        major axis (d first trains slower on CPU). The readout goes first, r^T (P V) = (r^T P) V: the
        mixed rows M' = P V, (q', d) per token, are never formed."""
        query, key, value = jnp.split(nn.gelu(reduced), 3, axis=-2)  # each (..., q', d)
        scores = jnp.einsum("...id,...jd->...ij", query, key) * self.cfg.logit_scale  # (..., q', q')
        weights = jnp.einsum("...ij,i->...j", jax.nn.softmax(scores, axis=-1), self.readout)  # r^T P
        return jnp.einsum("...jd,...j->...d", value, weights)


class GlobalAttention(nn.Module):
    """Causal multi-head self-attention (``lmu_attn``) with a key/value-cache step for generation."""

    d_model: int
    n_heads: int
    rope: bool
    n_layers: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        head_dim = self.d_model // self.n_heads

        def projection():
            return nn.DenseGeneral((self.n_heads, head_dim), dtype=self.dtype, param_dtype=jnp.float32,
                                   kernel_init=partitioned(DEFAULT_INIT, ("embed", "heads", "kv")),
                                   bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")))

        self.query, self.key, self.value = projection(), projection(), projection()
        self.out = nn.DenseGeneral(
            self.d_model, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=partitioned(nn.initializers.normal(0.02 / math.sqrt(2 * self.n_layers)),
                                    ("heads", "kv", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)))

    def _qkv(self, x, positions):
        q, k, v = self.query(x), self.key(x), self.value(x)  # (batch, time, heads, head_dim)
        if self.rope:
            q, k = rotary(q, positions), rotary(k, positions)
        return q, k, v

    def __call__(self, x):
        q, k, v = self._qkv(x, jnp.arange(x.shape[1]))
        return self.out(causal_attention(q, k, v))

    def step(self, x_t, cache, position):
        """x_t (batch, d); cache {"key", "value"}: (batch, max_len, heads, head_dim); position: int32 scalar."""
        q, k, v = self._qkv(x_t[:, None], position[None])
        keys = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype), position, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype), position, axis=1)
        seen = jnp.full((x_t.shape[0],), position + 1, jnp.int32)  # attend to cache slots 0..position only
        out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                           key_value_seq_lengths=seen)
        return self.out(out)[:, 0], {"key": keys, "value": values}


class LMUBlock(nn.Module):
    cfg: LMUConfig

    def setup(self):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        self.norm_in, self.norm_memory, self.norm_out = Norm(dtype), Norm(dtype), Norm(dtype)
        if cfg.global_attention:
            self.attn = GlobalAttention(cfg.d_model, cfg.n_heads, cfg.positions == "rope", cfg.n_layers, dtype)
        else:
            self.ffn_in = Mlp(cfg.ff_width, cfg.n_layers, dtype)
        # an unresolved auto (a model built outside the Trainer) recomputes: the memory-safe choice
        memory_cls = nn.remat(ImplicitAttention) if cfg.remat in (True, "auto") else ImplicitAttention
        self.memory = memory_cls(cfg)
        self.ffn_out = Mlp(cfg.ff_width, cfg.n_layers, dtype)

    def __call__(self, x):
        first = self.attn if self.cfg.global_attention else self.ffn_in
        x = x + first(self.norm_in(x))
        x = x + self.memory(self.norm_memory(x))
        return x + self.ffn_out(self.norm_out(x))

    def step(self, x_t, layer_state, position):
        """x_t (batch, d) -> (batch, d), with this layer's recurrent state."""
        new_state = dict(layer_state)
        h = self.norm_in(x_t)
        if self.cfg.global_attention:
            h, cache = self.attn.step(h, {"key": layer_state["key"], "value": layer_state["value"]}, position)
            new_state.update(cache)
        else:
            h = self.ffn_in(h)
        x_t = x_t + h
        h, new_state["memory"] = self.memory.step(self.norm_memory(x_t), layer_state["memory"])
        x_t = x_t + h
        return x_t + self.ffn_out(self.norm_out(x_t)), new_state


class LMULanguageModel(nn.Module):
    cfg: LMUConfig

    def setup(self):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        if not cfg.theta > 0:
            raise ValueError("LMUConfig.theta must be resolved (cfg.resolved(vocab_size, seq_len)) before building")
        self.embed = Embedder(cfg.vocab_size, cfg.d_model, cfg.tie_embeddings, dtype)
        self.blocks = [LMUBlock(cfg) for _ in range(cfg.n_layers)]
        self.norm_out = Norm(dtype)

    def __call__(self, tokens, carry, *, train: bool = False):
        """(logits, carry): each window starts from an empty memory, the (empty) carry passes through."""
        x = self.embed.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.embed.logits(self.norm_out(x)), carry

    def step(self, token, state):
        """token (batch,) int -> (logits (batch, vocab) float32, state): one step of recurrent inference."""
        x = self.embed.embed(token)
        layers = []
        for block, layer_state in zip(self.blocks, state["layers"]):
            x, layer_state = block.step(x, layer_state, state["position"])
            layers.append(layer_state)
        logits = self.embed.logits(self.norm_out(x)[:, None])[:, 0]
        return logits, {"position": state["position"] + 1, "layers": layers}


# ---------------------------------------------------------------------------------------------
# Recurrent inference


def init_recurrent_state(cfg: LMUConfig, batch: int, max_len: int = 0) -> dict:
    """Zero state before the first token. Per layer the memory (batch, d, q) float32; ``lmu_attn``
    adds a key/value cache of ``max_len`` positions (required there: generation beyond it is refused
    by construction, the cache has no slot for it)."""
    layer = {"memory": jnp.zeros((batch, cfg.d_model, cfg.order), jnp.float32)}
    if cfg.global_attention:
        if max_len <= 0:
            raise ValueError("lmu_attn keeps a key/value cache: pass max_len > 0 (the most tokens to generate)")
        shape = (batch, max_len, cfg.n_heads, cfg.d_model // cfg.n_heads)
        dtype = dtype_of(cfg.dtype)
        layer.update(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))
    return {"position": jnp.zeros((), jnp.int32), "layers": [dict(layer) for _ in range(cfg.n_layers)]}


def generate_step(cfg: LMUConfig, params, state: dict, token):
    """(params, state, token (batch,)) -> (logits (batch, vocab), state); jit with cfg static."""
    return LMULanguageModel(cfg).apply({"params": params}, token, state, method="step")


# ---------------------------------------------------------------------------------------------
# FLOPs (forward, per token; see lmu_jax.flops for the convention)


def table2_flops(d: int, q: int, q_reduced: int, seq_len: int, d_ff: int) -> dict[str, float]:
    """The paper's Table 2, one layer, forward FLOPs per token, term by term, exactly as printed.

    ``lmu_qkv`` is the folded FFT memory (docs/flops.md): 3 reductions x (q'+1) real transforms of length 2n
    at 5(log2 n + 1) per token, a 6-flop complex multiply per output, plus 6qq' to form the L_i H.
    ``ffn`` = 8dd' is what the block's *two* FFNs cost at 2 FLOPs per multiply-add (4dd' each); the
    table's parameter entry 2dd' is per FFN.
    """
    log_n = math.log2(seq_len)
    return {
        "lmu_qkv": 3 * d * (5 * (q_reduced + 1) * (log_n + 1) + 6 * q_reduced) + 6 * q * q_reduced,
        "scores": 2 * d * q_reduced**2,  # Q Kᵀ
        "mix": 2 * d * q_reduced**2 + d * q_reduced,  # M' = softmax(.) V
        "readout": 2 * d * q_reduced,  # m = p M'
        "ffn": 8 * d * d_ff,
    }


def memory_flops_per_token(cfg: LMUConfig, seq_len: int, impl: str = "fft") -> float:
    """Forward FLOPs per token of one layer's memory + Q, K, V formation (all d channels), by path.

    fft:        Table 2's first row.
    chunked:    per channel: the dense C x C Toeplitz block on 3q' folded kernels 6q'C, the chunk-end
                states 2q, the carry-in through the folded powers L_i Ā^(j+1) 6qq', the associative
                scan's vector part ~4q²/C; per sequence, spread over its n tokens: folding the kernels
                and powers 6q'qC(1 + q) and the scan's matrix products ~4q³ per chunk.
    sequential: per channel 2q² (Ā m) + 2q (B̄ x, add) + 6qq' (apply the L_i every step).
    """
    d, q, r = cfg.d_model, cfg.order, cfg.reduced_order
    if impl == "fft":
        return table2_flops(d, q, r, seq_len, cfg.ff_width)["lmu_qkv"]
    if impl == "chunked":
        c = min(cfg.chunk_len or default_chunk_len(q), seq_len)
        num_chunks = -(-seq_len // c)
        per_channel = 6 * r * c + 2 * q + 6 * q * r + 4 * q * q / c
        per_sequence = 6 * r * q * c * (1 + q) + 4 * q**3 * max(num_chunks - 1, 0)
        return d * per_channel + per_sequence / seq_len
    if impl == "sequential":
        return d * (2 * q * q + 2 * q + 6 * q * r)
    raise ValueError(f"impl must be one of fft, chunked, sequential; got {impl!r}")


def forward_flops_per_token(cfg: LMUConfig, seq_len: int, memory_impl: str = "fft", *,
                            feeds_carry: bool = False) -> float:
    """Analytic forward FLOPs per token: Table 2 per layer (memory by ``memory_impl``, default the
    FFT path the paper counts), FFNs at 4dd' each (two per ``lmu`` block, one per ``lmu_attn`` block,
    whose first sub-block is QKV/output projections + causal attention), and the unembedding. No carry,
    so ``feeds_carry`` changes nothing."""
    d = cfg.d_model
    terms = table2_flops(d, cfg.order, cfg.reduced_order, seq_len, cfg.ff_width)
    one_ffn = dense_flops(d, cfg.ff_width) + dense_flops(cfg.ff_width, d)
    if cfg.global_attention:
        first = dense_flops(d, 3 * d) + dense_flops(d, d) + attention_flops(d, seq_len)
    else:
        first = one_ffn
    per_layer = (memory_flops_per_token(cfg, seq_len, memory_impl) + terms["scores"] + terms["mix"]
                 + terms["readout"] + first + one_ffn)
    return cfg.n_layers * per_layer + dense_flops(d, cfg.vocab_size)


# The L_i (q' x q) are split over q across fsdp when q divides (tiny, but not left whole); their q' rows
# and the readout p stay replicated.
LMU_LOGICAL_RULES = (("order", "fsdp"), ("order_reduced", None))

FAMILIES = [
    Family("lmu", LMUConfig, LMULanguageModel, forward_flops_per_token,
           "LMU LM (Chilkuri et al. 2021): FFN -> Legendre memory -> implicit attention -> FFN",
           shape_rule=ShapeRule(scaled=("d_ff",), paper_width=True), logical_rules=LMU_LOGICAL_RULES,
           cpu_microbatches=True),
    Family("lmu_attn", LMUAttnConfig, LMULanguageModel, forward_flops_per_token,
           "LMU LM with causal global attention in place of the first FFN",
           shape_rule=ShapeRule(heads="n_heads", scaled=("d_ff",), paper_width=True),
           logical_rules=LMU_LOGICAL_RULES, cpu_microbatches=True),
]
