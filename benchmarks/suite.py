"""`lmu-jax bench`: the hardware ceiling and every family's training speed, measured in one process.

    lmu-jax bench [--quick] [--families transformer,lstm,lmu,lmu_attn] [--out benchmarks/results]

Sections of the result (``benchmarks/results/<platform>.json`` and ``.md``):

1. ``ceiling``: a large matmul in float32 and bfloat16 (GFLOP/s) and a large copy (GB/s) on the
   device the benchmark runs on. They are the denominators: MFU = model FLOP/s / matmul ceiling in the
   compute dtype (float32 on CPU, bfloat16 elsewhere). Measured at the start and again at the end; the
   higher one is used, so a shared machine's load cannot flatter the MFU.
   Beside them, the models' own FFN matmul, (tokens x d) @ (d x 4d) at each width: the share of the
   ceiling that XLA's kernel reaches at those shapes bounds the MFU of a step made of such matmuls.
2. ``train``: the run's program (lmu_jax/train/builder.py, what the Trainer trains with) builds each
   model, its shardings and its jitted, donating train step on one device; we compile that very step
   (``.lower().compile()``) and time it on batches from the Trainer's own input pipeline. MFU uses the
   analytic FLOPs of lmu_jax/flops.py.
   ``loop``: the whole ``Trainer.train()`` (input pipeline, delayed metrics, JSONL) for a few steps;
   its per-step wall times are the loop's own ``step_time`` records, compared with the bare step.
3. ``scaling``: step time and peak memory (XLA's ``compiled.memory_analysis()``) at sequence lengths
   n = 512 ... 16384 with a fixed number of tokens per batch, and log-log slopes (``np.polyfit``).
   At fixed tokens per batch an O(n)-per-sequence model has a flat step time (slope 0); the goals
   speak of cost per sequence, whose slope is the step slope + 1 (batch = tokens / n). Both are given.
4. ``lmu_memory``: benchmarks/lmu_memory.py (every memory kernel, what impl="auto" picks).
5. ``sharding``: the same model and global batch in a fresh process with 1 device and with 8 fake
   devices (``--xla_force_host_platform_device_count`` is fixed when JAX starts, hence subprocesses),
   and the fraction of device time in collectives read from a ``jax.profiler`` trace.

A point that cannot run (out of memory, ...) is recorded with its error, never skipped silently.
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import write_json_and_markdown
from lmu_jax.flops import xla_flops
from lmu_jax.models import get_family
from lmu_jax.ops import MEMORY_IMPLS

FAMILIES = ("transformer", "lstm", "lmu", "lmu_attn")
SECTIONS = ("train", "loop", "scaling", "sharding", "lmu_memory")  # the whole run; the ceiling always runs
OPTIONAL_SECTIONS = ("peers",)  # PyTorch peers (benchmarks/peers.py): only when asked for (`--peers`)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

# The grids. Train sizes: d_model per family at n_layers layers, at each number of tokens per step (the
# same for every family, so that every family sees the same matmul row count): 1024, and 8192 (32
# sequences of 256), the batch a recurrence needs to keep the cores busy (its per-step matmuls have
# batch rows). Profiled: the point whose trace says where the time goes. Scaling: one small model per family (so the
# transformer's n^2 attention still fits at n = 16384), tokens per batch = the largest n. Widths 256-1024:
# the goals speak of d_model >= 256, and a 1-layer model's MFU grows with width (its matmuls grow as d^2,
# its memory-bound passes as d). Microbatch tokens: a step with more tokens than this runs a second time
# as gradient accumulation (train.microbatches) over microbatches of this many tokens (at least one
# sequence): the same update, while one microbatch's activations (d 1024: 2 MiB per layer input, 8 MiB
# of FFN hidden) stay in a CPU's last-level cache (32 MiB here) instead of streaming through DRAM.
# Only for the families the trainer accumulates on CPU (Family.cpu_microbatches): not the LSTM, whose
# recurrent matmuls have one row per sequence of a microbatch, and 2 rows starve them (d 1024, n 256,
# 8192 tokens in 16 microbatches: 7.1 s a step against 2.2 s in one).
FULL = {
    "ceiling_size": 2048, "copy_mib": 512,
    "d_models": (256, 512, 1024), "n_layers": 1, "seq_lens": (256, 1024), "tokens_per_step": (1024, 8192),
    "microbatch_tokens": 512,
    "profile": {"d_model": 1024, "seq_len": 256, "tokens": 8192},
    "min_steps": 2, "budget_s": 1.0,
    "loop_steps": 123, "loop": {"d_model": 128, "seq_len": 256, "tokens": 1024},
    # 16384 tokens per batch (one sequence at n = 16384); fitted over 1k-16k
    "scaling_lens": (512, 1024, 2048, 4096, 8192, 16384), "scaling_tokens": 16384,
    "scaling_model": {"d_model": 64, "n_layers": 1}, "fit_from": 1024,
    # the bench's LMUs run order 64; orders 16 and 256 (minutes at n = 16384) stay in lmu_memory.py's own
    # full run (lmu_memory_cpu.md)
    # every LMU memory kernel at the LMU's fastest CPU settings: the widest model, accumulated over
    # microbatches, remat off
    "lmu_impls_at": {"d_model": 1024, "seq_len": 256, "tokens": 8192},
    "lmu_memory_grid": {"lengths": (256, 1024, 4096), "orders": (64,)},
    "sharding": {"d_model": 128, "n_layers": 2, "seq_len": 256, "batch_size": 16},
    "max_bytes": 1_000_000,
    # the PyTorch peers at issue 17's shapes: batch 16 x 256 tokens, our default settings otherwise
    "peers": {"d_models": (256, 512, 1024), "n_layers": {"transformer": 4, "lstm": 2}, "seq_len": 256,
              "batch_size": 16, "rounds": 3},
}
QUICK = {
    "ceiling_size": 1024, "copy_mib": 64,
    "d_models": (64,), "n_layers": 1, "seq_lens": (128,), "tokens_per_step": (1024,), "microbatch_tokens": 256,
    "profile": {"d_model": 64, "seq_len": 128, "tokens": 1024},
    "min_steps": 2, "budget_s": 0.05,
    "loop_steps": 4, "loop": {"d_model": 64, "seq_len": 128, "tokens": 1024},
    "scaling_lens": (256, 1024), "scaling_tokens": 1024,
    "scaling_model": {"d_model": 64, "n_layers": 1}, "fit_from": 256,
    "lmu_impls_at": None, "lmu_memory_grid": {"lengths": (256,), "orders": (16,)},
    "sharding": {"d_model": 64, "n_layers": 1, "seq_len": 64, "batch_size": 8},
    "max_bytes": 300_000,
    "peers": {"d_models": (64,), "n_layers": {"transformer": 1, "lstm": 1}, "seq_len": 64, "batch_size": 4,
              "rounds": 2},
}
# A scaling point whose compiled step would need more than this fraction of the host's memory is not
# run (XLA:CPU materialises the transformer's n x n attention scores): recorded as skipped, with the
# bytes XLA asked for.
MAX_MEMORY_FRACTION = 0.4


# --- 1. the ceiling ----------------------------------------------------------------------------------


def best_time(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up, in seconds (a jax result is waited for; a torch
    CPU result is ready when returned)."""
    jax.block_until_ready(fn(*args))  # compile + warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(rows: int, inner: int, cols: int, dtype, device, repeats: int, transposed: bool = False) -> float:
    """Best-of-`repeats` GFLOP/s of a (rows x inner) @ (inner x cols) matmul in `dtype` on `device`; with
    `transposed`, the right operand is stored (cols x inner) and used transposed (as a backward pass
    multiplies by a weight's transpose)."""
    rng = np.random.default_rng(0)
    x, w = (jax.device_put(jnp.asarray(rng.standard_normal(shape), dtype), device)
            for shape in ((rows, inner), (cols, inner) if transposed else (inner, cols)))
    matmul = jax.jit((lambda a, b: a @ b.T) if transposed else jnp.matmul)
    return 2.0 * rows * inner * cols / best_time(matmul, x, w, repeats=repeats) / 1e9


