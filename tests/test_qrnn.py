"""QRNN and hybrid stacks: associative scan = sequential scan = a loop, the layer against a NumPy QRNN in
the PyTorch code's flipped gate convention, carried state across segments (window-2 inputs, cells,
attention memory), causality for every pattern, the pattern language, parameter counts, FLOPs against
XLA, and a few train steps."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmu_jax.cli import main as cli_main
from lmu_jax.config import config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.flops import param_counts, xla_flops
from lmu_jax.models.qrnn import (QRNN, HybridConfig, HybridLM, forward_flops_per_token, initial_carry,
                                 linear_recurrence, parse_pattern, qrnn_flops_per_token)

from helpers import repeated_batch_losses

VOCAB, SEG = 19, 6


def tiny(**keys):
    defaults = dict(d_model=16, n_layers=1, n_head=2, d_inner=32, dropout=0.0, mem_len=2 * SEG, pattern="Q2AQF")
    cfg = HybridConfig(**{**defaults, **keys}).resolved(VOCAB, SEG)
    cfg.validate()
    return cfg


def init(cfg, seed=0):
    model = HybridLM(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, SEG), jnp.int32), {})["params"])
    return model, params


def random_tokens(seed, batch=2, length=SEG):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, VOCAB)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_associative_scan_equals_sequential_scan_and_a_loop():
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.uniform(key_a, (3, 200, 8), minval=0.5, maxval=1.0)
    b = jax.random.normal(key_b, (3, 200, 8))
    parallel, sequential = linear_recurrence(a, b, "associative"), linear_recurrence(a, b, "sequential")
    np.testing.assert_allclose(parallel, sequential, rtol=1e-6, atol=1e-6)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c, loop = np.zeros((3, 8)), []
    for t in range(200):
        c = a64[:, t] * c + b64[:, t]
        loop.append(c)
    np.testing.assert_allclose(sequential, np.stack(loop, 1), rtol=1e-5, atol=1e-5)


def numpy_qrnn_flipped(x, prev_x, c0, kernel, bias):
    """The pytorch-qrnn recurrence, gates from one matmul over the window (oldest input first, as our
    kernel's rows): F_code = σ(−(W_f x + b_f)) = 1 − f, c_t = F_code z_t + (1 − F_code) c_{t−1}, h_t = o_t c_t."""
    padded = np.concatenate([prev_x, x], axis=1)
    window = kernel.shape[0] // x.shape[-1]
    length = x.shape[1]
    windowed = np.concatenate([padded[:, i:i + length] for i in range(window)], axis=-1)
    gates = np.einsum("btk,kgh->btgh", windowed, kernel) + bias
    z, f_code, o = np.tanh(gates[:, :, 0]), sigmoid(-gates[:, :, 1]), sigmoid(gates[:, :, 2])
    c, hs = c0, []
    for t in range(length):
        c = f_code[:, t] * z[:, t] + (1 - f_code[:, t]) * c
        hs.append(o[:, t] * c)
    return np.stack(hs, 1), c, padded[:, length:]


@pytest.mark.parametrize("scan", ["associative", "sequential"])
def test_qrnn_layer_matches_the_flipped_convention_with_a_carry(scan):
    batch, length, d = 2, 7, 5
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    x = jax.random.normal(keys[0], (batch, length, d))
    carry = (jax.random.normal(keys[1], (batch, d)), jax.random.normal(keys[2], (batch, 1, d)))
    layer = QRNN(window=2, hidden=d, forget_bias=0.7, scan=scan)
    params = nn.meta.unbox(layer.init(keys[3], x, carry, train=False)["params"])
    params["gate_kernel"] = params["gate_kernel"] * 40  # gates far from 1/2, so a wrong convention shows
    y, (cell, inputs) = layer.apply({"params": params}, x, carry, train=False)
    h, c_last, last_inputs = numpy_qrnn_flipped(np.asarray(x), np.asarray(carry[1]), np.asarray(carry[0]),
                                                np.asarray(params["gate_kernel"]), np.asarray(params["gate_bias"]))
    norm = params["norm"]["LayerNorm_0"]
    residual = np.asarray(x) + h
    want = (residual - residual.mean(-1, keepdims=True)) / np.sqrt(residual.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, want * norm["scale"] + norm["bias"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cell, c_last, rtol=1e-5, atol=1e-5)  # the carried state is c, not h
    np.testing.assert_array_equal(inputs, last_inputs)


def test_segments_with_a_carry_equal_one_pass():
    """Window-2 inputs, QRNN cells and attention memories carried in lock-step: three segments = one pass."""
    cfg = tiny()
    model, params = init(cfg)
    tokens = random_tokens(2, length=3 * SEG)
    apply = jax.jit(model.apply)
    one_pass, empty = apply({"params": params}, tokens, {})
    assert empty == {}
    carry, pieces = initial_carry(cfg, 2), []
    for start in range(0, 3 * SEG, SEG):
        logits, carry = apply({"params": params}, tokens[:, start:start + SEG], carry)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), one_pass, rtol=1e-5, atol=1e-5)
    assert carry["qrnn_inputs"].shape == (2, 2, 1, cfg.d_model) and carry["qrnn_cell"].dtype == jnp.float32


