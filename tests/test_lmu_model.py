"""The LMU language model (families lmu, lmu_attn): causality for every memory path, recurrent
generation = parallel forward, parameter count = the paper's formula, float32 memory under bf16,
strict config keys, and a few training steps through the one train step."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmu_jax.config import config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.flops import param_counts
from lmu_jax.models.lmu import (ImplicitAttention, LMUAttnConfig, LMUConfig, LMULanguageModel, generate_step,
                                init_recurrent_state)
from lmu_jax.sharding import LOGICAL_RULES

from helpers import repeated_batch_losses

VOCAB, SEQ = 48, 21  # 21: not a multiple of the chunk length below


def tiny(family="lmu", **keys):
    cls = LMUAttnConfig if family == "lmu_attn" else LMUConfig
    defaults = dict(d_model=16, n_layers=2, order=12, q_reduced=3, chunk_len=8)
    if family == "lmu_attn":
        defaults["n_heads"] = 2
    cfg = cls(**{**defaults, **keys}).resolved(VOCAB, SEQ)
    cfg.validate()
    return cfg


def init_params(cfg, seed=0):
    """Initialised parameters with the embedding scaled up, so logits are O(1) and differences show."""
    model = LMULanguageModel(cfg)
    tokens = jnp.zeros((1, SEQ), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens, {})["params"])
    params["embed"]["embedding"] = params["embed"]["embedding"] * 25.0
    return model, params


def random_tokens(seed, batch=2, length=SEQ):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, VOCAB)


@pytest.mark.parametrize("family", ["lmu", "lmu_attn"])
def test_causal_for_every_memory_impl_and_impls_agree(family):
    tokens = random_tokens(1)
    t = 9
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % VOCAB)
    outputs = {}
    for impl in ("sequential", "fft", "chunked"):  # chunk_len 8 does not divide SEQ = 21
        model, params = init_params(tiny(family, memory_impl=impl))
        apply = jax.jit(lambda variables, t: model.apply(variables, t, {})[0])
        before = apply({"params": params}, tokens)
        after = apply({"params": params}, changed)
        scale = float(jnp.abs(before).max())
        # The FFT spreads float32 rounding over the whole window (~1e-7 relative); the others are exact.
        np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-5 * scale, err_msg=impl)
        assert float(jnp.abs(after[:, t + 1:] - before[:, t + 1:]).max()) > 1e-3 * scale  # the test can fail
        outputs[impl] = before
    for impl in ("fft", "chunked"):  # same parameters (same seed), so the same logits
        np.testing.assert_allclose(outputs[impl], outputs["sequential"], rtol=0, atol=1e-5 * scale, err_msg=impl)


@pytest.mark.parametrize("family", ["lmu", "lmu_attn"])
def test_recurrent_generation_equals_parallel(family):
    cfg = tiny(family, memory_impl="fft")
    model, params = init_params(cfg)
    tokens = random_tokens(3)
    parallel = jax.jit(model.apply)({"params": params}, tokens, {})[0]
    state = init_recurrent_state(cfg, batch=2, max_len=SEQ)
    step = jax.jit(lambda p, s, tok: generate_step(cfg, p, s, tok))
    recurrent = []
    for i in range(SEQ):
        logits, state = step(params, state, tokens[:, i])
        recurrent.append(logits)
    recurrent = jnp.stack(recurrent, axis=1)
    assert recurrent.dtype == jnp.float32 and recurrent.shape == parallel.shape
    error = float(jnp.abs(recurrent - parallel).max())
    assert error < 1e-4 * float(jnp.abs(parallel).max()), error
    # ... and small against what the memory path itself contributes (readout p = 0 removes it).
    silenced = jax.tree.map(lambda x: x, params)
    for i in range(cfg.n_layers):
        silenced[f"blocks_{i}"]["memory"]["readout"] = jnp.zeros_like(params[f"blocks_{i}"]["memory"]["readout"])
    contribution = float(jnp.abs(parallel - jax.jit(model.apply)({"params": silenced}, tokens, {})[0]).max())
    assert error < 1e-4 * contribution, (error, contribution)
    assert int(state["position"]) == SEQ


def test_implicit_attention_is_eqs_8_to_10_in_float64():
    """attend (readout first, (r^T P) V) against eqs. 8-10 as written, M' = softmax(Q K^T) V then r^T M',
    in float64 NumPy, with the gelu on the reduced rows (eq. 7)."""
    cfg = tiny()
    module = ImplicitAttention(cfg)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, SEQ, cfg.d_model))
    params = nn.meta.unbox(module.init(jax.random.PRNGKey(4), x)["params"])
    reduced = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, SEQ, 3 * cfg.q_reduced, cfg.d_model)))
    got = module.apply({"params": params}, jnp.asarray(reduced, jnp.float32), method=ImplicitAttention.attend)

    gelu = 0.5 * reduced * (1 + np.tanh(np.sqrt(2 / np.pi) * (reduced + 0.044715 * reduced ** 3)))
    query, key, value = np.split(gelu, 3, axis=-2)  # (..., q', d)
    scores = np.einsum("...id,...jd->...ij", query, key) * cfg.logit_scale
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = np.einsum("...ij,...jd->...id", weights, value)  # M'
    want = np.einsum("...id,i->...d", mixed, np.asarray(params["readout"], np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lmu_recurrent_state_is_constant_size():
    """The lmu variant's state is the q x d memory per layer (and a step counter), whatever the length."""
    cfg = tiny()
    state = init_recurrent_state(cfg, batch=3)
    assert [tuple(layer["memory"].shape) for layer in state["layers"]] == [(3, 16, 12)] * 2
    assert all(set(layer) == {"memory"} for layer in state["layers"])
    _, params = init_params(cfg)
    logits, after = jax.eval_shape(lambda p, s, tok: generate_step(cfg, p, s, tok), params, state,
                                   jnp.zeros((3,), jnp.int32))
    assert logits.shape == (3, VOCAB)
    assert jax.tree.map(lambda x: x.shape, after) == jax.tree.map(jnp.shape, state)
    with pytest.raises(ValueError, match="max_len"):
        init_recurrent_state(tiny("lmu_attn"), batch=1)  # global attention needs a KV cache size


