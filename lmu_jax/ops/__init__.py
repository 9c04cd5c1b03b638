"""Pure numerical kernels (no Flax): the LMU's Legendre matrices and its memory.

    from lmu_jax.ops import lmu_matrices, impulse_response, lmu_memory
"""

from lmu_jax.ops.chunked import chunk_tables, combine_chunk_states, scan_chunk_states
from lmu_jax.ops.legendre import (
    fft_length,
    impulse_response,
    impulse_response_spectrum,
    legendre_decoder,
    lmu_continuous,
    lmu_matrices,
)
from lmu_jax.ops.memory import (
    MEMORY_IMPLS,
    default_chunk_len,
    legendre_readout,
    lmu_memory,
    lmu_memory_folded,
    lmu_memory_step,
    select_memory_impl,
)

__all__ = [
    "MEMORY_IMPLS",
    "chunk_tables",
    "combine_chunk_states",
    "default_chunk_len",
    "fft_length",
    "impulse_response",
    "impulse_response_spectrum",
    "legendre_decoder",
    "legendre_readout",
    "lmu_continuous",
    "lmu_matrices",
    "lmu_memory",
    "lmu_memory_folded",
    "lmu_memory_step",
    "scan_chunk_states",
    "select_memory_impl",
]
