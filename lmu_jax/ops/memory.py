"""The LMU memory m_t = A_bar m_{t-1} + B_bar u_t, run independently on every channel.

    lmu_memory(u, order, theta)                 (B, n, D) -> (B, n, D, order)
    lmu_memory_folded(u, reduce, order, theta)  (B, n, D) -> (B, n, r, D) = reduce @ memory,
                                                channels last, computed without ever forming the memory
    lmu_memory_step(m_prev, u_t, order, theta)  one recurrent step, for generation
    legendre_readout(m, r)                      u(t - r*theta) decoded from the memory

Implementations (same signature, same results to float32 accuracy):
    "sequential"  lax.scan over time: the oracle and the generation path;
    "fft"         causal convolution with the impulse response, rfft/irfft at length >= 2n;
    "chunked"     causal Toeplitz matmuls inside chunks + associative scan across chunks;
    "auto"        picks one of the above per platform and shape (see `select_memory_impl`).

The memory path always computes in float32, whatever the input dtype: XLA's RFFT rejects bf16,
and bf16 matmul operands cost ~3e-3 relative error (docs/lmu.md). There is deliberately no
diagonalised route: A's eigenvectors have condition number ~1e8 already at order 16.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmu_jax.ops.chunked import chunked_memory
from lmu_jax.ops.legendre import fft_length, impulse_response_spectrum, legendre_decoder, lmu_matrices

MEMORY_IMPLS = ("sequential", "fft", "chunked")
_HIGHEST = jax.lax.Precision.HIGHEST


# --- dispatch -----------------------------------------------------------------------------------

# Decision table for impl="auto": (platform, folded) -> rows (max_length, max_order, impl), the
# first row whose bounds hold wins (None = no bound). CPU rows come from benchmarks/lmu_memory.py
# (forward + backward, batch*channels = 64, n in 256..16384, order in 16/64/256; tables in
# benchmarks/results/lmu_memory_cpu.md, plus repeated head-to-head runs at the close points).
# What it showed on 2 shared cores, where run-to-run noise is 10-30 %:
#   memory: the sequential scan wins from order 64 on (the chunked path does the same 2 q^2 per
#     token carry-in plus its Toeplitz and chunk scan; XLA's CPU FFT is 2-5x slower than both);
#     at order 16 the chunked path wins up to n = 4096; at 16384 the scan won 2 runs of 3.
#   folded: chunked wins at orders 16 and 64 by 1.2-3x; at order 256 the FFT wins at n = 256
#     (1.5x) and by ~1.25x in head-to-head runs at 1024 and 4096 (the full grid: within 3 % at 1024,
#     fft 1.10x faster at 4096); at 16384 chunked won the full grid by 1.23x (median and minimum).
# With the current kernels auto is within 9 % of the fastest everywhere (lmu_memory_cpu.md).
# Thresholds sit between measured points.
# TPU rows: XLA's TPU compiler, ahead of time (benchmarks/results/tpu_lmu_memory.md: the folded memory
# forward + backward at 16,384 tokens x 256 channels per v5e chip, n 1024 and 16384, orders 64 and 256).
# The chunked scan needs the least memory at every point, 6-7x less than the FFT and 3.5-6x less than the
# sequential scan (order 256: 1.45-1.52 GiB against 9.62-9.66 and 5.28-5.29), and its roofline estimate
# is 16-20x below the FFT's (order 256: 12-13 ms against 201-214 ms); the sequential scan's estimate
# counts one of its n dependent steps: chunked everywhere.
# The unfolded memory on TPU, and GPU: not measured; they take the same pick by the same reasoning (the
# FFT's per-frequency complex spectra are memory the chunked scan never forms; the sequential scan runs
# n dependent steps) until a measurement replaces them.
_AUTO_TABLE = {
    ("cpu", False): [(4096, 32, "chunked"), (None, None, "sequential")],
    ("cpu", True): [(None, 128, "chunked"), (8192, None, "fft"), (None, None, "chunked")],
    ("tpu", False): [(None, None, "chunked")],
    ("tpu", True): [(None, None, "chunked")],
    ("gpu", False): [(None, None, "chunked")],
    ("gpu", True): [(None, None, "chunked")],
}
_AUTO_DEFAULT = "chunked"  # any other platform: the accelerators' pick


_TARGET_PLATFORM = contextvars.ContextVar("lmu_jax_target_platform", default=None)


def target_platform() -> str:
    """The platform the program being traced will run on: the one `compiling_for` names (an
    ahead-of-time compile for a TPU topology from a CPU host), else JAX's default backend."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace for ``platform`` ("cpu", "gpu", "tpu"): the kernels picked by platform (impl="auto",
    chunk lengths, attention) follow the compilation's target, not the host that compiles."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def select_memory_impl(length: int, order: int, folded: bool = False, platform: str | None = None) -> str:
    """The implementation impl="auto" runs for this sequence length and order."""
    platform = platform or target_platform()
    for max_length, max_order, impl in _AUTO_TABLE.get((platform, folded), []):
        if (max_length is None or length <= max_length) and (max_order is None or order <= max_order):
            return impl
    return _AUTO_DEFAULT


