"""CLI: `lmu-jax compile --config FILE --topology NAME`: does the train step fit? Compiled ahead of time.

    lmu-jax compile --config c.yaml --topology v5e-256     # a TPU slice (needs libtpu: the tpu extra)
    lmu-jax compile --config c.yaml --topology cpu-8       # 8 fake CPU devices, compiled for real here

The trainer's own train step (its jit, shardings and donated state: the run's ``Program``,
lmu_jax/train/builder.py) is lowered for the topology's devices with abstract inputs and compiled by XLA, without running it and
without the hardware. ``memory_analysis()`` of the compiled program gives per-device bytes: arguments
(state + batch), outputs (the new state, aliased to the donated arguments), temporaries and generated
code; their peak is compared with the device's HBM, and a program that does not fit is refused (exit 2,
one line naming the knobs that shrink it; XLA's TPU compiler itself refuses a program whose temporaries
alone exceed the HBM, and its count is then the one quoted). ``cost_analysis()`` gives the FLOPs and HBM bytes XLA counts
per device; with the chip's published peak they make a roofline estimate of the step time and MFU.

TPU topologies come from ``jax.experimental.topologies.get_topology_desc`` (chip grids as MaxText
names them: ``v5e:16x16``, ``v4:2x2x4``), which needs libtpu. The program is traced for the TPU
(``lmu_jax.ops.memory.compiling_for``): kernels chosen by platform (the LMU memory's ``auto``, the
attention) are the TPU's, not this host's. Where the installed JAX cannot describe
the topology (no libtpu here), the command says so in one line, exit code 2, and names the nearest it
can compile for: ``cpu-N``, as many fake CPU devices, which XLA's CPU compiler really compiles (the
memory figures are then the CPU compiler's: the shapes and shardings are the pod's, the fusion and
layouts are not). The vocabulary is the tokenizer's configured size (bytes: 258); no data is read.
"""

from __future__ import annotations

import math
import os
import re

from lmu_jax.errors import UserError, bad_value
from lmu_jax.train.memory_check import peak_bytes

# Per chip (one JAX device = one chip; a v4/v5p megacore chip is one device): HBM GiB and HBM bandwidth,
# bytes/s, as Google Cloud's TPU pages publish them (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
# Peak bf16 FLOP/s come from lmu_jax.metrics.PEAK_FLOPS (the same pages: 275, 197, 459, 918 TFLOP/s).
CHIPS = {"v4": (32, 1200e9), "v5e": (16, 819e9), "v5p": (95, 2765e9), "v6e": (32, 1640e9)}
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


def _quiet_libtpu(spec) -> None:
    """Environment for loading libtpu on a host with no TPU chips, before it loads: JAX's own devices
    stay on the CPU (this command runs nothing), several compiling processes may load libtpu at once
    (its lockfile guards chips, and there are none here), and it is told the slice it would otherwise
    look up in the TPU VM metadata server and complain on stderr that it cannot."""
    import jax
    from jax._src import hardware_utils

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", spec.accelerator_type)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def tpu_devices(spec):
    """The topology's abstract devices (raises when JAX cannot describe it, e.g. without libtpu)."""
    from jax.experimental import topologies

    _quiet_libtpu(spec)
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
    """(devices, label, chip generation or None for CPU devices)."""
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
    return devices, f"{spec.accelerator_type}: {spec.chips} chips", spec.generation


def lower_train_step(cfg, devices):
    """(the train step of ``cfg`` on a mesh of ``devices`` lowered for abstract inputs, its program)."""
    from lmu_jax.sharding import make_mesh
    from lmu_jax.train.builder import Program

    program = Program(cfg, make_mesh(cfg.mesh, devices))  # the `auto` settings resolved for the target
    return program.lower_train_step(), program


class DoesNotFit(UserError):
    """The train step needs more memory per device than the chip has; names the knobs that shrink it."""

    def __init__(self, cfg, need: float, have: float, chip: str, source: str = ""):
        self.need, self.have = need, have
        knobs = ["raise mesh.fsdp (shards parameters and optimizer state)",
                 f"raise train.microbatches (now {cfg.train.microbatches}; smaller activations per pass)"]
        if getattr(cfg.model, "remat", None) is False:
            knobs.append("set model.remat=true (recompute instead of storing)")
        super().__init__(f"the train step of {cfg.model.family} needs {need / 2**30:.2f} GiB per device{source}, "
                         f"a {chip} chip has {have / 2**30:.2f} GiB: {'; '.join(knobs)}")


