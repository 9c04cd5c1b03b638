"""causal_attention (lmu_jax/models/layers.py), the CPU path that goes by query blocks: values and
gradients against a float64 NumPy reference, at lengths of one, four and eight blocks; and
CausalSelfAttention's fused query/key/value matmul against three separate projections."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmu_jax.models.layers import DEFAULT_INIT, CausalSelfAttention, causal_attention, partitioned


def reference(q, k, v):
    """float64 softmax(q k^T / sqrt(d) + causal mask) v on (batch, time, heads, head_dim)."""
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    time = q.shape[1]
    scores = np.where(np.tril(np.ones((time, time), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v), weights


def reference_grads(q, k, v, cotangent):
    """d(sum(out * cotangent)) / d(q, k, v), by hand in float64."""
    out, weights = reference(q, k, v)
    d_weights = np.einsum("bqhd,bkhd->bhqk", cotangent, v)
    d_v = np.einsum("bhqk,bqhd->bkhd", weights, cotangent)
    d_scores = weights * (d_weights - (d_weights * weights).sum(-1, keepdims=True)) / np.sqrt(q.shape[-1])
    return np.einsum("bhqk,bkhd->bqhd", d_scores, k), np.einsum("bhqk,bqhd->bkhd", d_scores, q), d_v


@pytest.mark.parametrize("time", [7, 100, 384, 1024])  # blocks: 1, 1, 4 of 96, 8 of 128
def test_matches_float64_reference_with_gradients(time):
    rng = np.random.default_rng(time)
    q, k, v, cotangent = (rng.standard_normal((2, time, 2, 16)) for _ in range(4))
    out = causal_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(out, reference(q, k, v)[0], atol=2e-6)

    loss = lambda *qkv: (causal_attention(*qkv) * jnp.asarray(cotangent, jnp.float32)).sum()  # noqa: E731
    grads = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    for got, want in zip(grads, reference_grads(q, k, v, cotangent)):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_future_tokens_do_not_change_the_past():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 8)), jnp.float32) for _ in range(3))
    out = causal_attention(q, k, v)
    changed = causal_attention(q, k.at[:, 200:].set(9.0), v.at[:, 200:].set(-9.0))
    np.testing.assert_array_equal(out[:, :200], changed[:, :200])
    assert not np.allclose(out[:, 200:], changed[:, 200:])


def test_bfloat16_in_bfloat16_out_with_float32_softmax():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 256, 2, 16)) for _ in range(3))
    out = causal_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v)[0], atol=0.05)


class SeparateProjections(CausalSelfAttention):
    """The reference: query, key and value as three nn.DenseGeneral layers, each its own matmul."""

    @nn.compact
    def __call__(self, x):
        def project(name):
            return nn.DenseGeneral((self.n_heads, x.shape[-1] // self.n_heads), name=name,
                                   kernel_init=partitioned(DEFAULT_INIT, ("embed", "heads", "kv")),
                                   bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")))(x)

        out = self.attend(project("query"), project("key"), project("value"))
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out",
                               kernel_init=partitioned(nn.initializers.normal(0.02 / math.sqrt(2 * self.n_layers)),
                                                       ("heads", "kv", "embed")),
                               bias_init=partitioned(nn.initializers.zeros, ("embed",)))(out)


def test_fused_projections_have_the_separate_ones_parameters_and_outputs():
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    fused, separate = CausalSelfAttention(n_heads=4), SeparateProjections(n_heads=4)
    params = fused.init(jax.random.key(1), x)
    reference = separate.init(jax.random.key(1), x)  # same names, shapes, axes and initial values
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(params), nn.unbox(reference))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), nn.unbox(params))
    np.testing.assert_allclose(fused.apply(params, x), separate.apply(params, x), rtol=1e-5, atol=1e-6)