def default_chunk_len(order: int, platform: str | None = None) -> int:
    """Chunk length C of impl="chunked" when none is given.

    C trades the Toeplitz matmul (2 C r flops per token and channel) against the chunk scan
    (~8 order^3 / (C * batch * channels) flops per token and channel). CPU, measured with
    benchmarks/lmu_memory.py's setting (batch*channels = 64, forward + backward, C in 8..128):
    C = 32 is best or within ~10 % of best for orders 16 and 64, C = 64 for order 256.
    Elsewhere (unmeasured) 64, the low end of the MXU/tensor-core-friendly 64-128.
    """
    platform = platform or target_platform()
    if platform == "cpu":
        return 32 if order < 128 else 64
    return 64


def _resolve_impl(impl: str, length: int, order: int, folded: bool) -> str:
    if impl == "auto":
        return select_memory_impl(length, order, folded)
    if impl in ("diagonal", "diag", "diagonalised", "diagonalized"):
        raise ValueError(
            f"impl={impl!r} is refused: the LMU's A is non-normal and its eigenvector matrix has "
            "condition number ~1e8 at order 16 (float32 error O(1) and worse); use one of "
            f"{MEMORY_IMPLS + ('auto',)}"
        )
    if impl not in MEMORY_IMPLS:
        raise ValueError(f"impl must be one of {MEMORY_IMPLS + ('auto',)}, got {impl!r}")
    return impl


def _as_float32(u: jax.Array, name: str) -> jax.Array:
    u = jnp.asarray(u)
    if not jnp.issubdtype(u.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {u.dtype}")
    return u.astype(jnp.float32)


def _check_input(u: jax.Array) -> jax.Array:
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, time, channels), got shape {u.shape}")
    return _as_float32(u, "u")


# --- implementations ----------------------------------------------------------------------------
# Each maps u (B, n, D) float32 -> (B, n, r, D), channels last, with readout (r, order) or None for the
# memory (r = order). Channels last is the layout the chunked matmul writes and the implicit attention
# reads (it contracts over the channels); lmu_memory swaps to (B, n, D, order) for its callers.


def _step(m_prev, u_t, a_bar, b_bar):
    return jnp.matmul(m_prev, a_bar.T, precision=_HIGHEST) + u_t[..., None] * b_bar


def _sequential(u, order, theta, readout):
    a_bar, b_bar = (jnp.asarray(x, jnp.float32) for x in lmu_matrices(order, theta))

    def step(m_prev, u_t):
        m = _step(m_prev, u_t, a_bar, b_bar)  # (B, D, order)
        return m, m if readout is None else jnp.matmul(m, readout.T, precision=_HIGHEST)

    m_init = jnp.zeros((u.shape[0], u.shape[2], order), jnp.float32)
    # No `unroll`: 2-16 was measured no faster (often slower) on CPU, for orders 16-256.
    _, outputs = jax.lax.scan(step, m_init, jnp.swapaxes(u, 0, 1))  # (n, B, D, r)
    return jnp.transpose(outputs, (1, 0, 3, 2))


