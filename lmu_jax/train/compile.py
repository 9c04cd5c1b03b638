"""CLI: `lmu-jax compile --config FILE --topology NAME`: does the train step fit? Compiled ahead of time.

    lmu-jax compile --config c.yaml --topology v5e-256     # a TPU slice (needs libtpu, i.e. jax[tpu])
    lmu-jax compile --config c.yaml --topology cpu-8       # 8 fake CPU devices, compiled for real here

The trainer's own train step (its jit, shardings and donated state; ``Trainer._setup_state``) is
lowered for the topology's devices with abstract inputs and compiled by XLA, without running it and
without the hardware. ``memory_analysis()`` of the compiled program gives per-device bytes: arguments
(state + batch), outputs (the new state, aliased to the donated arguments), temporaries and generated
code; their peak is compared with the device's HBM.

TPU topologies come from ``jax.experimental.topologies.get_topology_desc`` (chip grids as MaxText
names them: ``v5e:16x16``, ``v4:2x2x4``), which needs libtpu. Where the installed JAX cannot describe
the topology (no libtpu here), the command says so in one line, exit code 2, and names the nearest it
can compile for: ``cpu-N``, as many fake CPU devices, which XLA's CPU compiler really compiles (the
memory figures are then the CPU compiler's: the shapes and shardings are the pod's, the fusion and
layouts are not). The vocabulary is the tokenizer's configured size (bytes: 256); no data is read.
"""

from __future__ import annotations

import math
import os
import re

from lmu_jax.errors import UserError, bad_value

HBM_GIB_PER_DEVICE = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # one JAX device = one chip
TOPOLOGY_HELP = "cpu-N (N fake CPU devices) or a TPU slice such as v4-32, v5e-256, v5p-128, v6e-8"


def register(subparsers) -> None:
    p = subparsers.add_parser("compile", help="compile the train step for a topology ahead of time; "
                                              "per-device memory vs HBM")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=2048")
    p.add_argument("--topology", required=True, help=TOPOLOGY_HELP)
    p.set_defaults(func=cmd_compile)


def _chip_grid(chips: int, dims: int) -> str:
    """A near-cubic (or near-square) grid of ``chips``: 256 -> 16x16, 4 -> 2x2x1, 16 -> 2x2x4."""
    sides = [1] * dims
    for _ in range(int(math.log2(chips))):
        sides[sides.index(min(sides))] *= 2
    return "x".join(map(str, sorted(sides, key=lambda side: (side == 1, side))))  # 2x2x1, 2x2x4, 2x4


def tpu_devices(spec):
    """The topology's abstract devices (raises when JAX cannot describe it, e.g. without libtpu)."""
    from jax.experimental import topologies

    three_d = spec.generation in ("v4", "v5p")
    name = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}[spec.generation]
    return topologies.get_topology_desc(
        topology_name=f"{name}:{_chip_grid(spec.chips, 3 if three_d else 2)}", platform="tpu",
        chip_config_name="megacore" if three_d else "default",
        chips_per_host_bounds=(2, 2, 1) if spec.hosts > 1 else (*map(int, _chip_grid(spec.chips, 2).split("x")), 1),
        num_slices=1, wrap=(False, False, False)).devices


def cpu_devices(count: int):
    """``count`` CPU devices in this process: set before JAX starts its CPU backend."""
    import jax

    from lmu_jax.launch_local import with_cpu_device_count

    os.environ["XLA_FLAGS"] = with_cpu_device_count(os.environ.get("XLA_FLAGS", ""), count)
    jax.config.update("jax_platforms", "cpu")
    devices = jax.devices("cpu")
    if len(devices) != count:
        raise UserError(f"--topology cpu-{count}: this process already started JAX with {len(devices)} CPU "
                        "devices; run `lmu-jax compile` in a fresh process")
    return devices


