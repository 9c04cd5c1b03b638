"""JAX_PLATFORMS on a host with libtpu installed (the tpu extra) but no TPU attached."""

import importlib.util
import os
import subprocess
import sys

import pytest

from lmu_jax import platforms


def decide(monkeypatch, env, *, libtpu=True, tpu_nodes=False, gpu_plugin=False):
    installed = {"libtpu"} if libtpu else set()
    if gpu_plugin:
        installed.add("jax_cuda12_plugin")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    monkeypatch.setattr(platforms, "has_tpu_device_nodes", lambda: tpu_nodes)
    platforms.leave_out_absent_tpu(env)
    return env.get("JAX_PLATFORMS")


def test_tpu_is_left_out_only_where_libtpu_is_installed_and_no_tpu_is_attached(monkeypatch):
    assert decide(monkeypatch, {}) == "cpu"
    assert decide(monkeypatch, {}, gpu_plugin=True) == "cuda,rocm,cpu"
    assert decide(monkeypatch, {}, tpu_nodes=True) is None  # a TPU VM: JAX picks the TPU
    assert decide(monkeypatch, {}, libtpu=False) is None  # nothing to leave out
    assert decide(monkeypatch, {"JAX_PLATFORMS": "tpu"}) == "tpu"  # the user's choice stands


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the tpu extra)")
def test_a_command_prints_no_libtpu_warnings_on_a_host_without_tpu():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import sys; from lmu_jax import cli; sys.exit(cli.main(['flops', 'model.d_model=64', 'model.n_heads=2']))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "TPU" not in done.stderr and "libtpu" not in done.stderr, done.stderr
