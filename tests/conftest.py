"""Test configuration: fake 8 CPU devices before JAX is imported, so every sharding path runs."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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