@pytest.mark.parametrize("family", ["lmu", "lmu_attn"])
def test_parameter_count_matches_formula(family):
    cfg = tiny(family, d_model=24, n_layers=3, order=40, q_reduced=0, d_ff=40)
    d, q, d_ff = 24, 40, 40
    q_reduced = 4  # 0 = order // 10
    lmu_part = 3 * q * q_reduced + q_reduced  # Table 2: the L_i, 3qq', and the readout p, q'
    ffn = 2 * d * d_ff + d_ff + d  # W1, b1, W2, b2
    first = 4 * d * d + 4 * d if family == "lmu_attn" else ffn  # attention: Q, K, V, output and biases
    norms = 3 * 2 * d
    expected = 3 * (lmu_part + first + ffn + norms) + 2 * d  # + the final norm
    counts = param_counts(cfg)
    assert counts["non_embedding"] == expected
    assert counts["embedding"] == VOCAB * d  # tied


def test_reduction_parameters_shard_over_order_and_the_readout_is_replicated():
    """The L_i (q' x q) split their q columns over fsdp (at the paper's q=250, q'=25, d=204 they are 5 % of
    a layer's parameters, more than the fsdp guard's 2 % tolerance allows to stay whole); the readout p
    (q',) and the q' rows stay replicated."""
    cfg = tiny()
    tokens = jnp.zeros((1, SEQ), jnp.int32)
    boxed = jax.eval_shape(lambda: LMULanguageModel(cfg).init(jax.random.PRNGKey(0), tokens, {}))
    memory = boxed["params"]["blocks_0"]["memory"]
    assert memory["l_query"].names == ("order_reduced", "order")
    assert memory["readout"].names == ("order_reduced",)
    specs = nn.logical_to_mesh(nn.get_partition_spec(memory), LOGICAL_RULES)
    for name in ("l_query", "l_key", "l_value"):
        assert specs[name] == P(None, "fsdp")
    assert specs["readout"] == P(None)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


@pytest.mark.parametrize("impl", ["fft", "chunked"])
def test_memory_and_implicit_attention_stay_float32_under_bf16(impl):
    cfg = tiny(dtype="bfloat16", memory_impl=impl)
    module = ImplicitAttention(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, SEQ, 16)).astype(jnp.bfloat16)
    variables = jax.jit(module.init)(jax.random.PRNGKey(1), x)
    jaxpr = jax.make_jaxpr(lambda v, x: module.apply(v, x))(variables, x).jaxpr
    bf16_results = [e for e in _all_eqns(jaxpr) if any(v.aval.dtype == jnp.bfloat16 for v in e.outvars)]
    # Only the final cast of the sub-block's output back to the compute dtype is bf16.
    assert [e.primitive.name for e in bf16_results] == ["convert_element_type"]
    assert bf16_results[0] is jaxpr.eqns[-1] or bf16_results[0].outvars[0] in set(jaxpr.outvars)
    assert [v.aval.dtype for v in jaxpr.outvars] == [jnp.bfloat16]
    if impl == "fft":  # XLA's FFT rejects bf16: the transforms see float32 / complex64
        ffts = [e for e in _all_eqns(jaxpr) if e.primitive.name == "fft"]
        assert ffts and all(e.invars[0].aval.dtype in (jnp.float32, jnp.complex64) for e in ffts)


def test_config_keys_resolve_and_validate():
    cfg = config_from_dict({"model": {"family": "lmu", "order": 100}}).model
    assert isinstance(cfg, LMUConfig) and cfg.theta == 0.0
    resolved = cfg.resolved(256, 512)
    assert resolved.theta == 512.0 and resolved.reduced_order == 10 and resolved.ff_width == 4 * cfg.d_model
    assert math.isclose(resolved.logit_scale, 1 / math.sqrt(cfg.d_model))
    attn = config_from_dict({"model": {"family": "lmu_attn", "n_heads": 2}}).model
    assert isinstance(attn, LMUAttnConfig) and attn.positions == "rope"
    for bad in ({"family": "lmu", "memory_impl": "diagonal"}, {"family": "lmu", "q_reduced": 65},
                {"family": "lmu", "n_heads": 2}, {"family": "lmu_attn", "n_heads": 3},
                {"family": "lmu_attn", "positions": "learned"}):
        with pytest.raises(UserError):
            config_from_dict({"model": bad})


@pytest.mark.parametrize("family", ["lmu", "lmu_attn"])
def test_a_few_train_steps_lower_the_loss(family):
    cfg = tiny(family, d_model=32, n_layers=1, order=16, q_reduced=0)
    model = LMULanguageModel(cfg)
    windows = random_tokens(4, batch=4, length=SEQ + 1)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), windows[:, :-1], {})["params"])
    losses = repeated_batch_losses(model, params, windows, lr=1e-2, steps=10)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, losses