def _fft(u, order, theta, readout):
    length = u.shape[1]
    n_fft = fft_length(length)
    spec_re, spec_im = (jnp.asarray(x) for x in impulse_response_spectrum(order, theta, length))
    if readout is not None:
        # rfft is linear, so rfft(R H) = R rfft(H): fold in frequency space with two real matmuls.
        spec_re = jnp.matmul(readout, spec_re, precision=_HIGHEST)
        spec_im = jnp.matmul(readout, spec_im, precision=_HIGHEST)
    u_spec = jnp.fft.rfft(jnp.swapaxes(u, 1, 2), n=n_fft)  # (B, D, F)
    out_spec = u_spec[:, :, None, :] * jax.lax.complex(spec_re, spec_im)  # (B, D, r, F)
    out = jnp.fft.irfft(out_spec, n=n_fft)[..., :length]  # (B, D, r, n)
    return jnp.transpose(out, (0, 3, 2, 1))


def _chunked(u, order, theta, readout, chunk_len):
    return chunked_memory(u, order, theta, chunk_len, readout)


@functools.partial(jax.jit, static_argnames=("order", "theta", "impl", "chunk_len"))
def _run(u, order, theta, impl, chunk_len, readout):
    if impl == "sequential":
        return _sequential(u, order, theta, readout)
    if impl == "fft":
        return _fft(u, order, theta, readout)
    return _chunked(u, order, theta, readout, chunk_len)


def _dispatch(u, order, theta, impl, chunk_len, readout):
    # "auto" and the default chunk length resolve here, outside the jit: the jit's trace cache keys
    # on its static arguments, so a trace made for one platform is never reused for another.
    impl = _resolve_impl(impl, u.shape[1], order, readout is not None)
    chunk_len = (chunk_len or default_chunk_len(order)) if impl == "chunked" else None
    return _run(u, order, theta, impl, chunk_len, readout)


# --- public API ---------------------------------------------------------------------------------


def lmu_memory(u: jax.Array, order: int, theta: float, impl: str = "auto", chunk_len: int | None = None) -> jax.Array:
    """Legendre memory of every channel: u (batch, time, channels) -> m (batch, time, channels, order).

    m_t = A_bar m_{t-1} + B_bar u_t per channel with m_{-1} = 0, float32 whatever u's dtype.
    `chunk_len` only matters for impl="chunked" (default `default_chunk_len`; any value >= 1
    works, n need not be a multiple).
    """
    return jnp.swapaxes(_dispatch(_check_input(u), order, theta, impl, chunk_len, None), -1, -2)


def lmu_memory_folded(
    u: jax.Array, reduce: jax.Array, order: int, theta: float, impl: str = "auto", chunk_len: int | None = None
) -> jax.Array:
    """Reduced memory: einsum('ro,btco->btrc', reduce, lmu_memory(u)) -> (batch, time, r, channels).

    Convolves u with the r folded kernels reduce @ H instead of the `order` kernels H (docs/lmu.md,
    "The folded memory"), so the (batch, time, channels, order) memory is never formed. Differentiable in
    both `u` and `reduce` (the trainable L_i stacked, r = 3 q' in the LM block).
    """
    reduce = _as_float32(reduce, "reduce")
    if reduce.ndim != 2 or reduce.shape[1] != order:
        raise ValueError(f"reduce must have shape (r, order={order}), got shape {reduce.shape}")
    return _dispatch(_check_input(u), order, theta, impl, chunk_len, reduce)


@functools.partial(jax.jit, static_argnames=("order", "theta"))
def lmu_memory_step(m_prev: jax.Array, u_t: jax.Array, order: int, theta: float) -> jax.Array:
    """One recurrent step for generation: m_prev (batch, channels, order), u_t (batch, channels)
    -> m_t (batch, channels, order), float32, identical to the sequential path's step."""
    a_bar, b_bar = (jnp.asarray(x, jnp.float32) for x in lmu_matrices(order, theta))
    return _step(_as_float32(m_prev, "m_prev"), _as_float32(u_t, "u_t"), a_bar, b_bar)


def legendre_readout(m: jax.Array, r) -> jax.Array:
    """Decode the delayed input u(t - r*theta) ~= sum_i P_i(2r - 1) m_i(t) from a memory.

    m (..., order); r a fraction of theta in [0, 1], scalar -> (...), or 1-D array -> (..., len(r)).
    """
    decoder = legendre_decoder(m.shape[-1], r).astype(np.float32)  # (order,) or (len(r), order)
    return jnp.matmul(jnp.asarray(m, jnp.float32), decoder.T, precision=_HIGHEST)
