"""Tests of the Legendre memory kernels (lmu_jax.ops) against float64 numpy references."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from lmu_jax.ops import (
    MEMORY_IMPLS,
    chunk_tables,
    combine_chunk_states,
    fft_length,
    impulse_response,
    legendre_decoder,
    legendre_readout,
    lmu_continuous,
    lmu_matrices,
    lmu_memory,
    lmu_memory_folded,
    lmu_memory_step,
    scan_chunk_states,
    select_memory_impl,
)
from lmu_jax.ops.chunked import BATCHED_CHUNK_MIN_CHANNELS, causal_toeplitz, chunk_final_states

ACCURACY_CASES = [(8, 64.0, 300), (64, 1000.0, 1024), (256, 1024.0, 1024), (16, 4.0, 200)]


# --- float64 numpy references -------------------------------------------------------------------


def reference_memory(u, order, theta):
    """m_t = A_bar m_{t-1} + B_bar u_t per channel, float64, by the plain loop."""
    a_bar, b_bar = lmu_matrices(order, theta)
    batch, length, channels = u.shape
    m = np.zeros((batch, channels, order))
    out = np.empty((batch, length, channels, order))
    for t in range(length):
        m = m @ a_bar.T + u[:, t, :, None] * b_bar
        out[:, t] = m
    return out


def reference_memory_vjp(cotangent, order, theta):
    """d/du of sum(cotangent * memory): lambda_t = W_t + A_bar^T lambda_{t+1}, grad_t = B_bar . lambda_t."""
    a_bar, b_bar = lmu_matrices(order, theta)
    adjoint = np.zeros(cotangent[:, 0].shape)
    grad = np.empty(cotangent.shape[:3])
    for t in reversed(range(cotangent.shape[1])):
        adjoint = cotangent[:, t] + adjoint @ a_bar
        grad[:, t] = adjoint @ b_bar
    return grad


def rel_err(x, ref):
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / np.max(np.abs(ref)))


# --- matrices -----------------------------------------------------------------------------------


def test_continuous_matrices_equal_closed_forms():
    order, theta = 6, 7.0
    a, b = lmu_continuous(order, theta)
    for i in range(order):
        assert b[i] == pytest.approx((2 * i + 1) * (-1) ** i / theta, rel=1e-15)
        for j in range(order):
            sign = -1.0 if i < j else (-1.0) ** (i - j + 1)
            assert a[i, j] == pytest.approx((2 * i + 1) / theta * sign, rel=1e-15)
    assert b.shape == (order,)


@pytest.mark.parametrize("order,theta", [(1, 3.0), (8, 64.0), (16, 4.0), (256, 1024.0)])
def test_zoh_equals_scipy_cont2discrete(order, theta):
    a, b = lmu_continuous(order, theta)
    a_bar, b_bar = lmu_matrices(order, theta)
    a_ref, b_ref, *_ = scipy.signal.cont2discrete((a, b[:, None], np.eye(order), 0), dt=1.0, method="zoh")
    np.testing.assert_allclose(a_bar, a_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b_bar, b_ref[:, 0], rtol=0, atol=1e-12)


def test_impulse_response_is_powers_of_a_bar_times_b_bar_and_cached_read_only():
    order, theta, length = 32, 100.0, 300
    a_bar, b_bar = lmu_matrices(order, theta)
    h = impulse_response(order, theta, length)
    expected, state = np.empty((length, order)), b_bar.copy()
    for t in range(length):
        expected[t] = state
        state = a_bar @ state
    assert h.shape == (length, order) and h.dtype == np.float64
    assert rel_err(h, expected) < 1e-12
    assert impulse_response(order, theta, length) is h  # cached on the host
    for table in (h, a_bar, b_bar, *chunk_tables(order, theta, 16)):
        with pytest.raises(ValueError):
            table[0] = 0.0


def test_fft_length_is_a_5_smooth_number_at_least_twice_n():
    for n in [1, 7, 200, 300, 1000, 1024, 16384]:
        size = fft_length(n)
        assert size >= 2 * n
        rest = size
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        assert rest == 1
    assert fft_length(1024) == 2048 and fft_length(300) == 600


# --- every implementation against the float64 reference ----------------------------------------


@pytest.fixture(scope="module")
def references():
    """Inputs, cotangents and float64 results for every accuracy case, computed once."""
    cases = {}
    for order, theta, length in ACCURACY_CASES:
        rng = np.random.default_rng(order + length)
        u = rng.standard_normal((2, length, 3))
        reduce = rng.standard_normal((5, order)) / np.sqrt(order)
        cot = rng.standard_normal((2, length, 3, order))
        cot_reduced = rng.standard_normal((2, length, 5, 3))
        memory = reference_memory(u, order, theta)
        cases[order, theta, length] = dict(
            u=u, reduce=reduce, cot=cot, cot_reduced=cot_reduced,
            memory=memory,
            grad_u=reference_memory_vjp(cot, order, theta),
            folded=np.einsum("ro,btco->btrc", reduce, memory),
            folded_grad_u=reference_memory_vjp(np.einsum("btrc,ro->btco", cot_reduced, reduce), order, theta),
            folded_grad_reduce=np.einsum("btrc,btco->ro", cot_reduced, memory),
        )
    return cases


def _memory_and_grads(impl, order, theta, chunk_len=None):
    """One jitted program: memory, folded memory and their vector-Jacobian products."""

    @jax.jit
    def run(u, reduce, cot, cot_reduced):
        memory, memory_vjp = jax.vjp(lambda x: lmu_memory(x, order, theta, impl, chunk_len), u)
        folded, folded_vjp = jax.vjp(
            lambda x, r: lmu_memory_folded(x, r, order, theta, impl, chunk_len), u, reduce
        )
        return memory, memory_vjp(cot)[0], folded, *folded_vjp(cot_reduced)

    return run


@pytest.mark.parametrize("impl", MEMORY_IMPLS)
@pytest.mark.parametrize("case", ACCURACY_CASES, ids=lambda c: f"q{c[0]}-theta{c[1]:g}-n{c[2]}")
def test_memory_and_folded_memory_match_float64_reference(references, case, impl):
    ref = references[case]
    order, theta, _ = case
    args = (ref[k].astype(np.float32) for k in ("u", "reduce", "cot", "cot_reduced"))
    memory, grad_u, folded, folded_grad_u, folded_grad_reduce = _memory_and_grads(impl, order, theta)(*args)
    assert memory.dtype == jnp.float32 and memory.shape == ref["memory"].shape
    assert folded.shape == ref["folded"].shape
    errors = {
        "memory": rel_err(memory, ref["memory"]),
        "grad_u": rel_err(grad_u, ref["grad_u"]),
        "folded": rel_err(folded, ref["folded"]),
        "folded_grad_u": rel_err(folded_grad_u, ref["folded_grad_u"]),
        "folded_grad_reduce": rel_err(folded_grad_reduce, ref["folded_grad_reduce"]),
    }
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("chunk_len", [1, 7, 37, 64], ids=lambda c: f"C{c}")
def test_chunked_any_chunk_length(chunk_len):
    """n = 37: C = 1, C not dividing n, C = n and C > n all give the reference memory."""
    order, theta, length = 8, 20.0, 37
    rng = np.random.default_rng(chunk_len)
    u, reduce = rng.standard_normal((2, length, 3)), rng.standard_normal((4, order))
    expected = reference_memory(u, order, theta)
    memory = lmu_memory(u.astype(np.float32), order, theta, "chunked", chunk_len)
    folded = lmu_memory_folded(u.astype(np.float32), reduce.astype(np.float32), order, theta, "chunked", chunk_len)
    assert rel_err(memory, expected) < 1e-5
    assert rel_err(folded, np.einsum("ro,btco->btrc", reduce, expected)) < 1e-5


def test_chunked_batched_matmul_path_at_many_channels():
    """From BATCHED_CHUNK_MIN_CHANNELS channels the chunk matmul runs batched over (batch, chunk)
    (the LM's path at d_model >= 256): the same float64 reference, values and gradients."""
    order, theta, length, channels = 8, 20.0, 37, BATCHED_CHUNK_MIN_CHANNELS
    rng = np.random.default_rng(5)
    u, reduce = rng.standard_normal((2, length, channels)), rng.standard_normal((4, order))
    cot = rng.standard_normal((2, length, 4, channels))
    expected = reference_memory(u, order, theta)
    folded, vjp = jax.vjp(lambda x, r: lmu_memory_folded(x, r, order, theta, "chunked", 16),
                          u.astype(np.float32), reduce.astype(np.float32))
    grad_u, grad_reduce = vjp(cot.astype(np.float32))
    assert rel_err(lmu_memory(u.astype(np.float32), order, theta, "chunked", 16), expected) < 1e-5
    assert rel_err(folded, np.einsum("ro,btco->btrc", reduce, expected)) < 1e-5
    assert rel_err(grad_u, reference_memory_vjp(np.einsum("btrc,ro->btco", cot, reduce), order, theta)) < 1e-5
    assert rel_err(grad_reduce, np.einsum("btrc,btco->ro", cot, expected)) < 1e-5


# --- the chunked scan's pieces --------------------------------------------------------------------


def test_combine_operator_order_matches_python_loop_on_non_commuting_matrices():
    rng = np.random.default_rng(0)
    num_chunks, order, columns = 7, 4, 3
    transitions = rng.standard_normal((num_chunks, order, order)) / 2
    inputs = rng.standard_normal((num_chunks, order, columns))
    assert np.abs(transitions[0] @ transitions[1] - transitions[1] @ transitions[0]).max() > 0.1

    expected, state = np.empty_like(inputs), np.zeros((order, columns))
    for k in range(num_chunks):
        state = transitions[k] @ state + inputs[k]
        expected[k] = state
    states = scan_chunk_states(jnp.asarray(transitions, jnp.float32), jnp.asarray(inputs, jnp.float32))
    assert rel_err(states, expected) < 1e-5

    # The operator alone: earlier element first, later second.
    g, s = combine_chunk_states((transitions[0], inputs[0]), (transitions[1], inputs[1]))
    np.testing.assert_allclose(g, transitions[1] @ transitions[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, transitions[1] @ inputs[0] + inputs[1], rtol=1e-5, atol=1e-6)
    swapped, _ = combine_chunk_states((transitions[1], inputs[1]), (transitions[0], inputs[0]))
    assert np.abs(np.asarray(swapped) - np.asarray(g)).max() > 0.1  # the order is observable


def test_column_stacking_equals_per_channel_loop():
    order, theta, chunk_len, num_chunks = 6, 30.0, 5, 4
    batch, channels = 2, 3
    rng = np.random.default_rng(1)
    chunks = jnp.asarray(rng.standard_normal((batch, num_chunks, chunk_len, channels)), jnp.float32)
    kernel, _, transition = chunk_tables(order, theta, chunk_len)
    kernel_reversed = jnp.asarray(kernel[::-1], jnp.float32)
    transitions = jnp.broadcast_to(jnp.asarray(transition, jnp.float32), (num_chunks, order, order))

    stacked = scan_chunk_states(transitions, chunk_final_states(chunks, kernel_reversed))
    for b in range(batch):
        for d in range(channels):
            single = chunks[b : b + 1, :, :, d : d + 1]
            alone = scan_chunk_states(transitions, chunk_final_states(single, kernel_reversed))
            np.testing.assert_allclose(stacked[:, :, b * channels + d], alone[:, :, 0], rtol=1e-6, atol=1e-7)

    # End to end: the stacked chunked memory equals running each channel by itself.
    u = jnp.asarray(rng.standard_normal((batch, 23, channels)), jnp.float32)
    memory = lmu_memory(u, order, theta, "chunked", chunk_len)
    for d in range(channels):
        alone = lmu_memory(u[:, :, d : d + 1], order, theta, "chunked", chunk_len)
        np.testing.assert_allclose(memory[:, :, d : d + 1], alone, rtol=1e-6, atol=1e-7)


def test_causal_toeplitz_layout():
    kernel = np.arange(1.0, 4.0)[:, None]  # (C=3, r=1)
    expected = np.array([[1, 2, 3], [0, 1, 2], [0, 0, 1]], float)  # T[i, j] = kernel[j - i]
    np.testing.assert_array_equal(causal_toeplitz(kernel)[..., 0], expected)
    np.testing.assert_array_equal(causal_toeplitz(jnp.asarray(kernel))[..., 0], expected)


# --- read-out, causality, precision, generation -------------------------------------------------


def test_legendre_readout_reconstructs_delayed_input():
    order, theta, length = 12, 200.0, 2000
    t = np.arange(length)
    u = np.sin(2 * np.pi * t / 450) + 0.5 * np.sin(2 * np.pi * t / 310 + 1.0) + 0.3 * np.cos(2 * np.pi * t / 900)
    memory = lmu_memory(jnp.asarray(u[None, :, None], jnp.float32), order, theta, "sequential")[0, :, 0]
    delays = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    decoded = np.asarray(legendre_readout(memory, delays))  # (n, 5)
    start = int(2 * theta)  # past the initial transient
    for k, r in enumerate(delays):
        target = u[start - int(r * theta) : length - int(r * theta)]
        nrmse = np.sqrt(np.mean((decoded[start:, k] - target) ** 2)) / np.std(target)
        assert nrmse < 0.05, (r, nrmse)
    # The mirrored decoder P_i(1 - 2r) reads the wrong end of the window.
    mirrored = np.asarray(memory) @ legendre_decoder(order, 1.0)
    assert np.sqrt(np.mean((mirrored[start:] - u[start:]) ** 2)) / np.std(u) > 0.5
    assert legendre_readout(memory, 0.5).shape == (length,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        legendre_decoder(order, 1.5)


@pytest.mark.parametrize("impl", MEMORY_IMPLS)
def test_causality(impl):
    order, theta, length, cut = 16, 50.0, 96, 40
    rng = np.random.default_rng(2)
    u = rng.standard_normal((2, length, 3)).astype(np.float32)
    perturbed = u.copy()
    perturbed[:, cut + 1 :] += 100.0 * rng.standard_normal((2, length - cut - 1, 3)).astype(np.float32)
    reduce = rng.standard_normal((5, order)).astype(np.float32)
    for run in (
        lambda x: lmu_memory(x, order, theta, impl, 16),
        lambda x: lmu_memory_folded(x, reduce, order, theta, impl, 16),
    ):
        before, after = np.asarray(run(u)), np.asarray(run(perturbed))
        leak = np.abs(after[:, : cut + 1] - before[:, : cut + 1]).max()
        change = np.abs(after[:, cut + 1 :] - before[:, cut + 1 :]).max()
        assert change > 1.0
        if impl == "fft":  # every output mixes all frequencies: float32 round-off only
            assert leak <= 1e-6 * change, (leak, change)
        else:  # masked zeros and a forward recurrence: exactly nothing
            assert leak == 0.0


@pytest.mark.parametrize("impl", MEMORY_IMPLS)
def test_bf16_input_computes_in_float32(impl):
    order, theta, length = 16, 64.0, 128
    rng = np.random.default_rng(3)
    u_bf16 = jnp.asarray(rng.standard_normal((2, length, 3)), jnp.bfloat16)
    reduce_bf16 = jnp.asarray(rng.standard_normal((4, order)), jnp.bfloat16)
    u64, reduce64 = np.asarray(u_bf16, np.float64), np.asarray(reduce_bf16, np.float64)
    expected = reference_memory(u64, order, theta)
    memory = lmu_memory(u_bf16, order, theta, impl)
    folded = lmu_memory_folded(u_bf16, reduce_bf16, order, theta, impl)
    assert memory.dtype == jnp.float32 and folded.dtype == jnp.float32
    assert rel_err(memory, expected) < 1e-5  # bf16 arithmetic would be ~3e-3
    assert rel_err(folded, np.einsum("ro,btco->btrc", reduce64, expected)) < 1e-5


def test_step_function_reproduces_sequential_memory():
    order, theta, length = 32, 40.0, 60
    u = jnp.asarray(np.random.default_rng(4).standard_normal((2, length, 3)), jnp.float32)
    sequential = lmu_memory(u, order, theta, "sequential")
    m = jnp.zeros((2, 3, order), jnp.float32)
    for t in range(length):
        m = lmu_memory_step(m, u[:, t], order, theta)
        np.testing.assert_allclose(m, sequential[:, t], rtol=1e-6, atol=1e-7)
    assert m.shape == (2, 3, order) and m.dtype == jnp.float32


# --- dispatch and validation --------------------------------------------------------------------


def test_auto_runs_the_selected_impl():
    order, theta, length = 16, 64.0, 100
    u = jnp.asarray(np.random.default_rng(5).standard_normal((1, length, 2)), jnp.float32)
    for folded in (False, True):
        assert select_memory_impl(length, order, folded) in MEMORY_IMPLS
    picked = select_memory_impl(length, order, folded=False)
    np.testing.assert_array_equal(lmu_memory(u, order, theta, "auto"), lmu_memory(u, order, theta, picked))


def test_auto_table_agrees_with_committed_benchmark():
    """The decision table in code is the one the committed CPU benchmark measured and reported."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lmu_memory_cpu.json"
    if not path.exists():
        pytest.skip("no committed CPU benchmark")
    for point in json.loads(path.read_text())["points"]:
        picked = select_memory_impl(point["n"], point["order"], point["form"] == "folded", platform="cpu")
        assert picked == point["auto"], point


def test_diagonalised_route_is_refused_and_inputs_are_checked():
    u = jnp.zeros((1, 8, 2), jnp.float32)
    with pytest.raises(ValueError, match="refused"):
        lmu_memory(u, 16, 8.0, "diagonal")
    with pytest.raises(ValueError, match="impl must be one of"):
        lmu_memory(u, 16, 8.0, "banana")
    with pytest.raises(ValueError, match=r"\(batch, time, channels\)"):
        lmu_memory(jnp.zeros((8, 2)), 16, 8.0)
    with pytest.raises(ValueError, match="reduce must have shape"):
        lmu_memory_folded(u, jnp.zeros((3, 15)), 16, 8.0)
    with pytest.raises(TypeError, match="float"):
        lmu_memory(jnp.zeros((1, 8, 2), jnp.int32), 16, 8.0)
    with pytest.raises(ValueError, match="theta"):
        lmu_matrices(4, 0.0)
