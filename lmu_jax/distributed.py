"""Multi-process JAX: initialise ``jax.distributed`` from config or environment, and small helpers.

Sources (``detect``), in order:
1. ``distributed.coordinator`` in the config (with ``num_processes`` and ``process_id``);
2. the environment ``LMU_JAX_COORDINATOR``, ``LMU_JAX_NUM_PROCESSES``, ``LMU_JAX_PROCESS_ID``
   (what the local launcher ``lmu_jax.launch_local`` sets for each process);
3. a Cloud TPU VM (device nodes + libtpu; or GKE's ``TPU_WORKER_HOSTNAMES``), a SLURM step or an
   Open MPI job: ``jax.distributed.initialize()`` finds the coordinator, the count and the index itself;
4. otherwise a single process.
Must run before any other JAX call. A process other than 0 first waits up to ``distributed.timeout_s``
for the coordinator's port to accept connections; an unreachable coordinator is then one line naming
the source, the address and what to check, as is any error ``jax.distributed.initialize`` raises.
(jax's coordination client aborts the process itself, SIGABRT with ``DEADLINE_EXCEEDED ...
RegisterTask``, when process 0 waits past the timeout for a peer that never came; ``launch_local``
and the ``tpu/`` babysitter report that as a failed process.)

Once started, ``check_agreement`` makes every process compare what it believes (local device count,
read off the global device list, then mesh shape, config, data: gathered from every process); a
difference is one line naming the fact and each process's value, instead of a hang or a wrong
result later.

``job_process`` reads this process's (index, count) from the same environment *without* starting JAX,
for the sweep runner, which starts the trainer as a child process. On Cloud TPU VMs the index is in
no variable; the ``tpu/`` launcher exports ``LMU_JAX_WORKER_ID`` and ``LMU_JAX_WORKER_COUNT``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmu_jax.errors import UserError
from lmu_jax.platforms import has_tpu_device_nodes

# What jax's own cluster detection requires (jax/_src/clusters/{slurm,ompi}_cluster.py)
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
OMPI_ENV = "OMPI_MCA_orte_hnp_uri"
TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
FACT_BYTES = 96  # each compared fact travels as this many bytes of its text
_initialized = False


@dataclass(frozen=True)
class Launch:
    """How this process joins: ``source`` is config | environment | cloud-tpu | slurm | open-mpi | single.
    The cluster sources leave coordinator, count and index to jax (None where unknown here)."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


