"""The Legendre Memory Unit's linear time-invariant system, built once on the host in float64.

Continuous system (Chilkuri et al. 2021, eqs. 2-3; Voelker et al. 2019 divided by theta):

    A_ij = (2i+1)/theta * (-1 if i < j else (-1)^(i-j+1)),    B_i = (2i+1) (-1)^i / theta,

discretised by zero-order hold at dt = 1: expm([[A, B], [0, 0]]) = [[A_bar, B_bar], [0, 1]].
The memory m_t = A_bar m_{t-1} + B_bar u_t holds the Legendre coefficients of the last ~theta
inputs; `legendre_decoder` reads a delayed input back out of it.

Everything here is numpy float64, cached by (order, theta, ...) and returned read-only, so the
JAX kernels in `memory.py` / `chunked.py` embed them as frozen constants and nothing is ever
recomputed per training step. Nothing here diagonalises A: its eigenvectors are hopelessly
ill-conditioned beyond order ~8 (docs/lmu.md).
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.linalg
import scipy.special

# H(order=256, length=16384) is 32 MB in float64; a handful of (order, theta, length) keys covers
# a training run plus an eval at another length without holding gigabytes.
_CACHE_SIZE = 16


def _read_only(*arrays: np.ndarray):
    for a in arrays:
        a.flags.writeable = False
    return arrays if len(arrays) > 1 else arrays[0]


def _check(order: int, theta: float) -> tuple[int, float]:
    if int(order) != order or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    return int(order), float(theta)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def lmu_continuous(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Continuous-time (A, B): A of shape (order, order), B of shape (order,), float64."""
    order, theta = _check(order, theta)
    i = np.arange(order)[:, None]
    j = np.arange(order)[None, :]
    scale = (2 * i + 1) / theta
    a = scale * np.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    b = (2 * np.arange(order) + 1) * (-1.0) ** np.arange(order) / theta
    return _read_only(a, b)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def lmu_matrices(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Zero-order-hold discretisation at dt = 1: (A_bar (order, order), B_bar (order,)), float64.

    The matrix exponential of the augmented block [[A, B], [0, 0]] gives A_bar = e^A and
    B_bar = A^{-1}(e^A - I) B in one step, without inverting A.
    """
    a, b = lmu_continuous(order, theta)
    augmented = np.zeros((order + 1, order + 1))
    augmented[:order, :order] = a
    augmented[:order, order] = b
    expm = scipy.linalg.expm(augmented)
    return _read_only(np.ascontiguousarray(expm[:order, :order]), expm[:order, order].copy())


@functools.lru_cache(maxsize=_CACHE_SIZE)
def impulse_response(order: int, theta: float, length: int) -> np.ndarray:
    """H[t] = A_bar^t B_bar for t < length: shape (length, order), float64, read-only.

    Built by doubling, H[L:2L] = H[0:L] (A_bar^L)^T: log2(length) matmuls instead of `length`
    matrix-vector products (same float64 accuracy, ~1e-15 relative).
    """
    if int(length) != length or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    a_bar, b_bar = lmu_matrices(order, theta)
    h = b_bar[None, :].copy()
    a_power = a_bar  # A_bar^len(h)
    while len(h) < length:
        h = np.concatenate([h, h @ a_power.T])
        a_power = a_power @ a_power
    return _read_only(np.ascontiguousarray(h[:length]))


def fft_length(length: int) -> int:
    """Smallest 2^a 3^b 5^c >= 2 * length: long enough that the circular convolution of two
    length-n signals has no wrap-around in its first n samples, and fast for every FFT library."""
    candidate = 2 * int(length)
    while True:
        rest = candidate
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return candidate
        candidate += 1


@functools.lru_cache(maxsize=_CACHE_SIZE)
def impulse_response_spectrum(order: int, theta: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """rfft of H zero-padded to `fft_length(length)`, as (real, imag) float32 parts of shape
    (order, fft_length // 2 + 1).

    Transformed in float64 and only then rounded, which is what makes the FFT path the most
    accurate one (~2e-7 relative). Real and imaginary parts are kept apart so the
    folded path can project them with two real float32 matmuls.
    """
    spectrum = np.fft.rfft(impulse_response(order, theta, length), n=fft_length(length), axis=0).T
    return _read_only(
        np.ascontiguousarray(spectrum.real, dtype=np.float32),
        np.ascontiguousarray(spectrum.imag, dtype=np.float32),
    )


def legendre_decoder(order: int, delays) -> np.ndarray:
    """Weights P_i(2r - 1), shape (len(delays), order) (or (order,) for a scalar delay), float64.

    u(t - r*theta) ~= sum_i P_i(2r - 1) m_i(t) for r in [0, 1]: r = 0 reads the newest input,
    r = 1 the input theta steps ago. (The mirrored P_i(1 - 2r) is wrong except at r = 0.5.)
    """
    r = np.asarray(delays, dtype=np.float64)
    if np.any((r < 0) | (r > 1)):
        raise ValueError(f"delays are fractions of theta and must lie in [0, 1], got {delays!r}")
    degrees = np.arange(order)
    return scipy.special.eval_legendre(degrees, 2.0 * r[..., None] - 1.0)