def measure_ceiling(size: int, copy_mib: int, device) -> dict:
    """Best-of-5 matmul GFLOP/s (float32, bfloat16) and copy GB/s (read + write) on `device`."""
    out = {"matmul_size": size}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        out[f"matmul_{name}_gflops"] = matmul_gflops(size, size, size, dtype, device, repeats=5)
    x = jax.device_put(jnp.ones((copy_mib * 2**20 // 4,), jnp.float32), device)
    seconds = best_time(jax.jit(lambda v: v + 1.0), x, repeats=5)  # +1 so XLA cannot elide the copy
    out["copy_gb_per_s"] = 2.0 * x.nbytes / seconds / 1e9
    out["copy_mib"] = copy_mib
    return out


def measure_model_matmuls(row_counts, d_models, dtype: str, device) -> list[dict]:
    """Best-of-3 GFLOP/s of the FFN's up-projection, a (rows x d) @ (d x 4d) matmul in the compute
    dtype, at each row count (a step's or a microbatch's tokens) and width: how fast XLA runs a matmul
    of the models' own shapes here, an upper bound on the MFU of a step whose FLOPs are such matmuls
    (the square ceiling is the denominator of every MFU)."""
    return [{"rows": rows, "d_model": d, "dtype": dtype, "gflops": matmul_gflops(rows, d, 4 * d, dtype, device, 3)}
            for rows in row_counts for d in d_models]


# --- 2. train steps through the Trainer ---------------------------------------------------------------


def model_section(family: str, d_model: int, n_layers: int, dtype: str, **extra) -> dict:
    """A model config of `family` at width d_model: heads of width 64 (at least 2), order 64 LMU memory."""
    model = {"family": family, "d_model": d_model, "n_layers": n_layers, "dtype": dtype}
    if family in ("transformer", "lmu_attn"):
        model["n_heads"] = max(2, d_model // 64)
    if family in ("lmu", "lmu_attn"):
        model["order"] = 64
    model.update(extra)
    return model


def run_config(model: dict, seq_len: int, batch_size: int, cache_dir: str, max_bytes: int, steps: int = 1000,
               microbatches: int = 1):
    from lmu_jax.config import config_from_dict

    return config_from_dict({
        "model": model,
        "data": {"corpus": "kjv", "seq_len": seq_len, "cache_dir": cache_dir, "max_bytes": max_bytes,
                 "val_windows": 2},
        "optim": {"warmup_steps": 1},
        "train": {"steps": steps, "batch_size": batch_size, "microbatches": microbatches, "eval_every": 0},
        "eval": {"max_tokens": 4 * seq_len},  # the loop's final whole-split eval stays short
        "checkpoint": {"every": 0, "keep": 1, "async_save": False},
        "log": {"tensorboard": False, "progress": False},
    })


def compute_dtype() -> str:
    """float32 on CPU (its bf16 matmul is emulated and slower), bfloat16 on accelerators."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def peak_bytes(compiled) -> int:
    """Peak device memory of one call from XLA's buffer assignment: arguments + outputs (less what is
    donated into them) + temporaries. (``peak_memory_in_bytes`` reads about the arguments alone on
    XLA:CPU, jax 0.10, whatever the activations.)"""
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def time_train_step(cfg, devices, *, min_steps: int, budget_s: float, max_memory: int | None = None,
                    trace_dir: Path | None = None, analyse=None) -> dict:
    """Compile the Trainer's jitted train step for `cfg` on `devices` and time it (median seconds).

    The step is the run's program (lmu_jax/train/builder.py), the batches come from the Trainer's own
    input pipeline, made before timing (the bare step); the state is donated step to step as in
    training. With `trace_dir`, two more steps run under jax.profiler and the point gets
    ``analyse(trace_dir, compiled module text)`` (default ``op_breakdown``) and ``trace_dir``, for further
    reading of the same trace.
    """
    from lmu_jax.train.loop import StepInputs, open_program

    program, cache = open_program(cfg, devices)
    state = program.init_state()
    inputs = StepInputs(program, cache)
    batches = [inputs(i) for i in range(4)]
    started = time.perf_counter()
    compiled = program.train_step.lower(state, *batches[0]).compile()
    hlo_text = compiled.as_text()
    point = {"compile_s": time.perf_counter() - started, "peak_bytes": peak_bytes(compiled),
             "tokens_per_step": program.tokens_per_step, "flops_per_token": program.flops_per_token,
             "microbatches": program.cfg.train.microbatches,
             "params": program.counts["total"], "params_non_embedding": program.counts["non_embedding"]}
    # XLA's count includes remat's recomputation, where the MFU credits the model's analytic FLOPs only; a
    # program with a loop gets none: XLA counts a while body once, whatever its trip count (the LSTM's scan)
    executed = None if " while(" in hlo_text else xla_flops(compiled)
    point["xla_over_model_flops"] = None if executed is None else \
        executed / (program.flops_per_token * program.tokens_per_step)
    if max_memory is not None and point["peak_bytes"] > max_memory:
        point["skipped"] = f"needs {point['peak_bytes'] / 2**30:.1f} GiB > {max_memory / 2**30:.1f} GiB allowed"
        return point
    state, _ = compiled(state, *batches[0])  # warm-up: first-touch allocations
    jax.block_until_ready(state)
    times, spent = [], 0.0
    while len(times) < min_steps or (spent < budget_s and len(times) < 20):
        start = time.perf_counter()
        state, metrics = compiled(state, *batches[(len(times) + 1) % len(batches)])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        spent += times[-1]
    point.update(step_s=statistics.median(times), min_step_s=min(times), steps_timed=len(times),
                 loss=float(metrics["loss"]))
    point["tokens_per_s"] = program.tokens_per_step / point["step_s"]
    point["model_flops_per_s"] = point["tokens_per_s"] * program.flops_per_token
    if trace_dir is not None:
        trace_steps(compiled, state, batches[0], trace_dir)
        point.update((analyse or op_breakdown)(trace_dir, hlo_text), trace_dir=str(trace_dir))
    return point


def bare_step_intervals(trainer, steps: int) -> list[float]:
    """Seconds per step of the Trainer's jitted step alone, on prepared batches, timed like the loop
    times itself: one step's metrics reach the host while the next step is already dispatched, and a
    step's time is the interval between two such arrivals."""
    program = trainer.program
    state = program.init_state()
    batches = [trainer.inputs(i) for i in range(4)]
    state, pending = program.train_step(state, *batches[0])  # compile (shared with the loop), warm-up
    intervals, last = [], None
    for i in range(1, steps + 2):
        state, metrics = program.train_step(state, *batches[i % len(batches)])
        jax.device_get(pending)
        now = time.perf_counter()
        if last is not None:
            intervals.append(now - last)
        last, pending = now, metrics
    jax.device_get(pending)
    return intervals


def time_loop(cfg, work_dir: Path, devices) -> dict:
    """The whole loop against the bare step, under the same load, two samples a side.

    Loop: ``Trainer.train()`` for cfg.train.steps steps, its own per-step ``step_time`` records less the
    first two (compile, warm-up) and the last (it waits for the final checkpoint). Bare: the same
    number of steps of the very jitted step the loop calls (``bare_step_intervals``). The order is bare,
    loop, bare, loop (a second Trainer in its own run directory), so load that comes and goes falls on
    both sides alike; each side is the faster of its two medians. (One loop run against the faster of
    two bare runs made a steady loop look 3-6 % slower on a noisy host than the same loop measured
    twice: a best-of-two is lower than a single draw of the same thing.)
    """
    from lmu_jax.train.loop import Trainer

    timed = cfg.train.steps - 3
    first = Trainer(cfg, work_dir / "loop_run", devices=devices)
    bare, loop = [], []

    def train(trainer):
        trainer.train()
        records = [json.loads(line) for line in (trainer.run.path / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time"] for r in records if r["kind"] == "train"][2:-1]
        loop.append((statistics.median(times), statistics.fmean(times), len(times)))

    bare.append(statistics.median(bare_step_intervals(first, timed)))
    train(first)
    bare.append(statistics.median(bare_step_intervals(first, timed)))
    train(Trainer(cfg, work_dir / "loop_run_2", devices=devices))
    (step_s, mean_s, count), bare_s = min(loop), min(bare)
    return {"step_s": step_s, "mean_step_s": mean_s, "steps_timed": count,
            "tokens_per_s": first.program.tokens_per_step / step_s, "bare_step_s": bare_s,
            "bare_runs_s": bare, "loop_runs_s": [median for median, _, _ in loop],
            "loop_over_bare": step_s / bare_s}


def _run_point(label: str, fn, *args, **kwargs) -> dict:
    """fn(*args) as a result point; an exception is recorded on the point (the bench goes on)."""
    try:
        point = fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - an infeasible point is recorded, not hidden
        point = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
    jax.clear_caches()
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in point.items()
             if k in ("step_s", "bare_step_s", "loop_over_bare", "peak_bytes", "skipped", "error")}
    print(f"  {label}: {shown}", flush=True)
    return point


# --- PyTorch peers ---------------------------------------------------------------------------------


def run_peers(grid: dict, families, device, max_bytes: int, compile_: bool = False) -> dict:
    """Our train step at our default settings against its PyTorch peer (benchmarks/peers.py), eager and
    with `compile_` also torch.compile'd, at each width, interleaved in this process: ours / theirs is
    the time ratio (< 1: ours is faster)."""
    from benchmarks import peers
    from lmu_jax.config import TrainConfig

    chosen = [f for f in peers.PEER_FAMILIES if f in families]
    missing = peers.torch_available()
    if missing:
        print(f"peers: not run: {missing}", flush=True)
        return {"skipped": missing, "points": []}
    import torch

    points = []
    with tempfile.TemporaryDirectory(prefix="lmu_jax_peers_") as tmp:
        for family in chosen:
            for d_model in grid["d_models"]:
                extra = {"positions": "learned"} if family == "transformer" else {}
                model = model_section(family, d_model, grid["n_layers"][family], "float32", **extra)
                cfg = run_config(model, grid["seq_len"], grid["batch_size"], str(Path(tmp) / "data_cache"),
                                 max_bytes, microbatches=TrainConfig().microbatches)
                point = _run_point(f"peers {family} d={d_model}", peers.compare, cfg, [device],
                                   rounds=grid["rounds"], compile_=compile_)
                points.append({"family": family, "d_model": d_model, "n_layers": model["n_layers"],
                               "n_heads": model.get("n_heads"), "seq_len": grid["seq_len"],
                               "batch_size": grid["batch_size"], **point})
                shown = {k: round(v, 3) for k, v in point.items() if k.endswith("step_s") or k.startswith("ours_over")}
                print(f"    {shown}", flush=True)
    return {"torch_version": torch.__version__, "points": points}


# --- 3. sequence-length scaling -------------------------------------------------------------------


def loglog_slope(xs, ys) -> float | None:
    """Slope of log y against log x (least squares), or None with fewer than two points."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log(np.array(pairs, dtype=float)).T
    return float(np.polyfit(x, y, 1)[0])


def scaling_slopes(points: list[dict], fit_from: int) -> dict:
    """Per-step slopes at fixed tokens per batch, and per-sequence slopes (+1: batch = tokens / n)."""
    used = [p for p in points if p["n"] >= fit_from and "step_s" in p]
    ns = [p["n"] for p in used]
    step = loglog_slope(ns, [p["step_s"] for p in used])
    memory = loglog_slope(ns, [p["peak_bytes"] for p in used])
    return {"fit_n": [min(ns), max(ns)] if ns else None, "points_fitted": len(used),
            "step_time_per_batch": step, "peak_memory_per_batch": memory,
            "step_time_per_sequence": None if step is None else step + 1.0,
            "peak_memory_per_sequence": None if memory is None else memory + 1.0}


# --- 5. sharding overhead (subprocesses) --------------------------------------------------------


def op_kind(op: str) -> str:
    """An HLO instruction's kind: its name less the ".N" suffix ("ynn_fusion.46" -> "ynn_fusion")."""
    stem, _, suffix = op.rpartition(".")
    return stem if stem and suffix.isdigit() else op


def hlo_op_events(trace_dir: Path):
    """(HLO instruction, start ns, duration ns) of every executed XLA op in the newest ``jax.profiler`` trace
    under trace_dir: each is an event carrying an ``hlo_op`` stat (an op in a loop body is one event per
    iteration; a ``while`` event does not include its body's)."""
    from jax.profiler import ProfileData

    files = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    for plane in ProfileData.from_file(str(files[-1])).planes if files else ():
        for line in plane.lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op is not None:
                    yield str(op), event.start_ns, event.duration_ns


def instruction_totals(op_events) -> dict[str, list]:
    """[device time (ns), executions] per HLO instruction ("ynn_fusion.46", "all-reduce.2", ...) of
    hlo_op_events' (instruction, start, duration) events."""
    events: dict[str, list] = {}
    for op, _, duration in op_events:
        entry = events.setdefault(op, [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    return events


def instruction_events(trace_dir: Path) -> dict[str, list]:
    """instruction_totals of the newest trace under trace_dir."""
    return instruction_totals(hlo_op_events(trace_dir))


def op_times(events: dict[str, list]) -> dict[str, float]:
    """Device time (ns) per XLA op kind ("dot", "ynn_fusion", "all-reduce", ...) of instruction_events."""
    totals: dict[str, float] = {}
    for op, (ns, _) in events.items():
        totals[op_kind(op)] = totals.get(op_kind(op), 0.0) + ns
    return totals


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\S+?)\((.*)$")


def dot_instructions(hlo_text: str) -> dict[str, tuple[float, str]]:
    """(FLOPs of one execution, signature) of every HLO instruction that is, or is a fusion of, dot
    products, read from the compiled module's text (``compiled.as_text()``), whose instruction names are
    the trace's ``hlo_op``s. FLOPs: 2 x output elements x contracted size per dot, summed over a fusion's
    body. Signature: operand and output shapes, contracting dims lhs/rhs and batch dims, e.g.
    ``f32[512,256] x f32[1024,256] -> f32[512,1024], contract 1/1`` (the rhs contracted on its last dim:
    a matmul against a transposed weight); a fusion's dots joined by "; "."""
    dims, types, dots, calls, computation = {}, {}, {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if header:
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, dtype, shape, opcode, rest = m.groups()
        dims[name], types[name] = [int(d) for d in shape.split(",") if d], f"{dtype}[{shape}]"
        if opcode == "dot":
            lhs, rhs = re.match(r"%([\w.\-]+), %([\w.\-]+)\)", rest).groups()
            lhs_c, rhs_c = (re.search(rf"{side}_contracting_dims=\{{([\d,]*)\}}", rest).group(1)
                            for side in ("lhs", "rhs"))
            batch = re.search(r"lhs_batch_dims=\{([\d,]*)\}", rest)
            flops = 2.0 * float(np.prod(dims[name])) * (
                float(np.prod([dims[lhs][int(i)] for i in lhs_c.split(",") if i])) if lhs in dims else 0.0)
            signature = (f"{types.get(lhs, '?')} x {types.get(rhs, '?')} -> {types[name]}, contract {lhs_c}/{rhs_c}"
                         + (f", batch {batch.group(1)}" if batch else ""))
            dots.setdefault(computation, []).append((name, flops, signature))
        called = re.search(r"calls=%([^,\s]+)", rest)
        if called:
            calls[name] = called.group(1)
    out = {name: (sum(f for _, f, _ in dots[c]), "; ".join(s for _, _, s in dots[c]))
           for name, c in calls.items() if c in dots}  # fusions
    fused = set(calls.values())
    out.update({name: (f, s) for c, ds in dots.items() if c not in fused for name, f, s in ds})  # plain dots
    return out


def dot_flops_per_instruction(hlo_text: str) -> dict[str, float]:
    """FLOPs of one execution of every dot or fusion of dots (``dot_instructions``)."""
    return {name: flops for name, (flops, _) in dot_instructions(hlo_text).items() if flops}


def matmul_summary(hlo_text: str, events: dict[str, list]) -> dict:
    """How much of the traced op time (instruction_events) the dot products take and how fast they run:
    the two factors of the MFU (MFU ~ matmul share x matmul GFLOP/s / ceiling, where a model's FLOPs are
    its matmuls)."""
    flops = dot_flops_per_instruction(hlo_text)
    total = sum(ns for ns, _ in events.values())
    matmuls = [(ns, n * flops[op]) for op, (ns, n) in events.items() if op in flops]
    matmul_ns = sum(ns for ns, _ in matmuls)
    if not total or not matmul_ns:
        return {}
    return {"matmul_time_share": matmul_ns / total, "matmul_gflops": sum(f for _, f in matmuls) / matmul_ns}


def trace_steps(compiled, state, inputs, trace_dir: Path, steps: int = 2):
    """Run `steps` steps under ``jax.profiler.trace``; returns the state (donated step to step)."""
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(steps):
            state, _ = compiled(state, *inputs)
        jax.block_until_ready(state)
    return state


def op_breakdown(trace_dir: Path, hlo_text: str | None = None, top: int = 6) -> dict:
    """The op kinds that take the most device time, as shares of all op time (where time goes); with the
    compiled module's text, also the dot products' share of op time and their speed (matmul_summary)."""
    events = instruction_events(trace_dir)
    totals = op_times(events)
    total = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    if not total:
        return {}
    return {"op_time_ms": total / 1e6, "top_ops": {k: v / total for k, v in ranked},
            **(matmul_summary(hlo_text, events) if hlo_text else {})}


def collective_fraction(trace_dir: Path) -> dict:
    """Share of the XLA ops' device time spent in collectives, from a jax.profiler trace. On fake CPU
    devices that share the cores a collective's time includes waiting at its rendezvous for the slowest
    device, so this is the time the devices are held up by collectives."""
    totals = op_times(instruction_events(trace_dir))
    total = sum(totals.values())
    if not total:
        return {"collective_fraction": None, "note": "the trace holds no HLO op events"}
    collective = sum(v for k, v in totals.items() if k.startswith(COLLECTIVES))
    return {"collective_fraction": collective / total, "op_time_ms": total / 1e6, "collective_time_ms": collective / 1e6}


def sharding_worker(spec: dict) -> dict:
    """Inside a fresh process: time the spec's model on all of this process's devices, then trace a
    few steps and measure the collectives."""
    work_dir = Path(spec["work_dir"])
    model = model_section(spec["family"], spec["d_model"], spec["n_layers"], compute_dtype())
    cfg = run_config(model, spec["seq_len"], spec["batch_size"], spec["cache_dir"], spec["max_bytes"])
    devices = jax.devices()
    point = time_train_step(cfg, devices, min_steps=spec["min_steps"], budget_s=spec["budget_s"],
                            trace_dir=work_dir / "trace" if len(devices) > 1 else None)
    point["devices"] = len(devices)
    if len(devices) > 1:
        point.update(collective_fraction(Path(point.pop("trace_dir"))))
    return point


def run_sharding_worker(spec: dict, devices: int, timeout_s: float = 900) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--sharding-worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"devices": devices, "error": f"worker exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1][len("RESULT "):])


# --- the whole benchmark ------------------------------------------------------------------------


def run(quick: bool = False, families=FAMILIES, sections=SECTIONS, peers_compile: bool = False) -> dict:
    """The ceiling and the chosen sections, in this process (sharding: in two child processes); a
    JSON-ready dict. `peers_compile`: the peers section also times torch.compile'd peers."""
    from benchmarks import lmu_memory

    grid = QUICK if quick else FULL
    started, load_start = time.time(), os.getloadavg()
    device = jax.devices()[0]
    dtype = compute_dtype()
    ceiling_start = measure_ceiling(grid["ceiling_size"], grid["copy_mib"], device)
    print(f"ceiling: {ceiling_start}", flush=True)
    row_counts = (max(grid["tokens_per_step"]), grid["microbatch_tokens"])
    if "peers" in sections:  # and the rows of the LSTM's per-time-step matmul (its batch)
        row_counts += (grid["peers"]["batch_size"],)
    model_matmuls = measure_model_matmuls(row_counts, grid["d_models"], dtype, device)
    if "peers" in sections and dtype == "float32":
        from benchmarks import peers

        if peers.torch_available() is None:  # the same shapes in PyTorch's dot library, beside XLA's
            for m in model_matmuls:
                m["torch_gflops"] = peers.torch_matmul_gflops(m["rows"], m["d_model"], 4 * m["d_model"])
    print(f"model-shape matmuls: {model_matmuls}", flush=True)
    seconds = {"ceiling": time.time() - started}  # per section, to size the grids
    results = {"platform": jax.default_backend(), "device": str(device.device_kind), "jax_version": jax.__version__,
               "host": {"cpus": os.cpu_count(), "machine": host_platform.machine(),
                        "memory_gib": round(host_memory_bytes() / 2**30, 1)},
               "quick": quick, "compute_dtype": dtype, "families": list(families), "sections": list(sections),
               "grid": grid}

    with tempfile.TemporaryDirectory(prefix="lmu_jax_bench_") as tmp:
        tmp = Path(tmp)
        cache = str(tmp / "data_cache")

        def config(family, d_model, seq_len, tokens, n_layers, steps=1000, microbatches=1, **extra):
            model = model_section(family, d_model, n_layers, dtype, **extra)
            return run_config(model, seq_len, max(1, tokens // seq_len), cache, grid["max_bytes"], steps,
                              microbatches)

        def point_dir(*parts):
            path = tmp / "_".join(str(p) for p in parts)
            path.mkdir()
            return path

        def accumulated_microbatches(tokens, seq_len):
            return tokens // max(grid["microbatch_tokens"], seq_len)

        timing = {"min_steps": grid["min_steps"], "budget_s": grid["budget_s"]}
        train = []
        for family in families if "train" in sections else ():
            for tokens in grid["tokens_per_step"]:
                for d_model in grid["d_models"]:
                    for seq_len in grid["seq_lens"]:
                        accumulated = accumulated_microbatches(tokens, seq_len) \
                            if get_family(family).cpu_microbatches else 1
                        for microbatches in (1, accumulated) if accumulated > 1 else (1,):
                            cfg = config(family, d_model, seq_len, tokens, grid["n_layers"], microbatches=microbatches)
                            where = point_dir("train", family, d_model, seq_len, tokens, microbatches)
                            profiled = microbatches == 1 and \
                                {"d_model": d_model, "seq_len": seq_len, "tokens": tokens} == grid["profile"]
                            point = _run_point(f"{family} d={d_model} n={seq_len} tokens={tokens} "
                                               f"microbatches={microbatches}", time_train_step, cfg, [device],
                                               trace_dir=where / "trace" if profiled else None, **timing)
                            point.pop("trace_dir", None)  # a temporary directory
                            train.append({"family": family, "d_model": d_model, "n_layers": grid["n_layers"],
                                          "seq_len": seq_len, "microbatches": microbatches,
                                          "memory_impl": "auto" if "lmu" in family else None, **point})
        at = grid["lmu_impls_at"]
        if at and "lmu" in families and "train" in sections:  # every LMU memory kernel inside the real model, for "best impl"
            microbatches = accumulated_microbatches(at["tokens"], at["seq_len"])
            for impl in MEMORY_IMPLS:  # remat off, as model.remat=auto on CPU; the grid's points run impl auto
                cfg = config("lmu", at["d_model"], at["seq_len"], at["tokens"], grid["n_layers"],
                             microbatches=microbatches, memory_impl=impl, remat=False)
                point = _run_point(f"lmu d={at['d_model']} n={at['seq_len']} tokens={at['tokens']} "
                                   f"microbatches={microbatches} impl={impl} remat=off",
                                   time_train_step, cfg, [device], **timing)
                train.append({"family": "lmu", "d_model": at["d_model"], "n_layers": grid["n_layers"],
                              "seq_len": at["seq_len"], "microbatches": microbatches, "memory_impl": impl,
                              "remat": False, **point})
        if "train" in sections:
            results["train"] = train
            seconds["train"] = time.time() - started - sum(seconds.values())

        loop = []
        for family in families if "loop" in sections else ():
            where = grid["loop"]
            cfg = config(family, where["d_model"], where["seq_len"], where["tokens"], grid["n_layers"],
                         steps=grid["loop_steps"])
            point = _run_point(f"{family} loop", time_loop, cfg, point_dir("loop", family), [device])
            loop.append({"family": family, **where, **point})
        if "loop" in sections:
            results["loop"] = loop
            seconds["loop"] = time.time() - started - sum(seconds.values())

        max_memory = int(MAX_MEMORY_FRACTION * host_memory_bytes())
        scaling = {}
        for family in families if "scaling" in sections else ():
            points = []
            for n in grid["scaling_lens"]:
                model = grid["scaling_model"]
                cfg = config(family, model["d_model"], n, grid["scaling_tokens"], model["n_layers"])
                point = _run_point(f"{family} n={n}", time_train_step, cfg, [device],
                                   max_memory=max_memory, **timing)
                points.append({"n": n, "batch_size": grid["scaling_tokens"] // n, **point})
            scaling[family] = {"points": points, "slopes": scaling_slopes(points, grid["fit_from"])}
        if "scaling" in sections:
            results["scaling"] = scaling
            seconds["scaling"] = time.time() - started - sum(seconds.values())

        spec = {**grid["sharding"], "family": "transformer", "cache_dir": cache, "max_bytes": grid["max_bytes"],
                "min_steps": grid["min_steps"], "budget_s": grid["budget_s"]}
        sharding = {}
        for count in (1, 8) if "sharding" in sections else ():
            sharding[str(count)] = run_sharding_worker({**spec, "work_dir": str(point_dir("sharding", count))}, count)
            print(f"  {count} device(s): {sharding[str(count)]}", flush=True)
        if "sharding" in sections:
            one, eight = sharding["1"].get("step_s"), sharding["8"].get("step_s")
            results["sharding"] = {"model": spec, "runs": sharding,
                                   "slowdown_8_vs_1": eight / one if one and eight else None}
            seconds["sharding"] = time.time() - started - sum(seconds.values())

    if "peers" in sections:
        results["peers"] = run_peers(grid["peers"], families, device, grid["max_bytes"], peers_compile)
        seconds["peers"] = time.time() - started - sum(seconds.values())

    if "lmu_memory" in sections:
        print("LMU memory kernels (benchmarks/lmu_memory.py):", flush=True)
        results["lmu_memory"] = lmu_memory.run(quick, budget_s=0.2 if quick else 1.5, grid=grid["lmu_memory_grid"])
        seconds["lmu_memory"] = time.time() - started - sum(seconds.values())

    ceiling_end = measure_ceiling(grid["ceiling_size"], grid["copy_mib"], device)
    results["ceiling"] = {"start": ceiling_start, "end": ceiling_end,
                          **{k: max(ceiling_start[k], ceiling_end[k]) for k in ceiling_start if k.endswith(("gflops", "_s"))}}
    denominator = results["ceiling"][f"matmul_{dtype}_gflops"] * 1e9
    for m in model_matmuls:
        m["of_ceiling"] = m["gflops"] * 1e9 / denominator
    results["ceiling"]["model_matmuls"] = model_matmuls
    for point in [*results.get("train", []), *(p for s in results.get("scaling", {}).values() for p in s["points"])]:
        if "model_flops_per_s" in point:
            point["mfu"] = point["model_flops_per_s"] / denominator
    results["goals"] = check_goals(results)
    results["total_s"] = round(time.time() - started, 1)
    results["section_s"] = {k: round(v, 1) for k, v in seconds.items()}
    results["load_average_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}  # the machine is shared
    return results


# --- goals and the table ---------------------------------------------------------------------------


def _best_mfu(results: dict, family: str, min_d: int = 0) -> tuple[float | None, str | None]:
    """The highest MFU of `family`'s train points at d_model >= min_d, and which point it is."""
    points = [p for p in results.get("train", []) if p["family"] == family and p["d_model"] >= min_d and "mfu" in p]
    if not points:
        return None, None
    best = max(points, key=lambda p: p["mfu"])
    impl = f", {best['memory_impl']}" if best.get("memory_impl") else ""
    impl += ", remat off" if best.get("remat") is False else ""
    impl += f", {best['microbatches']} microbatches" if best.get("microbatches", 1) > 1 else ""
    return best["mfu"], f"d {best['d_model']}, n {best['seq_len']}, {best['tokens_per_step']} tokens{impl}"


def check_goals(results: dict) -> list[dict]:
    """The issue's goals for this platform, each with its measured value and met / missed / not run."""
    goals = []

    def goal(name, value, target, met, at=None):
        goals.append({"goal": name, "value": value, "target": target, "at": at,
                      "status": "not run" if value is None else ("met" if met(value) else "missed")})

    if results["platform"] == "cpu":
        for name, family, min_d, target in (("transformer train-step MFU at d_model >= 256", "transformer", 256, 0.70),
                                            ("LMU (best impl) train-step MFU", "lmu", 0, 0.50),
                                            ("LSTM train-step MFU", "lstm", 0, 0.40)):
            value, at = _best_mfu(results, family, min_d)
            goal(name, value, f">= {target:.2f}", lambda v, t=target: v >= t, at)
    else:
        goal("transformer bf16 MFU at >= 100M parameters", None, ">= 0.40", lambda v: v >= 0.40)
    ratios = [p["loop_over_bare"] for p in results.get("loop", []) if "loop_over_bare" in p]
    goal("whole loop / bare step (worst family)", max(ratios) if ratios else None, "<= 1.05", lambda v: v <= 1.05)
    lmu = results.get("scaling", {}).get("lmu", {}).get("slopes", {})
    goal("LMU step time per sequence, log-log slope", lmu.get("step_time_per_sequence"), "<= 1.2", lambda v: v <= 1.2)
    goal("LMU peak memory per sequence, log-log slope", lmu.get("peak_memory_per_sequence"), "<= 1.1",
         lambda v: v <= 1.1)
    goal("8 fake devices / 1 device, same global batch", results.get("sharding", {}).get("slowdown_8_vs_1"), "<= 3.0",
         lambda v: v <= 3.0)
    return goals


def _fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _step_cells(point: dict) -> str:
    if "step_s" in point:
        return (f"{point['step_s'] * 1e3:.1f} | {point['tokens_per_s']:.0f} | {_fmt(point.get('mfu'), '.1%')} | "
                f"{point['peak_bytes'] / 2**20:.0f}")
    reason = point.get("skipped") or point.get("error", "?")
    return f"{reason[:70]} | | | {point['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in point else f"{reason[:70]} | | |"


def to_markdown(results: dict) -> str:
    c = results["ceiling"]
    dtype = results["compute_dtype"]
    load = results["load_average_1min"]
    lines = [
        f"# lmu-jax bench, {results['platform']} ({results['device']}, {results['host']['cpus']} CPUs, "
        f"{results['host']['memory_gib']} GiB), jax {results['jax_version']}{' (quick)' if results['quick'] else ''}",
        "",
        f"Compute dtype {dtype}. Total {results['total_s']} s; 1-min load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end (a shared machine: other jobs compete for the cores).",
        "",
        "## Ceiling (the denominators)",
        "",
        "| measure | start | end | used |",
        "|---|---|---|---|",
    ]
    for key, label in (("matmul_float32_gflops", f"matmul {c['start']['matmul_size']}² float32, GFLOP/s"),
                       ("matmul_bfloat16_gflops", f"matmul {c['start']['matmul_size']}² bfloat16, GFLOP/s"),
                       ("copy_gb_per_s", f"copy {c['start']['copy_mib']} MiB (read + write), GB/s")):
        lines.append(f"| {label} | {c['start'][key]:.1f} | {c['end'][key]:.1f} | {c[key]:.1f} |")
    if c.get("model_matmuls"):
        torch_too = any("torch_gflops" in m for m in c["model_matmuls"])
        lines += ["", "The models' own matmul shapes (the FFN up-projection, rows = tokens per step or per "
                  "microbatch; with the peers also the batch, the rows of the LSTM's per-time-step matmul): how "
                  "fast XLA runs them here, an upper bound on the MFU of a step made of such matmuls"
                  + (", and how fast PyTorch's torch.mm runs the same ones." if torch_too else "."), "",
                  "| matmul | GFLOP/s | of the ceiling |"
                  + (" torch.mm GFLOP/s | XLA ÷ torch speed |" if torch_too else ""),
                  "|---|---|---|" + ("---|---|" if torch_too else "")]
        for m in c["model_matmuls"]:
            row = (f"| ({m['rows']} x {m['d_model']}) @ ({m['d_model']} x {4 * m['d_model']}) {m['dtype']} | "
                   f"{m['gflops']:.1f} | {m['of_ceiling']:.0%} |")
            if torch_too:
                row += f" {m['torch_gflops']:.1f} | {m['gflops'] / m['torch_gflops']:.2f} |"
            lines.append(row)
    lines += ["", "## Goals", "", "| goal | measured | at | target | status |", "|---|---|---|---|---|"]
    for g in results["goals"]:
        lines.append(f"| {g['goal']} | {_fmt(g['value'], '.3f')} | {g.get('at') or '-'} | {g['target']} | "
                     f"{g['status']} |")
    if "train" in results:
        lines += _train_markdown(results)
    if "loop" in results:
        lines += _loop_markdown(results)
    if "scaling" in results:
        lines += _scaling_markdown(results)
    if "sharding" in results:
        lines += _sharding_markdown(results)
    if "lmu_memory" in results:
        lines += _lmu_memory_markdown(results)
    if "peers" in results:
        lines += _peers_markdown(results)
    return "\n".join(lines) + "\n"


def _peers_markdown(results: dict) -> list[str]:
    peers = results["peers"]
    lines = ["", "## PyTorch peers (benchmarks/peers.py)", ""]
    if peers.get("skipped"):
        return lines + [f"Not run: {peers['skipped']}."]
    compiled = any("torch_compile_step_s" in p for p in peers["points"])
    plain = any("torch_eager_no_onednn_step_s" in p for p in peers["points"])
    lines += [f"Our Trainer's step at our default settings against the same model in PyTorch {peers['torch_version']} "
              "(same parameters, copied from ours; forward + backward + clip + AdamW, float32), interleaved one "
              "step a side per round; medians. ours ÷ theirs < 1: ours is faster."
              + (" The LSTM also without oneDNN: torch.nn.LSTM then runs PyTorch's per-time-step loop instead of "
                 "oneDNN's fused RNN kernel." if plain else ""), "",
              "| family | d_model | layers | batch x tokens | params | microbatches | ours s | torch eager s | "
              "ours ÷ eager |" + (" eager, no oneDNN s | ours ÷ that |" if plain else "")
              + (" torch.compile s | ours ÷ compiled |" if compiled else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if plain else "") + ("---|---|" if compiled else "")]
    for p in peers["points"]:
        head = f"| {p['family']} | {p['d_model']} | {p['n_layers']} | {p['batch_size']} x {p['seq_len']} |"
        if "error" in p:
            lines.append(f"{head} {p['error'][:70]} | | | | |")
            continue
        row = (f"{head} {p['params']:,} | {p['microbatches']} | {p['ours_step_s']:.3f} | "
               f"{p['torch_eager_step_s']:.3f} | {p['ours_over_torch_eager']:.2f} |")
        if plain:
            row += (f" {_fmt(p.get('torch_eager_no_onednn_step_s'), '.3f', '–')} | "
                    f"{_fmt(p.get('ours_over_torch_eager_no_onednn'), '.2f', '–')} |")
        if compiled:
            row += f" {_fmt(p.get('torch_compile_step_s'), '.3f')} | {_fmt(p.get('ours_over_torch_compile'))} |"
        lines.append(row)
    return lines


def _train_markdown(results: dict) -> list[str]:
    dtype = results["compute_dtype"]
    lines = ["", f"## Train step (the Trainer's jitted step, 1 device, {results['grid']['n_layers']} layer(s))", "",
              "MFU = analytic model FLOPs (lmu_jax/flops.py, training = 3 x forward) / step time / the "
              f"{dtype} matmul ceiling. Median step over >= {results['grid']['min_steps']} steps after a warm-up. "
              "Microbatches > 1: the same step as gradient accumulation over microbatches of "
              f"{results['grid']['microbatch_tokens']} tokens (or one sequence), a scan inside the jitted step. "
              "XLA / model: the FLOPs XLA's cost analysis counts in the compiled step (recomputation and the "
              "kernel's own extra work included) over the analytic ones; n/a where the step has a loop, whose "
              "body XLA counts once.", "",
              "| family | d_model | n | tokens/step | microbatches | memory impl | params | step ms | tokens/s | MFU "
              "| peak MiB | XLA / model FLOPs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in results["train"]:
        impl = p.get("memory_impl") or "-"
        if "remat" in p:
            impl += f", remat {'on' if p['remat'] else 'off'}"
        lines.append(f"| {p['family']} | {p['d_model']} | {p['seq_len']} | {p.get('tokens_per_step', '?')} | "
                     f"{p.get('microbatches', 1)} | {impl} | "
                     f"{p.get('params', 0) / 1e6:.2f}M | " + _step_cells(p) +
                     f" | {_fmt(p.get('xla_over_model_flops'))} |")
    lines += ["", "## Where the time goes (jax.profiler trace of 2 steps, share of all XLA op time)", "",
              "Op time is summed over the threads that run ops side by side, so it can exceed the step time. "
              "Matmuls: the ops that are, or fuse, dot products (FLOPs from the compiled HLO's shapes), their share "
              "of op time and their speed; MFU ~ share x speed / ceiling.", "",
              "| family | d_model | n | tokens/step | op time ms | matmul share | matmul GFLOP/s | top op kinds |",
              "|---|---|---|---|---|---|---|---|"]
    for p in results["train"]:
        if "top_ops" in p:
            top = ", ".join(f"{k} {v:.0%}" for k, v in p["top_ops"].items())
            lines.append(f"| {p['family']} | {p['d_model']} | {p['seq_len']} | {p.get('tokens_per_step', '?')} | "
                         f"{p['op_time_ms']:.0f} | {_fmt(p.get('matmul_time_share'), '.0%')} | "
                         f"{_fmt(p.get('matmul_gflops'), '.0f')} | {top} |")
    return lines


def _loop_markdown(results: dict) -> list[str]:
    lines = ["", "## Whole training loop vs bare step", "",
              "Loop: `Trainer.train()` (input pipeline, delayed metrics, metrics.jsonl), median of its own "
              "step_time records. Bare: the same jitted step on prepared batches, timed the same way (metrics "
              "fetched one step late). Run as bare, loop, bare, loop (the second loop in a second Trainer); each "
              "side is the faster of its two medians.", "",
              "| family | d_model | n | loop step ms | bare step ms | loop / bare | loop tokens/s |",
              "|---|---|---|---|---|---|---|"]
    for p in results["loop"]:
        loop_ms = _fmt(p.get("step_s") and p["step_s"] * 1e3, ".1f", p.get("error", "n/a")[:60])
        lines.append(f"| {p['family']} | {p['d_model']} | {p['seq_len']} | {loop_ms} | "
                     f"{_fmt(p.get('bare_step_s') and p['bare_step_s'] * 1e3, '.1f')} | "
                     f"{_fmt(p.get('loop_over_bare'), '.3f')} | {_fmt(p.get('tokens_per_s'), '.0f')} |")
    return lines


def _scaling_markdown(results: dict) -> list[str]:
    grid = results["grid"]
    model = grid["scaling_model"]
    lines = ["", f"## Sequence-length scaling ({grid['scaling_tokens']} tokens per batch, d_model {model['d_model']}, "
              f"{model['n_layers']} layer(s))", "",
              "Peak memory: XLA's `compiled.memory_analysis()` of the train step (parameters and optimizer state "
              "included). Slopes: `np.polyfit` of log(step time) and log(peak memory) on log n, fitted over "
              "n >= " + str(grid["fit_from"]) + "; per sequence = per batch + 1 (batch = tokens / n).", "",
              "| family | n | batch | step ms | tokens/s | MFU | peak MiB |", "|---|---|---|---|---|---|---|"]
    for family, s in results["scaling"].items():
        for p in s["points"]:
            lines.append(f"| {family} | {p['n']} | {p['batch_size']} | " + _step_cells(p) + " |")
    lines += ["", "| family | fit over n | time slope / batch | time slope / sequence | memory slope / batch | "
              "memory slope / sequence |", "|---|---|---|---|---|---|"]
    for family, s in results["scaling"].items():
        sl = s["slopes"]
        fit = f"{sl['fit_n'][0]}-{sl['fit_n'][1]} ({sl['points_fitted']} pts)" if sl["fit_n"] else "n/a"
        lines.append(f"| {family} | {fit} | {_fmt(sl['step_time_per_batch'])} | {_fmt(sl['step_time_per_sequence'])} | "
                     f"{_fmt(sl['peak_memory_per_batch'])} | {_fmt(sl['peak_memory_per_sequence'])} |")
    return lines


def _sharding_markdown(results: dict) -> list[str]:
    sh = results["sharding"]
    m = sh["model"]
    lines = ["", f"## Sharding overhead (transformer d_model {m['d_model']}, {m['n_layers']} layers, n {m['seq_len']}, "
              f"global batch {m['batch_size']}; a fresh process per device count)", "",
              "| devices | step ms | tokens/s | collectives (share of op time) |", "|---|---|---|---|"]
    for count, p in sh["runs"].items():
        if "step_s" in p:
            frac = p.get("collective_fraction")
            share = "-" if count == "1" else (_fmt(frac, ".1%") if frac is not None else p.get("note", "n/a"))
            lines.append(f"| {count} | {p['step_s'] * 1e3:.1f} | {p['tokens_per_s']:.0f} | {share} |")
        else:
            lines.append(f"| {count} | {p.get('error', '?')[:80]} | | |")
    lines += ["", f"8 devices / 1 device: {_fmt(sh['slowdown_8_vs_1'])}x. The 8 fake devices share the same cores; "
              "a collective's time includes waiting at its rendezvous for the slowest device."]
    return lines


def _lmu_memory_markdown(results: dict) -> list[str]:
    mem = results["lmu_memory"]
    lines = ["", "## LMU memory kernels (benchmarks/lmu_memory.py)", "",
              f"Grid {mem['grid']}; worst auto/fastest: {_fmt(mem['worst_auto_ratio'])}. "
              "Forward + backward ms, batch x channels = "
              f"{mem['batch'] * mem['channels']}.", "",
              "| form | order | n | " + " | ".join(MEMORY_IMPLS) + " | fastest | auto | auto/fastest |",
              "|---|---|---|" + "---|" * len(MEMORY_IMPLS) + "---|---|---|"]
    for p in mem["points"]:
        times = " | ".join(_fmt(p["times_s"].get(impl) and p["times_s"][impl] * 1e3, ".1f", "failed")
                           for impl in MEMORY_IMPLS)
        lines.append(f"| {p['form']} | {p['order']} | {p['n']} | {times} | {p['fastest']} | {p['auto']} | "
                     f"{_fmt(p['auto_ratio'])} |")
    return lines


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """<platform>[_quick].json/.md; a run of some sections only adds their names (cpu_loop.json)."""
    partial = "" if set(results["sections"]) == set(SECTIONS) else "_" + "_".join(results["sections"])
    return write_json_and_markdown(out_dir, results["platform"] + partial, results, to_markdown(results))


if __name__ == "__main__":  # the sharding worker: python -m benchmarks.suite --sharding-worker '<spec json>'
    if len(sys.argv) == 3 and sys.argv[1] == "--sharding-worker":
        print("RESULT " + json.dumps(sharding_worker(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit("usage: python -m benchmarks.suite --sharding-worker '<spec json>' (or: lmu-jax bench)")