def _int_env(env, name: str, source: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise UserError(f"{source}: {name}={env.get(name)!r} must be an integer")


def on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM: TPU device nodes plus libtpu. JAX then finds the other workers through the
    VM metadata server; an ordinary TPU VM sets none of the cluster variables."""
    return has_tpu_device_nodes() and importlib.util.find_spec("libtpu") is not None


def detect(dist_cfg, env=None) -> Launch:
    env = os.environ if env is None else env
    if dist_cfg.coordinator:
        launch = Launch("config", dist_cfg.coordinator, dist_cfg.num_processes, dist_cfg.process_id)
    elif env.get("LMU_JAX_COORDINATOR"):
        source = "LMU_JAX_COORDINATOR is set"
        launch = Launch("environment", env["LMU_JAX_COORDINATOR"], _int_env(env, "LMU_JAX_NUM_PROCESSES", source),
                        _int_env(env, "LMU_JAX_PROCESS_ID", source))
    elif any(k in env for k in TPU_POD_ENV) or on_cloud_tpu_vm():
        return Launch("cloud-tpu", None, _optional_int(env, "LMU_JAX_WORKER_COUNT"),
                      _optional_int(env, "LMU_JAX_WORKER_ID", "TPU_WORKER_ID"))
    elif all(k in env for k in SLURM_ENV):
        launch = Launch("slurm", None, _int_env(env, "SLURM_NTASKS", "SLURM"), _int_env(env, "SLURM_PROCID", "SLURM"))
    elif OMPI_ENV in env:
        source = "Open MPI"
        launch = Launch("open-mpi", None, _int_env(env, "OMPI_COMM_WORLD_SIZE", source),
                        _int_env(env, "OMPI_COMM_WORLD_RANK", source))
    else:
        return Launch("single")
    return launch if launch.num_processes > 1 else Launch("single")


def _optional_int(env, *names: str) -> int | None:
    for name in names:
        if env.get(name, "").isdigit():
            return int(env[name])
    return None


def job_process(env=None) -> tuple[int, int | None] | None:
    """(this process's index, process count or None) of a multi-process job, from the environment
    alone; None for a single process or where the index is unknown."""
    from lmu_jax.config import DistributedConfig

    launch = detect(DistributedConfig(), env)
    if not launch.multi_process or launch.process_id is None:
        return None
    return launch.process_id, launch.num_processes


def initialize(dist_cfg) -> None:
    """Start the multi-controller runtime when this is one of several processes; idempotent."""
    global _initialized
    if _initialized:
        return
    launch = detect(dist_cfg)
    timeout = dist_cfg.timeout_s
    if launch.multi_process:
        where = (f"coordinator {launch.coordinator}, process {launch.process_id} of {launch.num_processes}"
                 if launch.coordinator else "coordinator found by jax")
        if launch.coordinator and launch.process_id != 0 and not _reachable(launch.coordinator, timeout):
            raise UserError(f"jax.distributed.initialize failed ({launch.source}: {where}): nothing accepts "
                            f"connections at {launch.coordinator} within distributed.timeout_s={timeout}; check "
                            "that process 0 was started and that its address and port are reachable from here")
        try:
            if launch.coordinator:
                jax.distributed.initialize(launch.coordinator, num_processes=launch.num_processes,
                                           process_id=launch.process_id, initialization_timeout=timeout,
                                           heartbeat_timeout_seconds=timeout)
            else:
                jax.distributed.initialize(initialization_timeout=timeout)
        except Exception as err:  # e.g. a bad address, or the cluster environment not found
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"jax.distributed.initialize failed ({launch.source}: {where}; distributed.timeout_s="
                            f"{timeout}): {first}; check that every process was started and can reach the "
                            "coordinator")
    _initialized = True


def _reachable(address: str, timeout: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds (retrying)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def check_agreement(facts: dict[str, object]) -> None:
    """Every process must hold the same value for each fact; one line naming what differs otherwise."""
    if jax.process_count() == 1:
        return
    # From the global device list every process sees alike, not a collective: jax's collectives
    # themselves assume equal local device counts and fail obscurely otherwise.
    per_process = Counter(d.process_index for d in jax.devices())
    if len(set(per_process.values())) > 1:
        shown = ", ".join(f"process {p} has {n}" for p, n in sorted(per_process.items()))
        raise UserError(f"the processes disagree on local device count: {shown}; start every process with "
                        "the same devices")
    names = list(facts)
    encoded = np.zeros((len(names), FACT_BYTES), np.uint8)
    for row, name in enumerate(names):
        text = str(facts[name]).encode()[:FACT_BYTES]
        encoded[row, :len(text)] = np.frombuffer(text, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(encoded))  # [process, fact, byte]
    for row, name in enumerate(names):
        values = [bytes(gathered[p, row]).rstrip(b"\0").decode(errors="replace") for p in range(len(gathered))]
        if len(set(values)) > 1:
            shown = ", ".join(f"process {p} has {v}" for p, v in enumerate(values))
            raise UserError(f"the processes disagree on {name}: {shown}; start every process with the same "
                            "config, code and devices")


def agreed(fn, what: str):
    """``fn()`` on every process; a UserError on any stops every process (none is left waiting)."""
    result, failure = None, None
    try:
        result = fn()
    except UserError as err:
        failure = err
    if not all_processes(failure is None):
        raise failure or UserError(f"{what} failed on another process; see its message")
    return result


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
