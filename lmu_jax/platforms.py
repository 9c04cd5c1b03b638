"""Which platforms JAX may open on this host, decided before JAX is imported.

The tpu extra installs libtpu on any host, so that `lmu-jax compile` can compile for TPU slices from a
CPU. Left to itself, JAX then tries to open TPU chips on every start and, where there are none, prints a
screen of libtpu warnings before the command's own output. So where the user has not chosen
(``JAX_PLATFORMS`` unset) and the host has no TPU device nodes, TPU is left out of the platforms.
"""

from __future__ import annotations

import glob
import importlib.util
import os

GPU_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm6_plugin")


def has_tpu_device_nodes() -> bool:
    """TPU chips attached to this host (the device nodes a TPU VM has)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def leave_out_absent_tpu(env=os.environ) -> None:
    """Set ``JAX_PLATFORMS`` without TPU when libtpu is installed but no TPU is attached."""
    if "JAX_PLATFORMS" in env or importlib.util.find_spec("libtpu") is None or has_tpu_device_nodes():
        return
    gpu = any(importlib.util.find_spec(name) is not None for name in GPU_PLUGINS)
    env["JAX_PLATFORMS"] = "cuda,rocm,cpu" if gpu else "cpu"
