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


# What a TPU compile leaves in os.environ: lmu_jax.train.compile tells libtpu the slice it would look up on
# a TPU VM, and libtpu records where it was loaded from. A later test's subprocesses, or its own pod
# detection (lmu_jax.distributed: TPU_WORKER_HOSTNAMES means a TPU pod), must not see them. Module-scoped
# fixtures compile too, so every test ends with these variables as the session began.
LIBTPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_LIBRARY_PATH")
SESSION_LIBTPU_ENV = {name: os.environ.get(name) for name in LIBTPU_ENV}


@pytest.fixture(autouse=True)
def no_libtpu_environment_after_a_test():
    yield
    for name, value in SESSION_LIBTPU_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
