"""Chunked parallel scan of the LMU memory: the project's associative-parallel-scan path.

Split time into K chunks of C steps (docs/lmu.md). With k the chunk and j = 0..C-1 the
position inside it,

    m_{k,j} = sum_{i<=j} H[j-i] u_{k,i}   +   A_bar^{j+1} s_{k-1},
              (causal Toeplitz matmul)         (carry-in of the previous chunk's final state)

    s_k = A_bar^C s_{k-1} + e_k,   e_k = sum_i H[C-1-i] u_{k,i},   s_{-1} = 0,

and the chunk-state recurrence runs as `jax.lax.associative_scan` over (A_bar^C, e_k) pairs. All
batch x channel states are stacked as the columns of one (order, batch*channels) matrix per chunk,
so each order x order transition product is formed once per combine, not once per channel.

A readout R (r, order) folds into both terms (R H[j-i] and R A_bar^{j+1}), so the folded form
produces r outputs per step directly: only the K chunk-boundary states are order-wide. (The
unfolded memory is the case R = I, using H and A_bar^{j+1} as they are.)

Every matmul runs at precision=HIGHEST: bf16 operands (the TPU default) cost ~3e-3 relative
error here, float32 gives ~3e-7.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmu_jax.ops.legendre import impulse_response, lmu_matrices

_HIGHEST = jax.lax.Precision.HIGHEST
# Channels from which the chunk matmul runs batched over (batch, chunk); see chunked_memory.
BATCHED_CHUNK_MIN_CHANNELS = 256


@functools.lru_cache(maxsize=16)
def chunk_tables(order: int, theta: float, chunk_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host float64 constants for chunk length C, read-only, laid out as the matmuls consume them:

    kernel (C, order) = H[0:C];
    carry_in (order_in, C, order_out): carry_in[p, j, o] = (A_bar^{j+1})[o, p];
    transition (order, order) = A_bar^C.
    """
    a_bar, _ = lmu_matrices(order, theta)
    kernel = impulse_response(order, theta, chunk_len)
    powers = np.empty((chunk_len, order, order))  # powers[j] = A_bar^{j+1}
    powers[0] = a_bar
    for j in range(1, chunk_len):
        powers[j] = a_bar @ powers[j - 1]
    carry_in = np.ascontiguousarray(powers.transpose(2, 0, 1))
    transition = powers[-1].copy()
    for table in (carry_in, transition):
        table.flags.writeable = False
    return kernel, carry_in, transition


def combine_chunk_states(earlier, later):
    """Associative operator of s_k = G_k s_{k-1} + U_k: composing the affine map of `earlier`
    then `later` gives (G_l G_e, G_l U_e + U_l). Not commutative: the order is the whole point."""
    g_earlier, u_earlier = earlier
    g_later, u_later = later
    return (
        jnp.matmul(g_later, g_earlier, precision=_HIGHEST),
        jnp.matmul(g_later, u_earlier, precision=_HIGHEST) + u_later,
    )


def scan_chunk_states(transitions: jax.Array, inputs: jax.Array) -> jax.Array:
    """All s_k of s_k = G_k s_{k-1} + U_k, s_{-1} = 0, by a parallel associative scan.

    transitions: (K, q, q), inputs: (K, q, N) with one column per independent state -> (K, q, N).
    """
    _, states = jax.lax.associative_scan(combine_chunk_states, (transitions, inputs))
    return states


def causal_toeplitz(kernel):
    """(C, r) kernel -> (C, C, r) block T[i, j] = kernel[j - i] for input step i <= output step j,
    else 0 (input-major, the layout the Toeplitz matmul contracts without a transpose).

    numpy in, numpy out: built on the host, so XLA does not constant-fold a large gather at compile
    time; a traced kernel (the folded, trainable one) gives a jax array.
    """
    xp = np if isinstance(kernel, np.ndarray) else jnp
    chunk_len = kernel.shape[0]
    lag = np.arange(chunk_len)[None, :] - np.arange(chunk_len)[:, None]
    gathered = xp.take(kernel, np.maximum(lag, 0), axis=0)
    return xp.where((lag >= 0)[..., None], gathered, xp.zeros((), kernel.dtype))


