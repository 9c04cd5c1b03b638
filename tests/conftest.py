"""Test configuration: fake 8 CPU devices before JAX is imported, so every sharding path runs."""

import os

# LLVM optimisation level 0: compiling is most of this suite's time, and the level changes how fast a
# program runs, not what it computes (the HLO passes are the same; dots run in the same library code).
# Subprocesses get these flags too (helpers.subprocess_env); the benchmarks and the product keep XLA's default.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a longer test (still run in CI)")


@pytest.fixture(scope="session")
def kjv_cache(tmp_path_factory):
    """A data cache shared by the tests (the tiny KJV slice is tokenized once per session)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache directory shared by the test modules that switch it on
    (helpers.persistent_compile_cache): a test that builds several trainers of one config compiles once."""
    return tmp_path_factory.mktemp("xla_cache")
