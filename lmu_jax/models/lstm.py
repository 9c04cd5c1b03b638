"""Multi-layer LSTM language model (family ``lstm``), optionally with LSTMP output projections.

Each layer is the standard LSTM cell (Hochreiter & Schmidhuber 1997 with a forget gate):

    i, f, g, o = σ, σ, tanh, σ of  (x_t W_x + b) + h_{t-1} W_h      one fused (4, d_hidden) gate matmul each
    c_t = f c_{t-1} + i g,   h_t = o tanh(c_t)   [, h_t = h_t W_p  with ``d_proj`` (Sak et al. 2014)]

Layers are stacked without residuals; a final LayerNorm, then the (tied) unembedding.

The time loop is ``lax.scan`` over our own cell rather than ``nn.RNN(nn.OptimizedLSTMCell)``, because
the LSTMP projection feeds back into the recurrence, which the flax cell cannot express; the math and
the fused 4-gate matmuls are the same, and so is the speed under autodiff. The backward pass is our
own (``lstm_sequence``): the reverse scan does only the recurrent matmul per step, and the input and
weight gradients are whole-sequence matmuls after it, which makes the step faster on CPU at d >= 512
(README "Performance"). ``hoist_inputs`` moves the forward
input-to-gate matmul of every step out of the loop into one big matmul. On CPU (XLA, jax 0.10) the
forward alone measured slower hoisted (1.5-2x at widths 64-512), but the whole train step with this
backward pass, batch 16 x 256, measured 0.98-1.11x the in-loop step at d 256 and 0.78-0.95x at
d 512-1024 (benchmarks/results/cpu_xla_flags.md, notes; losses within 6.2e-6). So ``hoist_inputs:
auto`` (the default) hoists on CPU from d_model 512 (``CPU_HOIST_FROM``) and keeps the matmul in the
loop elsewhere: the same update either way, summed in another order. Hoisting is the usual win on
GPU/TPU, but not measured there yet, so auto does not choose it there. The cell state stays float32.

Widths: ``d_model`` is the cell width; ``d_proj`` (if set) is the projected output width, which is
then also the embedding width and every layer's input width (as in Jozefowicz et al. 2016).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmu_jax.errors import bad_value
from lmu_jax.models.base import Family, ModelConfig, ShapeRule, dense_flops
from lmu_jax.models.layers import Embedder, Norm, dtype_of, partitioned

CPU_HOIST_FROM = 512  # d_model from which the hoisted input matmul made the CPU train step faster
FORGET_GATE = 1  # gate order along the fused axis: input, forget, cell, output
LECUN_GATES = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))  # fan-in = d_in for (d_in, 4, d_hidden)


@dataclass(frozen=True)
class LSTMConfig(ModelConfig):
    family: str = "lstm"
    d_proj: int = 0  # LSTMP output projection width (0 = none); also the embedding width when set
    unroll: int = 1  # time steps per lax.scan iteration (a speed knob; results are identical)
    hoist_inputs: bool | str = "auto"  # input-to-gate matmul for all steps before the scan (False: inside it);
    #                                    auto: True on CPU from d_model CPU_HOIST_FROM (module docstring)

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
        self.check_auto_flag("hoist_inputs", self.hoist_inputs)

    def resolve_auto(self, platform: str) -> "LSTMConfig":
        if self.hoist_inputs != "auto":
            return self
        return replace(self, hoist_inputs=platform == "cpu" and self.d_model >= CPU_HOIST_FROM)


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


def _gates_to_state(gates, c_prev, dtype):
    """Pre-activations (batch, 4, d_hidden) float32 -> (i, f, g, o activations, c_t, h_t before any
    projection, in dtype)."""
    i, f, o = (jax.nn.sigmoid(gates[:, k]) for k in (0, FORGET_GATE, 3))
    g = jnp.tanh(gates[:, 2])
    c = f * c_prev + i * g
    return (i, f, g, o), c, (o * jnp.tanh(c)).astype(dtype)


def _run_cells(x, input_kernel, recurrent_kernel, bias, projection, carry, unroll, hoist, keep):
    """The forward scan: x (batch, time, d_in) -> (outputs (batch, time, d_out), final carry, and
    with `keep` the backward pass's residuals per step: activations, c_t, unprojected h_t)."""

    def input_gates(x_t):
        return _gate_matmul(x_t, input_kernel) + bias

    def cell(carry_, inputs):
        c_prev, h_prev = carry_
        gates = inputs if hoist else input_gates(inputs)
        gates = (gates + _gate_matmul(h_prev, recurrent_kernel)).astype(jnp.float32)
        acts, c, h_raw = _gates_to_state(gates, c_prev, h_prev.dtype)
        h = h_raw @ projection if projection is not None else h_raw
        return (c, h), (h, (acts, c, h_raw) if keep else None)

    xs = input_gates(x) if hoist else x
    carry, (outputs, kept) = jax.lax.scan(cell, carry, jnp.swapaxes(xs, 0, 1), unroll=unroll)
    return jnp.swapaxes(outputs, 0, 1), carry, kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def lstm_sequence(x, input_kernel, recurrent_kernel, bias, projection, carry, unroll=1, hoist=False):
    """An LSTM layer over a whole sequence: x (batch, time, d_in), kernels (d_in | d_out, 4, d_hidden),
    bias (4, d_hidden), projection (d_hidden, d_out) or None, carry (c, h) -> (outputs, final carry).

    Differentiated by its own backward pass: the reverse scan carries only what flows back through
    time (dc, dh) and does one matmul per step (dh_{t-1} = dgates_t W_hᵀ); the gradients of x and of
    every weight are then whole-sequence matmuls over the per-step dgates it emits. Autodiff of the
    scan instead does three more (batch-row) matmuls per step and adds each step's weight gradients
    into (d, 4, d_hidden) accumulators (CPU, d 512, 8192 tokens: a train step of 1.25-1.43 s, against
    1.01-1.04 s with this backward pass)."""
    outputs, carry, _ = _run_cells(x, input_kernel, recurrent_kernel, bias, projection, carry, unroll, hoist, False)
    return outputs, carry


def _lstm_sequence_fwd(x, input_kernel, recurrent_kernel, bias, projection, carry, unroll, hoist):
    outputs, final, kept = _run_cells(x, input_kernel, recurrent_kernel, bias, projection, carry, unroll, hoist, True)
    return (outputs, final), (x, input_kernel, recurrent_kernel, bias, projection, carry, outputs, kept)


def _lstm_sequence_bwd(unroll, hoist, residuals, cotangents):
    x, input_kernel, recurrent_kernel, bias, projection, (c0, h0), outputs, (acts, cs, h_raws) = residuals
    d_outputs, (dc_final, dh_final) = cotangents
    dtype = h0.dtype
    w_h = recurrent_kernel.reshape(recurrent_kernel.shape[0], -1)  # (d_out, 4 d_hidden)
    # Transposed once, before the reverse scan: written as w_h.T inside it, XLA contracts the weight on its
    # last dim at every step, which YNNPACK ran at 34 GFLOP/s against the forward's 53 in a profile of the
    # CPU d 256 step (python -m benchmarks.step_profile); transposed here, that step ran 6 % faster (d 512 the same)
    w_h_t = w_h.T
    c_prevs = jnp.concatenate([c0[None], cs[:-1]])  # (time, batch, d_hidden)

    def step_back(carry_, inputs):
        dc, dh_next = carry_  # float32 (batch, d_hidden), (batch, d_out)
        d_out_t, (i, f, g, o), c, c_prev = inputs
        dh = d_out_t.astype(jnp.float32) + dh_next
        dh_raw = dh @ projection.T.astype(jnp.float32) if projection is not None else dh
        tanh_c = jnp.tanh(c)
        dc = dc + dh_raw * o * (1 - tanh_c**2)
        d_gates = jnp.stack([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g**2),
                             dh_raw * tanh_c * o * (1 - o)], axis=1).astype(dtype)  # (batch, 4, d_hidden)
        dh_prev = (d_gates.reshape(d_gates.shape[0], -1) @ w_h_t).astype(jnp.float32)
        return (dc * f, dh_prev), (d_gates, dh if projection is not None else None)

    (dc0, dh0), (d_gates, dhs) = jax.lax.scan(
        step_back, (dc_final.astype(jnp.float32), dh_final.astype(jnp.float32)),
        (jnp.swapaxes(d_outputs, 0, 1), acts, cs, c_prevs), reverse=True, unroll=unroll)  # dh: d loss / d h_t
    # Whole-sequence matmuls: rows are (time, batch) pairs.
    time_major = jnp.swapaxes(x, 0, 1)
    h_prevs = jnp.concatenate([h0[None], jnp.swapaxes(outputs, 0, 1)[:-1]])
    flat_gates = d_gates.reshape(-1, d_gates.shape[2] * d_gates.shape[3])
    w_x = input_kernel.reshape(input_kernel.shape[0], -1)
    dx = jnp.swapaxes((flat_gates @ w_x.T).reshape(*time_major.shape[:2], -1), 0, 1).astype(x.dtype)
    d_input_kernel = (time_major.reshape(-1, w_x.shape[0]).T @ flat_gates).reshape(input_kernel.shape)
    d_recurrent_kernel = (h_prevs.reshape(-1, w_h.shape[0]).T @ flat_gates).reshape(recurrent_kernel.shape)
    d_bias = jnp.sum(d_gates.astype(jnp.float32), axis=(0, 1)).astype(bias.dtype)
    d_projection = None
    if projection is not None:
        d_projection = (h_raws.reshape(-1, h_raws.shape[-1]).T.astype(jnp.float32)
                        @ dhs.reshape(-1, dhs.shape[-1])).astype(projection.dtype)
    return (dx, d_input_kernel.astype(input_kernel.dtype), d_recurrent_kernel.astype(recurrent_kernel.dtype),
            d_bias, d_projection, (dc0.astype(c0.dtype), dh0.astype(h0.dtype)))