@pytest.mark.parametrize("pattern", ["Q", "Q3F", "AQ2F", "(AF)*2Q"])
def test_causal_for_every_pattern(pattern):
    cfg = tiny(pattern=pattern, qrnn_window=1)
    model, params = init(cfg)
    apply = jax.jit(lambda variables, t: model.apply(variables, t, {})[0])
    tokens = random_tokens(3, length=9)
    before = apply({"params": params}, tokens)
    for t in (0, 4, 7):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 4) % VOCAB)
        after = apply({"params": params}, changed)
        np.testing.assert_array_equal(after[:, : t + 1], before[:, : t + 1])
        assert np.abs(after[:, t + 1:] - before[:, t + 1:]).max() > 1e-5


def test_pattern_language():
    assert parse_pattern("AF", 2) == (("A", 0), ("F", 0))
    assert parse_pattern("(A Q3)*2 F", 2) == (("A", 0), ("Q", 3), ("A", 0), ("Q", 3), ("F", 0))
    assert parse_pattern("Q2Q*3", 1) == (("Q", 2), ("Q", 1), ("Q", 1), ("Q", 1))  # AWD-QRNN: window 2 first
    assert parse_pattern("((AF)*2Q)*2", 1) == ((("A", 0), ("F", 0)) * 2 + (("Q", 1),)) * 2
    assert HybridConfig(pattern="AF", n_layers=3).blocks == (("A", 0), ("F", 0)) * 3
    for bad in ("", "AX", "(AF", "AF)", "A*", "Q0", "A*0"):
        with pytest.raises(UserError, match="model.pattern"):
            parse_pattern(bad, 1)


def test_transformer_xl_pattern_has_transformer_xl_parameters():
    """pattern=AF x 12 at the enwik8 base shape is Transformer-XL's 41.06 M, parameter for parameter."""
    cfg = HybridConfig(vocab_size=204, d_model=512, n_layers=12, n_head=8, d_head=64, d_inner=2048, pattern="AF")
    assert param_counts(cfg)["total"] == 41_055_436
    qrnn = HybridConfig(vocab_size=204, d_model=64, n_layers=1, pattern="Q2Q", qrnn_window=1, tie_embeddings=False)
    gates = (2 * 64 + 64) * 3 * 64 + 2 * 3 * 64  # one (k·d, 3, d_h) kernel and (3, d_h) bias per Q block
    assert param_counts(qrnn)["non_embedding"] == gates + 2 * 2 * 64  # + two LayerNorms


def test_config_keys_and_registry(capsys):
    raw = {"family": "qrnn_hybrid", "pattern": "(AF)*2 Q2", "qrnn_scan": "sequential"}
    cfg = config_from_dict({"model": raw}).model
    assert len(cfg.blocks) == 2 * 5
    for bad in ({"pattern": "AZ"}, {"qrnn_scan": "fft"}, {"qrnn_zoneout": 1.0}, {"qrnn_window": 0}):
        with pytest.raises(UserError):
            config_from_dict({"model": {"family": "qrnn_hybrid", **bad}})
    assert cli_main(["flops", "--list"]) == 0
    assert "qrnn_hybrid" in capsys.readouterr().out.split()


def test_analytic_flops_match_xla():
    batch, seg_len = 4, 32
    cfg = HybridConfig(d_model=128, n_layers=1, n_head=4, d_inner=512, dropout=0.0, mem_len=seg_len,
                       pattern="AFQ2F").resolved(256, seg_len)
    model, tokens = HybridLM(cfg), jnp.zeros((batch, seg_len), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, {}))["params"])
    forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s)[0])
    xla = xla_flops(forward.lower(params, tokens, initial_carry(cfg, batch)).compile())
    analytic = forward_flops_per_token(cfg, seg_len) * batch * seg_len
    assert 0.95 < xla / analytic < 1.15, (xla, analytic)
    assert qrnn_flops_per_token(cfg, 2) == 2 * 2 * 128 * 3 * 128  # 2·k·d_in·3·d_h (docs/flops.md)


def test_a_few_train_steps_lower_the_loss():
    cfg = tiny(pattern="AQ2F", dropout=0.1, qrnn_zoneout=0.1)
    model, params = init(cfg)
    windows = random_tokens(5, batch=4, length=12 + 1)
    losses = repeated_batch_losses(model, params, windows, lr=1e-2, steps=6)
    assert all(math.isfinite(loss) for loss in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.15, losses


def test_sizes_with_the_solver():
    from lmu_jax.sizing import solve

    cfg = solve("qrnn_hybrid", 100_000, base_cfg=HybridConfig(pattern="AQ2F"), seq_len=32).resolved(256, 32)
    cfg.validate()
    assert abs(param_counts(cfg, 32)["non_embedding"] / 100_000 - 1) <= 0.05


@pytest.mark.parametrize("variant", ["attn_qrnn", "par", "hybrid"])
def test_experiment_configs_load_at_41m(variant):
    from lmu_jax.config import load_config

    from helpers import REPO

    cfg = load_config(REPO / "experiments" / "configs" / f"qrnn_hybrid_enwik8_{variant}.yaml")
    total = param_counts(cfg.model.resolved(258, cfg.data.seq_len), 16)["total"]
    assert abs(total / 41.08e6 - 1) < 0.01, total  # matched to Transformer-XL enwik8 base
