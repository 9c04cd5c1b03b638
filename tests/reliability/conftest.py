"""Fault-injection tests: shared fixtures (helpers: reliability_helpers.py; tests/conftest.py fakes the
8 CPU devices and provides the shared data cache, kjv_cache).

Most of the cost of a tiny run is XLA compiling the same few programs again in every process. These
tests therefore share one persistent compilation cache (``compile_cache``, tests/conftest.py): the
subprocesses they start get it through the environment (``run_env``), and each test module here
switches it on in-process for its own duration only (``_compile_cache``), so the rest of the suite is
untouched. A cached executable is the
same binary as a fresh compile, so bitwise comparisons are unaffected.

Test hooks of the code under test (documented where they are read):
``LMU_JAX_TEST_CKPT_DELAY_S`` (lmu_jax/train/checkpoint.py) and ``LMU_JAX_TEST_NONFINITE_STEP``
(lmu_jax/train/loop.py).
"""

from __future__ import annotations

import pytest

from helpers import persistent_compile_cache, subprocess_env
from reliability_helpers import Launch


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(compile_cache):
    with persistent_compile_cache(compile_cache):
        yield


@pytest.fixture
def run_env(compile_cache):
    """Environment for a `python -m lmu_jax.cli` (or launch_local) subprocess; extra variables as kwargs."""

    def make(devices: int = 8, **extra) -> dict:
        env = subprocess_env(devices, JAX_COMPILATION_CACHE_DIR=compile_cache,
                             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)
        env.pop("LMU_JAX_TEST_CKPT_DELAY_S", None)
        env.pop("LMU_JAX_TEST_NONFINITE_STEP", None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    return make


@pytest.fixture(autouse=True)
def _stop_launches():
    """No test leaves a training process behind, even when it fails half-way."""
    yield
    Launch.stop_all()
