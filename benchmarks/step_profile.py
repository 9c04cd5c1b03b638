"""Where a train step's time goes, dot shape by dot shape, at the PyTorch peers' shapes.

    python -m benchmarks.step_profile [--shapes transformer:256,lstm:256] [--steps 6]
        -> benchmarks/results/cpu_step_profile.json and .md

For each (family, d_model): the Trainer's jitted step at our default settings (the model of
benchmarks/xla_flags.py: the peers' 4-layer transformer and 2-layer LSTM, batch 16 x 256), its median
time, then two steps under ``jax.profiler``. Every dot product of the compiled step is grouped by its
signature (operand and output shapes, contracting and batch dimensions), so that the forward matmul,
its two backward matmuls (one of them against the transposed weight) and the attention's batched dots
show apart: calls per step, share of all op time, speed. Op time is summed over the threads that run ops
side by side, so a dot's speed here (its FLOPs over its own duration) can lie below the same matmul
timed alone (the bench's ceiling section) when ops overlap; the ranking is what this is for.
"""

from __future__ import annotations

import argparse
import os
import platform as host_platform
import tempfile
from pathlib import Path

import jax

from benchmarks import write_json_and_markdown
from benchmarks.suite import dot_instructions, instruction_events, op_times, time_train_step
from benchmarks.xla_flags import N_LAYERS, peer_shape_config


def breakdown(hlo_text: str, events: dict[str, list], steps: int, top: int = 12) -> dict:
    """The traced op time per step, its dot share, the `top` dot signatures and the other op kinds."""
    dots_by_name = {op: dot for op, dot in dot_instructions(hlo_text).items() if dot[0]}  # FLOPs > 0
    total = sum(ns for ns, _ in events.values())
    groups: dict[str, list] = {}
    for op, (ns, calls) in events.items():
        if op in dots_by_name:
            flops, signature = dots_by_name[op]
            group = groups.setdefault(signature, [0.0, 0.0, 0])
            group[0] += ns
            group[1] += calls * flops
            group[2] += calls
    others = op_times({op: event for op, event in events.items() if op not in dots_by_name})
    dots = [{"signature": sig, "calls_per_step": calls // steps, "ms_per_step": ns / steps / 1e6,
             "share": ns / total, "gflops": flop / ns} for sig, (ns, flop, calls) in groups.items()]
    dots.sort(key=lambda d: -d["ms_per_step"])
    dot_ns = sum(g[0] for g in groups.values())
    return {"op_ms_per_step": total / steps / 1e6, "dot_share": dot_ns / total if total else 0.0,
            "dots": dots[:top],
            "other_ops": {k: v / total for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:6]}}


def profile(family: str, d_model: int, cache_dir: str, steps: int = 6) -> dict:
    """The bench's timed train step (suite.time_train_step, median of `steps`) with its trace's breakdown."""
    with tempfile.TemporaryDirectory(prefix="lmu_jax_profile_") as trace_dir:
        point = time_train_step(peer_shape_config(family, d_model, cache_dir), jax.devices()[:1], min_steps=steps,
                                budget_s=0.0, trace_dir=Path(trace_dir),
                                analyse=lambda trace, hlo: breakdown(hlo, instruction_events(trace), steps=2))
    return {"family": family, "d_model": d_model, "n_layers": N_LAYERS[family],
            "microbatches": point["microbatches"], "step_s": point["step_s"],
            **{k: point[k] for k in ("op_ms_per_step", "dot_share", "dots", "other_ops")}}


def to_markdown(results: dict) -> str:
    lines = [f"# Where the train step's time goes ({results['cpu']}, jax {results['jax']})", "",
             "Each step: our default settings, float32, batch 16 x 256 (`python -m benchmarks.step_profile`; module "
             "docstring). Dot products grouped by signature; op time is summed over the threads that run ops side "
             "by side, so a dot's speed here can lie below the same matmul timed alone; one above the machine's "
             "ceiling is a dot whose work the trace does not time. "
             f"1-min load average {results['load'][0]:.1f} at the start, {results['load'][1]:.1f} at the end.", ""]
    for p in results["points"]:
        lines += [f"## {p['family']} d {p['d_model']}, {p['n_layers']} layers, {p['microbatches']} microbatch(es)", "",
                  f"Step {p['step_s'] * 1e3:.0f} ms; op time {p['op_ms_per_step']:.0f} ms per step, "
                  f"{p['dot_share']:.0%} of it in dots.", "",
                  "| dot (operands -> output, contracting dims lhs/rhs) | calls per step | ms per step | "
                  "share of op time | GFLOP/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d['signature']} | {d['calls_per_step']} | {d['ms_per_step']:.1f} | {d['share']:.1%} | "
                  f"{d['gflops']:.0f} |" for d in p["dots"]]
        lines += ["", "Other op kinds: " + ", ".join(f"{k} {v:.1%}" for k, v in p["other_ops"].items()) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="transformer:256,lstm:256", help="family:d_model, comma-separated")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per shape (median)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for cpu_step_profile.json/.md")
    args = parser.parse_args(argv)
    shapes = [(family, int(d)) for family, d in (s.split(":") for s in args.shapes.split(","))]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lmu_jax_profile_data_") as cache:
        points = [profile(family, d, cache, args.steps) for family, d in shapes]
    results = {"cpu": f"{jax.default_backend()}, {os.cpu_count()} CPUs, {host_platform.machine()}",
               "jax": jax.__version__, "load": [load_start, os.getloadavg()[0]], "quick": False, "points": points}
    for path in write_json_and_markdown(Path(args.out), f"{jax.default_backend()}_step_profile", results,
                                        to_markdown(results)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