# XLA's TPU compiler refuses a program whose temporaries alone exceed the chip's HBM, e.g.
# "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (55.21G)
# exceeds available HBM (15.75G)"
_XLA_OUT_OF_MEMORY = re.compile(r"Ran out of memory.*?required for ([\w ]+?) \(([\d.]+)([KMGT])\) exceeds available "
                                r"\w+ \(([\d.]+)([KMGT])\)")


def compile_train_step(cfg, devices):
    """(the compiled train step of ``cfg`` on a mesh of ``devices``, its program); DoesNotFit where XLA
    refuses it for want of device memory."""
    lowered, program = lower_train_step(cfg, devices)
    try:
        return lowered.compile(), program
    except Exception as err:  # jax.errors.JaxRuntimeError; only an out-of-memory refusal is the user's
        found = _XLA_OUT_OF_MEMORY.search(str(err))
        if not found:
            raise
        need, need_unit, have, have_unit = found.group(2, 3, 4, 5)
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        raise DoesNotFit(program.cfg, float(need) * scale[need_unit], float(have) * scale[have_unit],
                         devices[0].device_kind, f" (XLA's count of its {found.group(1)} alone)") from None


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def memory_rows(compiled, generation: str | None) -> list[tuple[str, str]]:
    m = compiled.memory_analysis()
    peak = peak_bytes(compiled)
    rows = [("arguments (state + batch)", _size(m.argument_size_in_bytes)),
            ("outputs (new state + metrics)", _size(m.output_size_in_bytes)),
            ("aliased (donated state reused)", _size(m.alias_size_in_bytes)),
            ("temporaries", _size(m.temp_size_in_bytes)),
            ("generated code", _size(m.generated_code_size_in_bytes)),
            ("total (arguments + outputs - aliased + temporaries + code)", _size(peak))]
    if generation is None:
        rows.append(("device memory", "host RAM (CPU devices share it)"))
    else:
        hbm = CHIPS[generation][0] * 2**30
        rows.append(("device HBM", f"{_size(hbm)}: {'fits' if peak <= hbm else 'DOES NOT FIT'} ({peak / hbm:.0%})"))
    return rows


def roofline(compiled, devices, generation: str, model_flops: float) -> dict:
    """XLA's per-device cost of one step against the chip's published peaks (an estimate, not a
    measurement): time = max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth); MFU = the model's
    analytic FLOPs per device over that time at peak. XLA counts a while loop's body once whatever
    its trip count, so a program with loops (scans) is flagged: its counts are then lower bounds."""
    from lmu_jax.metrics import peak_flops_total

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    peak, _ = peak_flops_total(devices[:1])
    bandwidth = CHIPS[generation][1]
    seconds = max(flops / peak, nbytes / bandwidth)
    return {"flops": flops, "bytes": nbytes, "peak_flops": peak, "hbm_bandwidth": bandwidth,
            "seconds": seconds, "bound": "compute" if flops / peak >= nbytes / bandwidth else "memory",
            "mfu": model_flops / len(devices) / peak / seconds if seconds else float("nan"),
            "loops": " while(" in compiled.as_text()}


def roofline_rows(est: dict, chip: str) -> list[tuple[str, str]]:
    lower = " (a lower bound: XLA counts a loop body once)" if est["loops"] else ""
    return [("XLA cost: FLOPs per device", f"{est['flops']:.3e}{lower}"),
            ("XLA cost: HBM bytes accessed per device", f"{est['bytes']:.3e}{lower}"),
            (f"{chip} peak (published)", f"{est['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
                                         f"{est['hbm_bandwidth'] / 1e9:.0f} GB/s HBM"),
            ("roofline step time (estimate)", f"{est['seconds'] * 1e3:.2f} ms, {est['bound']}-bound"),
            ("implied MFU (estimate, analytic FLOPs)", f"{est['mfu']:.1%}")]


def check_fits(cfg, compiled, generation: str, chip: str) -> None:
    """DoesNotFit (exit 2) when the compiled step needs more than the chip's HBM."""
    need, have = peak_bytes(compiled), CHIPS[generation][0] * 2**30
    if need > have:
        raise DoesNotFit(cfg, need, have, chip)


def cmd_compile(args) -> int:
    from lmu_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    devices, label, generation = topology_devices(args.topology)
    compiled, program = compile_train_step(cfg, devices)
    print(f"compiled the train step of {cfg.model.family} for {label}, mesh {dict(program.mesh.shape)}; per device:")
    rows = memory_rows(compiled, generation)
    if generation is not None:
        model_flops = program.tokens_per_step * program.flops_per_token
        rows += roofline_rows(roofline(compiled, devices, generation, model_flops), devices[0].device_kind)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if generation is not None:
        check_fits(program.cfg, compiled, generation, devices[0].device_kind)  # the `auto` settings resolved
    return 0