def topology_devices(name: str):
    """(devices, label, HBM bytes per device or None)."""
    cpu = re.fullmatch(r"cpu-(\d+)", name.strip().lower())
    if cpu:
        count = int(cpu.group(1))
        if not 1 <= count <= 4096:
            raise bad_value("--topology", name, "cpu-N with 1 <= N <= 4096")
        return cpu_devices(count), f"{count} CPU devices", None
    from tpu.slices import parse_slice

    try:
        spec = parse_slice(name)
    except UserError:
        raise bad_value("--topology", name, TOPOLOGY_HELP)
    try:
        devices = tpu_devices(spec)
    except Exception as err:  # no libtpu, or a topology this libtpu does not know
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"--topology {name}: the installed JAX cannot describe this TPU topology ({first}); "
                        f"install jax[tpu] for it, or compile for the nearest it can here: --topology "
                        f"cpu-{spec.chips} ({spec.chips} fake CPU devices, one per chip)")
    return devices, f"{spec.accelerator_type}: {spec.chips} chips", HBM_GIB_PER_DEVICE[spec.generation] * 2**30


def compile_train_step(cfg, devices):
    """The compiled train step of ``cfg`` on a mesh of ``devices`` (abstract inputs only)."""
    import jax
    import jax.numpy as jnp

    from lmu_jax.config import resolve_auto
    from lmu_jax.models import build_model, carries_state
    from lmu_jax.sharding import data_parallel_size, make_mesh
    from lmu_jax.train.commands import _default_vocab
    from lmu_jax.train.loop import Trainer

    class StepOnly(Trainer):
        """The trainer's state, shardings and jitted step, without data or a run directory."""

        def __init__(self):
            self.mesh = make_mesh(cfg.mesh, devices)
            # the `auto` settings as the trainer resolves them on the target's platform
            self.cfg = resolve_auto(cfg, devices[0].platform, data_parallel_size(self.mesh))
            self.seq_len = cfg.data.seq_len
            self.model_cfg = self.cfg.model.resolved(_default_vocab(cfg), self.seq_len)
            self.model_cfg.validate()
            self.model = build_model(self.model_cfg)
            self.carried = carries_state(self.model_cfg, cfg.data.order)
            self._setup_state()

    step = StepOnly()
    dp = step.mesh.shape["data"] * step.mesh.shape["fsdp"]
    if cfg.train.batch_size % dp:
        raise bad_value("train.batch_size", cfg.train.batch_size, f"a multiple of the data-parallel size {dp}")
    inputs = [jax.ShapeDtypeStruct((cfg.train.batch_size, step.seq_len + 1), jnp.int32, sharding=step.batch_sharding)]
    if step.carried:  # the rows whose stream starts (Trainer.step_inputs)
        inputs.append(jax.ShapeDtypeStruct((cfg.train.batch_size,), jnp.bool_, sharding=step.weight_sharding))
    return step.train_step.lower(step.abstract_state, *inputs).compile(), step.mesh


def memory_rows(compiled, hbm: int | None) -> list[tuple[str, str]]:
    m = compiled.memory_analysis()
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"  # noqa: E731
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes \
        + m.generated_code_size_in_bytes
    rows = [("arguments (state + batch)", gib(m.argument_size_in_bytes)),
            ("outputs (new state + metrics)", gib(m.output_size_in_bytes)),
            ("aliased (donated state reused)", gib(m.alias_size_in_bytes)),
            ("temporaries", gib(m.temp_size_in_bytes)),
            ("generated code", gib(m.generated_code_size_in_bytes)),
            ("total (arguments + outputs - aliased + temporaries + code)", gib(peak))]
    if hbm is None:
        rows.append(("device memory", "host RAM (CPU devices share it)"))
    else:
        verdict = "fits" if peak <= hbm else "DOES NOT FIT"
        rows.append(("device HBM", f"{gib(hbm)}: {verdict} ({peak / hbm:.0%})"))
    return rows


def cmd_compile(args) -> int:
    from lmu_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    devices, label, hbm = topology_devices(args.topology)
    compiled, mesh = compile_train_step(cfg, devices)
    print(f"compiled the train step of {cfg.model.family} for {label}, mesh {dict(mesh.shape)}; per device:")
    rows = memory_rows(compiled, hbm)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0