def chunk_final_states(chunks: jax.Array, kernel_reversed: jax.Array) -> jax.Array:
    """Each chunk's state at its last step from a zero start, as stacked columns.

    chunks (B, K, C, D), kernel_reversed[i] = H[C-1-i] (C, q) -> (K, q, B*D), column b*D + d.
    """
    batch, num_chunks, _, channels = chunks.shape
    ends = jnp.einsum("bkid,io->kobd", chunks, kernel_reversed, precision=_HIGHEST)
    return ends.reshape(num_chunks, -1, batch * channels)


def chunked_memory(u: jax.Array, order: int, theta: float, chunk_len: int, readout: jax.Array | None = None):
    """(B, n, D) float32 -> (B, n, r, D): readout @ memory (r = order, readout = I, when None),
    channels last (the layout the chunk matmul writes)."""
    if int(chunk_len) != chunk_len or chunk_len < 1:
        raise ValueError(f"chunk_len must be a positive integer, got {chunk_len!r}")
    batch, length, channels = u.shape
    chunk_len = min(int(chunk_len), length)
    num_chunks = -(-length // chunk_len)
    kernel, carry_in, transition = chunk_tables(order, theta, chunk_len)
    kernel_reversed = jnp.asarray(kernel[::-1], jnp.float32)
    transition = jnp.asarray(transition, jnp.float32)
    if readout is None:
        toeplitz = jnp.asarray(causal_toeplitz(kernel), jnp.float32)
        carry_in = jnp.asarray(carry_in, jnp.float32)
    else:
        # Fold the readout R into both terms: kernels R H[j] and carry-in maps R A_bar^{j+1}.
        folded_kernel = jnp.matmul(jnp.asarray(kernel, jnp.float32), readout.T, precision=_HIGHEST)
        toeplitz = causal_toeplitz(folded_kernel)
        carry_in = jnp.einsum("pjo,ro->pjr", jnp.asarray(carry_in, jnp.float32), readout, precision=_HIGHEST)

    # Zeros after the end cannot reach earlier outputs (causality), so padding is exact.
    padded = jnp.pad(u, ((0, 0), (0, num_chunks * chunk_len - length), (0, 0)))
    chunks = padded.reshape(batch, num_chunks, chunk_len, channels)

    ends = chunk_final_states(chunks, kernel_reversed)
    states = scan_chunk_states(jnp.broadcast_to(transition, (num_chunks, order, order)), ends)
    # Chunk k starts from the state at the end of chunk k-1; chunk 0 from zero.
    previous = jnp.concatenate([jnp.zeros_like(states[:1]), states[:-1]])
    previous = previous.reshape(num_chunks, order, batch, channels).transpose(2, 0, 1, 3)  # (B, K, q, D)

    # Both terms in one matmul: [inputs; carried-in state] (C + q rows per chunk) against [Toeplitz;
    # carry-in maps] (C + q, C, r), so the output is written once, with no sum pass.
    inputs = jnp.concatenate([chunks, previous], axis=2)  # (B, K, C + q, D)
    weights = jnp.concatenate([toeplitz, carry_in], axis=0)
    if channels >= BATCHED_CHUNK_MIN_CHANNELS:
        # Weights broadcast over (batch, chunk), so that the matmul has them as batch dimensions and
        # writes (B, K, C, r, D) in place: XLA fuses the broadcast (and its sum in the backward pass)
        # into the matmul. Each chunk's matmul is (C r, C + q) x (C + q, D): too narrow below
        # BATCHED_CHUNK_MIN_CHANNELS, where one (B K D, C + q) x (C + q, C r) matmul and a transpose win.
        weights = jnp.broadcast_to(weights, (batch, num_chunks) + weights.shape)
        out = jnp.einsum("bkid,bkijr->bkjrd", inputs, weights, precision=_HIGHEST)
    else:
        out = jnp.einsum("bkid,ijr->bkjrd", inputs, weights, precision=_HIGHEST)
    return out.reshape(batch, num_chunks * chunk_len, -1, channels)[:, :length]
