"""Multi-layer LSTM language model (family ``lstm``), optionally with LSTMP output projections.

Each layer is the standard LSTM cell (Hochreiter & Schmidhuber 1997 with a forget gate):

    i, f, g, o = σ, σ, tanh, σ of  (x_t W_x + b) + h_{t-1} W_h      one fused (4, d_hidden) gate matmul each
    c_t = f c_{t-1} + i g,   h_t = o tanh(c_t)   [, h_t = h_t W_p  with ``d_proj`` (Sak et al. 2014)]

Layers are stacked without residuals; a final LayerNorm, then the (tied) unembedding.

The time loop is ``lax.scan`` over our own cell rather than ``nn.RNN(nn.OptimizedLSTMCell)``, because
the LSTMP projection feeds back into the recurrence, which the flax cell cannot express; the math and
the fused 4-gate matmuls are the same, and so is the speed (CPU, forward+backward, batch 32 x 128
steps x width 512: flax cell 821 ms, this cell 747 ms). ``hoist_inputs`` moves the input-to-gate
matmul of every step out of the loop into one big matmul; on CPU (XLA, jax 0.10) that measured
*slower* (1089 ms there; 1.5-2x slower forward at widths 64-512), so the default keeps both matmuls in
the loop. Hoisting is the usual win on GPU/TPU; not measured there yet. The cell state stays float32.

Widths: ``d_model`` is the cell width; ``d_proj`` (if set) is the projected output width, which is
then also the embedding width and every layer's input width (as in Jozefowicz et al. 2016).
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmu_jax.config import ModelConfig
from lmu_jax.errors import bad_value
from lmu_jax.flops import dense_flops
from lmu_jax.models import Family
from lmu_jax.models.layers import Embedder, Norm, dtype_of, partitioned

FORGET_GATE = 1  # gate order along the fused axis: input, forget, cell, output
LECUN_GATES = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))  # fan-in = d_in for (d_in, 4, d_hidden)


@dataclass(frozen=True)
class LSTMConfig(ModelConfig):
    family: str = "lstm"
    d_proj: int = 0  # LSTMP output projection width (0 = none); also the embedding width when set
    unroll: int = 1  # time steps per lax.scan iteration (a speed knob; results are identical)
    hoist_inputs: bool = False  # input-to-gate matmul for all steps before the scan (False: inside it; faster on CPU)

    @property
    def d_out(self) -> int:
        """Width of each layer's output, of the embedding and of every layer's input."""
        return self.d_proj or self.d_model

    def validate(self) -> None:
        super().validate()
        if self.d_proj < 0:
            raise bad_value("model.d_proj", self.d_proj, "0 (no projection) or a positive int")
        if self.unroll < 1:
            raise bad_value("model.unroll", self.unroll, "a positive int")


def _forget_bias_init(key, shape, dtype=jnp.float32):
    """Gate biases zero except the forget gate's, 1: remember by default early in training
    (Gers et al. 2000; Jozefowicz et al. 2015)."""
    return jnp.zeros(shape, dtype).at[FORGET_GATE].set(1.0)


def _gate_matmul(x, kernel):
    """x (..., d_in) @ kernel (d_in, 4, d_hidden) -> (..., 4, d_hidden) as one 2-D matmul: the same as
    einsum('...i,igk->...gk'), whose backward pass inside lax.scan measured ~1.6x slower on CPU."""
    d_in, gates, d_hidden = kernel.shape
    return (x @ kernel.reshape(d_in, gates * d_hidden)).reshape(*x.shape[:-1], gates, d_hidden)


def _orthogonal_per_gate(key, shape, dtype=jnp.float32):
    """Recurrent kernel (d_out, 4, d_hidden): each gate's (d_out, d_hidden) block orthogonal, as
    flax's LSTM cells initialise their recurrent kernels (Saxe et al. 2014)."""
    d_out, gates, d_hidden = shape
    keys = jax.random.split(key, gates)
    return jnp.stack([nn.initializers.orthogonal()(k, (d_out, d_hidden), dtype) for k in keys], axis=1)


