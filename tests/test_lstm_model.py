"""The LSTM language model: causality, recurrent steps = the scanned forward (with and without the
LSTMP projection), hoisted input gates = in-loop, parameter count, a few training steps."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmu_jax.config import config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.flops import param_counts
from lmu_jax.models.lstm import (
    LSTMConfig,
    LSTMLanguageModel,
    _run_cells,
    generate_step,
    init_recurrent_state,
    lstm_sequence,
)

from helpers import repeated_batch_losses

VOCAB, SEQ = 40, 17


def tiny(**keys):
    cfg = LSTMConfig(**{"d_model": 24, "n_layers": 2, **keys}).resolved(VOCAB, SEQ)
    cfg.validate()
    return cfg


def init_params(cfg, seed=0):
    model = LSTMLanguageModel(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, SEQ), jnp.int32), {})["params"])
    # A larger embedding than the 0.02 init, so that logits are O(1) and differences show.
    params["embed"]["embedding"] = params["embed"]["embedding"] * 25.0
    return model, params


def random_tokens(seed, batch=2, length=SEQ):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, VOCAB)


def test_causal():
    model, params = init_params(tiny(d_proj=12))
    tokens = random_tokens(1)
    t = 6
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % VOCAB)
    apply = jax.jit(lambda variables, t: model.apply(variables, t, {})[0])
    before = apply({"params": params}, tokens)
    after = apply({"params": params}, changed)
    np.testing.assert_array_equal(after[:, : t + 1], before[:, : t + 1])
    assert float(jnp.abs(after[:, t + 1:] - before[:, t + 1:]).max()) > 1e-2


@pytest.mark.parametrize("d_proj", [0, 12])
def test_recurrent_steps_equal_the_scan(d_proj):
    cfg = tiny(d_proj=d_proj)
    model, params = init_params(cfg)
    tokens = random_tokens(2)
    parallel = jax.jit(model.apply)({"params": params}, tokens, {})[0]
    state = init_recurrent_state(cfg, batch=2)
    step = jax.jit(lambda p, s, tok: generate_step(cfg, p, s, tok))
    recurrent = []
    for i in range(SEQ):
        logits, state = step(params, state, tokens[:, i])
        recurrent.append(logits)
    recurrent = jnp.stack(recurrent, axis=1)
    np.testing.assert_allclose(recurrent, parallel, rtol=0, atol=1e-5 * float(jnp.abs(parallel).max()))
    assert [tuple(c.shape) for c, _ in state] == [(2, 24)] * 2
    assert [tuple(h.shape) for _, h in state] == [(2, d_proj or 24)] * 2


def test_hoisted_input_gates_and_unrolling_change_nothing():
    tokens = random_tokens(3)
    _, params = init_params(tiny())
    reference = jax.jit(LSTMLanguageModel(tiny()).apply)({"params": params}, tokens, {})[0]
    for keys in ({"hoist_inputs": True}, {"unroll": 4}):
        out = jax.jit(LSTMLanguageModel(tiny(**keys)).apply)({"params": params}, tokens, {})[0]
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5 * float(jnp.abs(reference).max()), err_msg=str(keys))


@pytest.mark.parametrize("d_proj", [0, 10])
def test_parameter_count(d_proj):
    d, layers = 24, 3
    cfg = tiny(n_layers=layers, d_proj=d_proj, tie_embeddings=False)
    d_out = d_proj or d
    per_layer = 4 * d * (d_out + d_out) + 4 * d + (d * d_proj if d_proj else 0)  # W_x, W_h, b, W_p
    counts = param_counts(cfg)
    assert counts["non_embedding"] == layers * per_layer + 2 * d_out  # + the final norm
    assert counts["embedding"] == 2 * VOCAB * d_out  # untied: input table and output head


def test_forget_gate_bias_starts_at_one():
    _, params = init_params(tiny())
    bias = params["layers_0"]["bias"]
    assert bias.shape == (4, 24)
    np.testing.assert_array_equal(bias[1], 1.0)
    np.testing.assert_array_equal(bias[np.array([0, 2, 3])], 0.0)


def test_config_keys():
    cfg = config_from_dict({"model": {"family": "lstm", "d_proj": 64}}).model
    assert isinstance(cfg, LSTMConfig) and cfg.d_out == 64
    for bad in ({"d_proj": -1}, {"unroll": 0}, {"order": 4}):
        with pytest.raises(UserError):
            config_from_dict({"model": {"family": "lstm", **bad}})


def test_a_few_train_steps_lower_the_loss():
    cfg = tiny(d_model=32)
    model = LSTMLanguageModel(cfg)
    windows = random_tokens(4, batch=4, length=SEQ + 1)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), windows[:, :-1], {})["params"])
    losses = repeated_batch_losses(model, params, windows, lr=2e-2, steps=10)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("d_proj", [0, 16])
def test_own_backward_pass_matches_autodiff_of_the_scan(d_proj):
    """lstm_sequence's hand-written backward pass = jax's autodiff of the same forward scan, for x,
    every weight and the initial carry, with cotangents on the outputs and on the final carry."""
    batch, time, d_in, d_hidden = 3, 7, 5, 6
    d_out = d_proj or d_hidden
    keys = iter(jax.random.split(jax.random.key(0), 10))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    args = (normal(batch, time, d_in), normal(d_in, 4, d_hidden) / 2, normal(d_out, 4, d_hidden) / 2,
            normal(4, d_hidden), normal(d_hidden, d_out) / 2 if d_proj else None,
            (normal(batch, d_hidden), normal(batch, d_out)))
    weights = (normal(batch, time, d_out), normal(batch, d_hidden), normal(batch, d_out))

    def loss(sequence_fn, *xs):
        outputs, (c, h) = sequence_fn(*xs)
        return jnp.sum(outputs * weights[0]) + jnp.sum(c * weights[1]) + jnp.sum(h * weights[2])

    def autodiff_scan(*xs):
        return _run_cells(*xs, 1, False, False)[:2]

    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    ours = jax.grad(lambda *xs: loss(lstm_sequence, *xs), argnums=argnums)(*args)
    reference = jax.grad(lambda *xs: loss(autodiff_scan, *xs), argnums=argnums)(*args)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
