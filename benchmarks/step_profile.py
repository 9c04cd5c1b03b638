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

The step's wall time is also split by what runs (``wall_split``): a dot, only other ops, or no op at all
(the runtime between ops, and the work of an op whose event ends before its work does: a dot timed
above the machine's ceiling), and, where PyTorch is installed, the peer's eager step the same way from
``torch.profiler`` (``peers.profile_peer``): where the two differ is where ours loses. The traced step
is slower than the untraced one; the shares are applied to the untraced median.
"""

from __future__ import annotations

import argparse
import os
import platform as host_platform
import tempfile
from pathlib import Path

import jax

from benchmarks import peers, write_json_and_markdown
from benchmarks.suite import (dot_instructions, hlo_op_events, instruction_totals, matmul_gflops, op_kind, op_times,
                              time_train_step)
from benchmarks.xla_flags import BATCH, N_LAYERS, SEQ_LEN, peer_shape_config

CONTROL_OPS = ("while", "conditional", "call")  # their events span their bodies' ops, and the gaps between them


def breakdown(dots_by_name: dict[str, tuple], events: dict[str, list], steps: int, top: int = 12) -> dict:
    """The traced op time per step (events: instruction_totals), its dot share, the `top` dot signatures
    (dots_by_name: dot_instructions with FLOPs) and the other op kinds."""
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


def wall_split(op_events, dot_ops: set) -> dict:
    """Shares of the traced wall time (first op's start to last op's end of hlo_op_events' events) during
    which a dot runs
    (``matmul_share``), only other ops run, and no op runs (the runtime between ops, and untimed work).
    Ops that run side by side count once, so unlike op time these add up to the step."""
    edges = []
    for op, start, duration in op_events:
        if op_kind(op) not in CONTROL_OPS:
            edges += [(start, 1, op in dot_ops), (start + duration, -1, op in dot_ops)]
    if not edges:
        return {}
    edges.sort()
    running = {True: 0, False: 0}  # dots, other ops
    spans = {"matmul": 0, "other": 0, "none": 0}
    last = edges[0][0]
    for time_ns, change, is_dot in edges:
        spans["matmul" if running[True] else "other" if running[False] else "none"] += time_ns - last
        running[is_dot] += change
        last = time_ns
    total = last - edges[0][0]
    return {f"{kind}_share": span / total for kind, span in spans.items()}


def analyse(trace_dir: Path, hlo_text: str) -> dict:
    """The trace of two steps read once: breakdown and wall_split."""
    op_events = list(hlo_op_events(trace_dir))
    dots_by_name = {op: dot for op, dot in dot_instructions(hlo_text).items() if dot[0]}  # FLOPs > 0
    return {**breakdown(dots_by_name, instruction_totals(op_events), steps=2),
            "wall": wall_split(op_events, set(dots_by_name))}


def profile(family: str, d_model: int, cache_dir: str, steps: int = 6) -> dict:
    """The bench's timed train step (suite.time_train_step, median of `steps`) with its trace's breakdown;
    where PyTorch is installed, its peer's step split the same way (peers.profile_peer)."""
    cfg = peer_shape_config(family, d_model, cache_dir)
    with tempfile.TemporaryDirectory(prefix="lmu_jax_profile_") as trace_dir:
        point = time_train_step(cfg, jax.devices()[:1], min_steps=steps, budget_s=0.0, trace_dir=Path(trace_dir),
                                analyse=analyse)
    peer = None if peers.torch_available() else peers.profile_peer(cfg, jax.devices()[:1], steps)
    return {"family": family, "d_model": d_model, "n_layers": N_LAYERS[family],
            "microbatches": point["microbatches"], "step_s": point["step_s"], "peer": peer,
            "input_gradient_dots": input_gradient_dots(family, d_model, point["microbatches"]),
            **{k: point[k] for k in ("op_ms_per_step", "dot_share", "dots", "other_ops", "wall")}}


def input_gradient_dots(family: str, d_model: int, microbatches: int, repeats: int = 30) -> list[dict]:
    """The transformer's FFN input-gradient matmuls (a microbatch's rows times a weight's transpose), each
    timed alone against the weight as the step holds it (transposed) and laid out for the product: whether
    a transposed weight is slower in itself, apart from the step's other ops."""
    if family != "transformer":
        return []
    rows, device = SEQ_LEN * BATCH // microbatches, jax.devices()[0]
    return [{"shape": f"({rows} x {inner}) @ ({inner} x {cols})",
             "transposed_gflops": matmul_gflops(rows, inner, cols, "float32", device, repeats, transposed=True),
             "laid_out_gflops": matmul_gflops(rows, inner, cols, "float32", device, repeats)}
            for inner, cols in ((4 * d_model, d_model), (d_model, 4 * d_model))]  # through W_up, W_down


def _split_rows(p: dict) -> list[str]:
    """Ours against the peer: the step's wall time split by what runs (shares x the untraced median step)."""
    ours, peer = p["wall"], p["peer"]

    def cells(split, step_s):
        return [f"{split[k] * step_s * 1e3:.0f} ({split[k]:.0%})" if split else "–"
                for k in ("matmul_share", "other_share", "none_share")]

    rows = [["step (median, untraced)", f"{p['step_s'] * 1e3:.0f}", f"{peer['step_s'] * 1e3:.0f}" if peer else "–"],
            ["a matmul running (ours: a dot; PyTorch: mm, bmm, its attention or RNN kernel)"],
            ["only other ops running"], ["no op running"]]
    for row, ours_cell, peer_cell in zip(rows[1:], cells(ours, p["step_s"]),
                                         cells(peer, peer["step_s"]) if peer else ["–"] * 3):
        row += [ours_cell, peer_cell]
    lines = ["| per step, ms (share) | ours | PyTorch eager |", "|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if peer:
        lines += ["", "PyTorch's largest other ops, ms per step: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in peer["top_other_ms"].items()) + "."]
    return lines


def to_markdown(results: dict) -> str:
    lines = [f"# Where the train step's time goes ({results['cpu']}, jax {results['jax']})", "",
             "Each step: our default settings, float32, batch 16 x 256 (`python -m benchmarks.step_profile`; module "
             "docstring). Dot products grouped by signature; op time is summed over the threads that run ops side "
             "by side, so a dot's speed here can lie below the same matmul timed alone; one above the machine's "
             "ceiling is a dot whose work the trace does not time. The split of the step's wall time counts "
             "ops that run side by side once; its \"no op running\" also holds such untimed work. "
             f"1-min load average {results['load'][0]:.1f} at the start, {results['load'][1]:.1f} at the end.", ""]
    for p in results["points"]:
        lines += [f"## {p['family']} d {p['d_model']}, {p['n_layers']} layers, {p['microbatches']} microbatch(es)", "",
                  f"Step {p['step_s'] * 1e3:.0f} ms; op time {p['op_ms_per_step']:.0f} ms per step, "
                  f"{p['dot_share']:.0%} of it in dots.", "", *_split_rows(p), "",
                  "| dot (operands -> output, contracting dims lhs/rhs) | calls per step | ms per step | "
                  "share of op time | GFLOP/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d['signature']} | {d['calls_per_step']} | {d['ms_per_step']:.1f} | {d['share']:.1%} | "
                  f"{d['gflops']:.0f} |" for d in p["dots"]]
        lines += ["", "Other op kinds: " + ", ".join(f"{k} {v:.1%}" for k, v in p["other_ops"].items()) + ".", ""]
        if p.get("input_gradient_dots"):
            lines += ["The FFN's input-gradient matmuls timed alone, GFLOP/s against the transposed weight (as in "
                      "the step) / against the weight laid out for the product: " + "; ".join(
                          f"{g['shape']} {g['transposed_gflops']:.0f} / {g['laid_out_gflops']:.0f}"
                          for g in p["input_gradient_dots"]) + ".", ""]
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