lstm_sequence.defvjp(_lstm_sequence_fwd, _lstm_sequence_bwd)


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

    def _weights(self):
        """The layer's weights in the compute dtype: input and recurrent kernels, bias, projection."""
        projection = self.projection.astype(self.dtype) if self.d_proj else None
        return (self.input_kernel.astype(self.dtype), self.recurrent_kernel.astype(self.dtype),
                self.bias.astype(self.dtype), projection)

    def __call__(self, x, carry=None):
        """x (batch, time, d_in) -> (outputs (batch, time, d_out), final carry)."""
        carry = self.initial_carry(x.shape[0]) if carry is None else carry
        return lstm_sequence(x, *self._weights(), carry, self.unroll, self.hoist_inputs)

    def step(self, x_t, carry):
        """x_t (batch, d_in) -> (output (batch, d_out), carry): one token, the scan's cell."""
        outputs, carry = lstm_sequence(x_t[:, None], *self._weights(), carry)
        return outputs[:, 0], carry


class LSTMLanguageModel(nn.Module):
    cfg: LSTMConfig

    def setup(self):
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        self.embed = Embedder(cfg.vocab_size, cfg.d_out, cfg.tie_embeddings, dtype)
        self.layers = [LSTMLayer(cfg.d_model, cfg.d_proj, cfg.unroll, cfg.hoist_inputs is True, dtype)
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

    def __call__(self, tokens, carry, *, train: bool = False):
        """(logits, carry): each window starts from zero cells, the (empty) carry passes through."""
        x = self._embed(tokens)
        for layer in self.layers:
            x, _ = layer(x)
        return self.embed.logits(self.norm_out(x)), carry

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


def forward_flops_per_token(cfg: LSTMConfig, seq_len: int, *, feeds_carry: bool = False) -> float:
    """Gate matmuls 2·4·(d_in + d_out)·d_hidden per layer (input and recurrent), the projection
    2·d_hidden·d_proj, the unembedding. Element-wise gate arithmetic is excluded (convention). No carry,
    so ``feeds_carry`` changes nothing."""
    d_h, d_out = cfg.d_model, cfg.d_out
    per_layer = dense_flops(d_out + d_out, 4 * d_h) + (dense_flops(d_h, cfg.d_proj) if cfg.d_proj else 0.0)
    return cfg.n_layers * per_layer + dense_flops(d_out, cfg.vocab_size)


FAMILIES = [
    Family("lstm", LSTMConfig, LSTMLanguageModel, forward_flops_per_token,
           "multi-layer LSTM (fused 4-gate cell, optional LSTMP projection), scanned over time",
           shape_rule=ShapeRule(scaled=("d_proj",))),
]
