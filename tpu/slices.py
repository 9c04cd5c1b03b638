"""Cloud TPU slice names -> chips, hosts (TPU VMs), JAX devices per host and runtime version.

The number in an accelerator type counts different things per generation:

- ``v4-N`` and ``v5p-N`` count **TensorCores**, two per chip. A chip runs both cores as one JAX device
  ("megacore"), a TPU VM (host) holds 4 chips. So ``v4-32`` = 16 chips = 4 hosts x 4 devices, and
  ``v5p-128`` = 64 chips = 16 hosts.
- ``v5litepod-N`` (v5e) and ``v6e-N`` count **chips**, one TensorCore each. Slices of up to 8 chips are
  one VM (``v5litepod-8`` / ``v6e-8`` = one host with 8 devices); larger slices are built from 4-chip VMs,
  so ``v5litepod-256`` = 64 hosts x 4 devices.

Runtime (software) versions are the ones Google lists for JAX and PyTorch: ``tpu-ubuntu2204-base`` for
v4, ``v2-alpha-tpuv5-lite`` for v5e, ``v2-alpha-tpuv5`` for v5p, ``v2-alpha-tpuv6e`` for v6e.

The table is for our own arithmetic (worker counts, expected exit reports) and early, clear errors;
Cloud TPU still validates the final shape when the slice is created.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmu_jax.errors import bad_value

CHIPS_PER_MULTI_HOST_VM = 4  # every generation here builds multi-host slices from 4-chip VMs


@dataclass(frozen=True)
class Generation:
    name: str  # what people call it: v4, v5e, v5p, v6e
    prefix: str  # accelerator-type prefix Cloud TPU uses: v4, v5litepod, v5p, v6e
    cores_per_chip: int  # 2 where the size counts TensorCores, 1 where it counts chips
    max_single_vm_chips: int  # the largest slice that is one VM
    runtime_version: str
    sizes_help: str

    def valid_size(self, size: int) -> bool:
        if self.cores_per_chip == 2:  # v4 / v5p: whole 4-chip hosts, up to the largest single slice
            return size % 8 == 0 and 8 <= size <= _MAX_CORES[self.name]
        return size in (1, 4, 8, 16, 32, 64, 128, 256)  # v5e / v6e: the 2D shapes of a 256-chip pod


_MAX_CORES = {"v4": 8192, "v5p": 12288}  # full v4 pod (4096 chips); largest v5p slice (6144 chips)

GENERATIONS = {
    g.prefix: g
    for g in (
        Generation("v4", "v4", 2, 4, "tpu-ubuntu2204-base",
                   "v4 sizes count TensorCores: multiples of 8 from v4-8 to v4-8192"),
        Generation("v5e", "v5litepod", 1, 8, "v2-alpha-tpuv5-lite",
                   "v5e sizes count chips: v5litepod-1, 4, 8, 16, 32, 64, 128 or 256"),
        Generation("v5p", "v5p", 2, 4, "v2-alpha-tpuv5",
                   "v5p sizes count TensorCores: multiples of 8 from v5p-8 to v5p-12288"),
        Generation("v6e", "v6e", 1, 8, "v2-alpha-tpuv6e",
                   "v6e sizes count chips: v6e-1, 4, 8, 16, 32, 64, 128 or 256"),
    )
}
_ALIASES = {"v5e": "v5litepod"}  # MaxText and papers say v5e-256; Cloud TPU says v5litepod-256


@dataclass(frozen=True)
class SliceSpec:
    accelerator_type: str  # exactly what gcloud takes, e.g. v5litepod-256
    generation: str
    chips: int
    hosts: int  # TPU VMs = gcloud workers = JAX processes
    devices_per_host: int  # jax.local_device_count() on each worker
    runtime_version: str

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host


def parse_slice(name: str) -> SliceSpec:
    """``"v4-32"`` -> SliceSpec(chips=16, hosts=4, devices_per_host=4, ...); UserError if unknown."""
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    known = ", ".join(f"{g.prefix}-N" for g in GENERATIONS.values()) + " (v5e-N is accepted for v5litepod-N)"
    if not match:
        raise bad_value("slice", name, f"expected <generation>-<size>, one of {known}")
    prefix, size = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    generation = GENERATIONS.get(prefix)
    if generation is None:
        raise bad_value("slice", name, f"unknown TPU generation; known: {known}")
    if not generation.valid_size(size):
        raise bad_value("slice", name, generation.sizes_help)
    chips = size // generation.cores_per_chip
    if chips <= generation.max_single_vm_chips:
        hosts, per_host = 1, chips
    else:
        hosts, per_host = chips // CHIPS_PER_MULTI_HOST_VM, CHIPS_PER_MULTI_HOST_VM
    return SliceSpec(f"{prefix}-{size}", generation.name, chips, hosts, per_host, generation.runtime_version)


def slice_table(names=("v4-8", "v4-32", "v4-128", "v5litepod-8", "v5litepod-16", "v5litepod-256",
                       "v5p-8", "v5p-128", "v6e-8", "v6e-16", "v6e-256")) -> str:
    """A plain-text table of common slices (``python -m tpu.launch slices``)."""
    rows = [("slice", "generation", "chips", "hosts", "devices/host", "runtime version")]
    for name in names:
        s = parse_slice(name)
        rows.append((s.accelerator_type, s.generation, str(s.chips), str(s.hosts), str(s.devices_per_host),
                     s.runtime_version))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
