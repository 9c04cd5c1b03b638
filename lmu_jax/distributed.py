"""Multi-process JAX: initialise ``jax.distributed`` from config or environment, and small helpers.

Sources, in order:
1. ``distributed.coordinator`` in the config (with ``num_processes`` and ``process_id``);
2. the environment ``LMU_JAX_COORDINATOR``, ``LMU_JAX_NUM_PROCESSES``, ``LMU_JAX_PROCESS_ID``
   (what the local launcher ``lmu_jax.launch_local`` sets for each process);
3. Cloud TPU VMs (device nodes + libtpu), SLURM and Open MPI: ``jax.distributed.initialize()``
   detects the cluster by itself;
4. otherwise a single process.
Must run before any other JAX call.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmu_jax.errors import UserError

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_initialized = False


def _explicit_settings(dist_cfg):
    if dist_cfg.coordinator:
        return dist_cfg.coordinator, dist_cfg.num_processes, dist_cfg.process_id
    env = os.environ
    if env.get("LMU_JAX_COORDINATOR"):
        try:
            return env["LMU_JAX_COORDINATOR"], int(env["LMU_JAX_NUM_PROCESSES"]), int(env["LMU_JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError("LMU_JAX_COORDINATOR is set: LMU_JAX_NUM_PROCESSES and LMU_JAX_PROCESS_ID "
                            "must be integers too")
    return None


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM: TPU device nodes plus libtpu. JAX then finds the other workers through the
    VM metadata server; an ordinary TPU VM sets none of the cluster variables above."""
    import glob
    import importlib.util

    has_devices = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_devices and importlib.util.find_spec("libtpu") is not None


def initialize(dist_cfg) -> None:
    """Start the multi-controller runtime when this is one of several processes; idempotent."""
    global _initialized
    if _initialized:
        return
    settings = _explicit_settings(dist_cfg)
    timeout = dist_cfg.timeout_s
    if settings:
        address, count, index = settings
        if count > 1:
            jax.distributed.initialize(address, num_processes=count, process_id=index,
                                       initialization_timeout=timeout, heartbeat_timeout_seconds=timeout)
    elif any(k in os.environ for k in _CLUSTER_ENV) or _on_cloud_tpu_vm():
        jax.distributed.initialize(initialization_timeout=timeout)
    _initialized = True


def is_main_process() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_processes(flag: bool) -> bool:
    """True on every process when ``flag`` is true on every process (a decision all must share)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def broadcast_from_main(value):
    """Process 0's value on every process (e.g. a decision that must agree)."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(value)