class LSTMLayer(nn.Module):
    d_hidden: int
    d_proj: int = 0
    unroll: int = 1
    hoist_inputs: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        d_out = self.d_proj or self.d_hidden
        # Raw arrays rather than Dense submodules: they are used inside lax.scan, where linen modules
        # cannot be called. Gates are laid out (4, d_hidden) so tensor parallelism splits every gate alike.
        # Initialisers as flax's LSTM cells: LeCun-normal inputs, orthogonal recurrence.
        gate_axes = ("embed", None, "mlp")
        self.input_kernel = self.param("input_kernel", partitioned(LECUN_GATES, gate_axes),
                                       (d_out, 4, self.d_hidden), jnp.float32)
        self.recurrent_kernel = self.param("recurrent_kernel", partitioned(_orthogonal_per_gate, gate_axes),
                                           (d_out, 4, self.d_hidden), jnp.float32)
        self.bias = self.param("bias", partitioned(_forget_bias_init, (None, "mlp")), (4, self.d_hidden), jnp.float32)
        if self.d_proj:
            self.projection = self.param("projection", partitioned(nn.initializers.lecun_normal(), ("mlp", "embed")),
                                         (self.d_hidden, self.d_proj), jnp.float32)

    def initial_carry(self, batch: int):
        return (jnp.zeros((batch, self.d_hidden), jnp.float32),
                jnp.zeros((batch, self.d_proj or self.d_hidden), self.dtype))

    def _input_gates(self, x):
        """x (..., d_in) -> (..., 4, d_hidden): the input part of all four gates, bias included."""
        return _gate_matmul(x, self.input_kernel.astype(self.dtype)) + self.bias.astype(self.dtype)

    def _cell(self, carry, input_gates):
        """One time step given the input part of the gates (batch, 4, d_hidden)."""
        c, h = carry
        gates = input_gates + _gate_matmul(h, self.recurrent_kernel.astype(self.dtype))
        gates = gates.astype(jnp.float32)
        i, f, g, o = (gates[:, k] for k in range(4))
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(self.dtype)
        if self.d_proj:
            h = h @ self.projection.astype(self.dtype)
        return (c, h), h

    def __call__(self, x, carry=None):
        """x (batch, time, d_in) -> (outputs (batch, time, d_out), final carry)."""
        carry = self.initial_carry(x.shape[0]) if carry is None else carry
        if self.hoist_inputs:  # one big input matmul for every step, only the recurrent one in the loop
            body, xs = self._cell, self._input_gates(x)
        else:  # both matmuls inside the loop (measured 1.5-2x faster forward on CPU)
            body, xs = (lambda carry_, x_t: self._cell(carry_, self._input_gates(x_t))), x
        carry, outputs = jax.lax.scan(body, carry, jnp.swapaxes(xs, 0, 1), unroll=self.unroll)
        return jnp.swapaxes(outputs, 0, 1), carry

    def step(self, x_t, carry):
        """x_t (batch, d_in) -> (output (batch, d_out), carry)."""
        carry, h = self._cell(carry, self._input_gates(x_t))
        return h, carry


class LSTMLanguageModel(nn.Module):
    cfg: LSTMConfig

    def setup(self):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        self.embed = Embedder(cfg.vocab_size, cfg.d_out, cfg.tie_embeddings, dtype)
        self.layers = [LSTMLayer(cfg.d_model, cfg.d_proj, cfg.unroll, cfg.hoist_inputs, dtype)
                       for _ in range(cfg.n_layers)]
        # A final LayerNorm before the unembedding, as the transformer's: h lies in (-1, 1) and starts
        # ~0.05, so without it the logits start ~0.01 and training sits on the unigram plateau for
        # hundreds of steps (KJV bytes, d 64, 300 steps at lr 2e-2: loss 2.93 without, 1.58 with).
        self.norm_out = Norm(dtype)

    def _embed(self, tokens):
        # The shared table starts at std 0.02 (right for the output head); scaled by sqrt(width) the
        # LSTM's inputs start O(0.1-1) instead of vanishing against its O(1/sqrt(d)) input kernels
        # (Vaswani et al. 2017 scale tied embeddings the same way).
        return self.embed.embed(tokens) * jnp.sqrt(jnp.asarray(self.cfg.d_out, self.embed.dtype))

    def __call__(self, tokens, *, train: bool = False):
        x = self._embed(tokens)
        for layer in self.layers:
            x, _ = layer(x)
        return self.embed.logits(self.norm_out(x))

    def step(self, token, state):
        """token (batch,) int -> (logits (batch, vocab) float32, state)."""
        x = self._embed(token)
        carries = []
        for layer, carry in zip(self.layers, state):
            x, carry = layer.step(x, carry)
            carries.append(carry)
        return self.embed.logits(self.norm_out(x)[:, None])[:, 0], carries


def init_recurrent_state(cfg: LSTMConfig, batch: int) -> list:
    """Per layer (c (batch, d_model) float32, h (batch, d_out)): zeros before the first token."""
    dtype = dtype_of(cfg.dtype)
    return [(jnp.zeros((batch, cfg.d_model), jnp.float32), jnp.zeros((batch, cfg.d_out), dtype))
            for _ in range(cfg.n_layers)]


def generate_step(cfg: LSTMConfig, params, state, token):
    """(params, state, token (batch,)) -> (logits (batch, vocab), state); jit with cfg static."""
    return LSTMLanguageModel(cfg).apply({"params": params}, token, state, method="step")


def forward_flops_per_token(cfg: LSTMConfig, seq_len: int) -> float:
    """Gate matmuls 2·4·(d_in + d_out)·d_hidden per layer (input and recurrent), the projection
    2·d_hidden·d_proj, the unembedding. Element-wise gate arithmetic is excluded (convention)."""
    d_h, d_out = cfg.d_model, cfg.d_out
    per_layer = dense_flops(d_out + d_out, 4 * d_h) + (dense_flops(d_h, cfg.d_proj) if cfg.d_proj else 0.0)
    return cfg.n_layers * per_layer + dense_flops(d_out, cfg.vocab_size)


FAMILIES = [
    Family("lstm", LSTMConfig, LSTMLanguageModel, forward_flops_per_token,
           "multi-layer LSTM (fused 4-gate cell, optional LSTMP projection), scanned over time"),
]
