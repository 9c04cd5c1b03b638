"""Does a run fit in device memory? Checked before anything is allocated: one line and exit 2 if not.

Two figures per device, neither allocating anything:

1. ``state_need``: the train state (parameters, optimizer state, a carried state) from its abstract
   shapes and the shardings the trainer gives them, so fsdp and tensor sharding divide it. Exact and
   instant: a model whose state alone cannot fit is refused before anything compiles.
2. ``step_need``: the compiled train step's peak from XLA's memory analysis: arguments + outputs -
   donated (aliased) + temporaries (activations kept for the backward pass, gradients, workspace) +
   generated code. Compiling places nothing on a device, and it is the compile the run needs anyway:
   ``jax.jit`` finds the executable compiled ahead of time in its caches at the first step.

What a device has (``device_capacity``): an accelerator's ``memory_stats()["bytes_limit"]``; a CPU
device, the host's available memory divided among this process's CPU devices, which share it.

``check_run`` makes both checks for a run's program (lmu_jax/train/builder.py), compiling its train
step through the program; the Trainer calls it before it allocates anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np

from lmu_jax.errors import UserError


@dataclass(frozen=True)
class Need:
    """Bytes one device needs: the train state, and once compiled, the step's peak and temporaries."""

    state: int
    step: int | None = None  # XLA's peak of the compiled step (it includes the state)
    temporaries: int | None = None

    @property
    def total(self) -> int:
        return self.state if self.step is None else self.step


@dataclass(frozen=True)
class Capacity:
    bytes: int
    what: str  # "a CPU device here has 2.6 GiB (...)"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**29 else f"{n / 2**20:.1f} MiB"


def state_need(abstract_state) -> Need:
    """Per-device bytes of a tree of ShapeDtypeStructs carrying their shardings (the trainer's
    ``abstract_state``): each leaf counts the shard one device holds."""
    total = 0
    for leaf in jax.tree.leaves(abstract_state):
        shape = leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return Need(state=total)


def step_need(abstract_state, compiled) -> Need:
    """``state_need`` plus the peak and temporaries of a compiled step (``jit(...).lower(...).compile()``);
    the state alone where the backend gives no memory analysis."""
    need = state_need(abstract_state)
    m = compiled.memory_analysis()
    if m is None:
        return need
    return Need(state=need.state, step=peak_bytes(compiled), temporaries=m.temp_size_in_bytes)


def peak_bytes(compiled) -> int:
    """Per-device bytes the compiled step holds at its peak: arguments + outputs - aliased (donated
    state reused) + temporaries + generated code."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes)


def device_capacity(device, shared: int = 1) -> Capacity | None:
    """Memory one device can use, or None where the backend does not say; a CPU device's is the host's
    available memory over ``shared``, the CPU devices of this process that use it at once."""
    if device.platform == "cpu":
        import psutil

        available = psutil.virtual_memory().available
        share = f", {gib(available)}, shared by {shared} CPU devices" if shared > 1 else ""
        return Capacity(available // shared,
                        f"a CPU device here has {gib(available // shared)} (the host's available memory{share})")
    limit = (device.memory_stats() or {}).get("bytes_limit")
    return None if limit is None else Capacity(limit, f"a {device.device_kind} has {gib(limit)}")


def check_run(program, decide=lambda check: check()) -> None:
    """Refuse ``program`` (a ``builder.Program``) when it cannot fit: its train state first (no compile),
    then its compiled train step, the compile its first step reuses. ``decide(check)`` runs each check
    (the Trainer's: on process 0 only, its refusal stopping every process)."""
    decide(lambda: check_fits(state_need(program.abstract_state), program))
    compiled = program.lower_train_step().compile()
    decide(lambda: check_fits(step_need(program.abstract_state, compiled), program))


def check_fits(need: Need, program, capacity: Capacity | None = None) -> None:
    """Raise a one-line UserError when ``need`` exceeds ``capacity`` (default: one of this process's
    devices of the program's mesh): what it needs per device, what a device has, and what to change."""
    cfg, model_cfg, mesh = program.cfg, program.model_cfg, program.mesh
    if capacity is None:
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        capacity = device_capacity(local[0], shared=len(local)) if local else None
    if capacity is None or need.total <= capacity.bytes:
        return
    shape = (f"model.family={model_cfg.family}, model.d_model={model_cfg.d_model}, "
             f"model.n_layers={model_cfg.n_layers}, mesh {dict(mesh.shape)}")
    if need.step is None:
        needs = f"its parameters and optimizer state alone need {gib(need.state)} per device"
    else:
        needs = (f"its train step needs {gib(need.step)} per device (train state {gib(need.state)}, temporaries "
                 f"{gib(need.temporaries)}: activations, gradients, workspace; XLA's memory analysis)")
    fixes = _state_fixes(mesh)
    if need.step is not None:  # temporaries first where they are most of it
        activations = _activation_fixes(cfg, model_cfg)
        fixes = activations + fixes if need.temporaries > need.state else fixes + activations
    raise UserError(f"the run does not fit in memory ({shape}): {needs}, and {capacity.what}; "
                    f"to fit: {', or '.join(fixes)}")


def _state_fixes(mesh) -> list[str]:
    """Parameters and optimizer state: a smaller model, or sharded over more devices."""
    devices, fsdp, tensor = mesh.size, mesh.shape["fsdp"], mesh.shape["tensor"]
    if devices // tensor > fsdp:
        shard = f"mesh.fsdp={devices // tensor} (shards parameters and optimizer state over the devices)"
    else:
        shard = "more devices with mesh.fsdp (it shards parameters and optimizer state)"
    return [shard, "a smaller model (model.d_model, model.n_layers)"]


def _activation_fixes(cfg, model_cfg) -> list[str]:
    """Temporaries: fewer rows at a time, or activations recomputed instead of kept."""
    fixes = [f"more train.microbatches (now {cfg.train.microbatches}; each part's activations are "
             f"the batch's / microbatches)"]
    if getattr(model_cfg, "remat", True) is not True:
        fixes.append(f"model.remat=true (now {model_cfg.remat})")
    fixes.append("a smaller train.batch_size or data.seq_len")
    return fixes
