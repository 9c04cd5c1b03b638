"""Forward + backward time of every LMU memory implementation, and what impl="auto" picks.

    python -m benchmarks.lmu_memory [--quick] [--out benchmarks/results]

For every (sequence length n, order) point it times, jitted, the gradient of a scalar loss through
`lmu_memory` (w.r.t. u) and through `lmu_memory_folded` (w.r.t. u and the (r, order) reduce
matrix, r = 3*order//10 as in the LM block), for each implementation. It reports the median of
several runs after a warm-up (compile) call, the fastest impl, what `select_memory_impl` ("auto")
picks and auto's time ratio to the fastest. "auto" dispatches at trace time, so its program is
exactly the picked impl's; its time is that impl's measured time.

Writes benchmarks/results/lmu_memory_<platform>.json and .md. A point that cannot run (out of
memory, ...) is recorded with its error, never skipped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import write_json_and_markdown
from lmu_jax.ops import MEMORY_IMPLS, default_chunk_len, lmu_memory, lmu_memory_folded, select_memory_impl

# batch * channels = 64 stacked channels: the per-device slice of a small LM layer (d ~ 16-64
# channels x a few sequences). It keeps the largest point's order-256 memory at 1 GiB
# (64 x 16384 x 256 x 4 B), so forward + backward fits in this machine's shared RAM.
BATCH, CHANNELS = 4, 16
FULL_GRID = {"lengths": (256, 1024, 4096, 16384), "orders": (16, 64, 256)}
QUICK_GRID = {"lengths": (256, 1024), "orders": (16, 64)}
FORMS = ("memory", "folded")


def reduced_width(order: int) -> int:
    """r = 3 q' with q' = order // 10, the LM block's Q, K, V widths (at least 1)."""
    return max(1, 3 * order // 10)


def _loss_and_grad(form: str, impl: str, order: int, theta: float):
    if form == "memory":
        def loss(u):
            return 0.5 * jnp.sum(lmu_memory(u, order, theta, impl) ** 2)
        return jax.jit(jax.value_and_grad(loss))

    def loss_folded(u, reduce):
        return 0.5 * jnp.sum(lmu_memory_folded(u, reduce, order, theta, impl) ** 2)
    return jax.jit(jax.value_and_grad(loss_folded, argnums=(0, 1)))


def _time_interleaved(fns: dict, args, min_reps: int, budget_s: float) -> dict:
    """Wall times of each (already compiled and warmed-up) fn(*args), one list per name.

    The impls are timed round-robin (A, B, C, A, B, C, ...) so that load from other processes on
    a shared machine hits them alike. Rounds continue until `min_reps` rounds and `budget_s`
    seconds; they stop after 9 rounds, or after 3 x budget_s once 2 rounds are done (a slow point
    gets fewer rounds, never fewer than 2; the counts are recorded).
    """
    times = {name: [] for name in fns}
    spent, rounds = 0.0, 0
    while rounds < 9:
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        rounds += 1
        if (rounds >= min_reps and spent >= budget_s) or (rounds >= 2 and spent >= 3 * budget_s):
            break
    return times


def time_point(n: int, order: int, form: str, min_reps: int, budget_s: float) -> dict:
    theta = float(n)  # the model's default theta = n; speed does not depend on theta
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.standard_normal((BATCH, n, CHANNELS)), jnp.float32)
    r = reduced_width(order)
    args = (u,) if form == "memory" else (u, jnp.asarray(rng.standard_normal((r, order)) / order**0.5, jnp.float32))
    point = {"n": n, "order": order, "form": form, "theta": theta, "chunk_len": min(n, default_chunk_len(order)),
             "times_s": {}, "reps": {}, "errors": {}}
    if form == "folded":
        point["r"] = r
    runnable = {}
    for impl in MEMORY_IMPLS:  # compile each alone, so that one failure cannot hide the others
        fn = _loss_and_grad(form, impl, order, theta)
        try:
            jax.block_until_ready(fn(*args))
            runnable[impl] = fn
        except Exception as error:  # noqa: BLE001 - an infeasible point is recorded, not hidden
            point["errors"][impl] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    if runnable:
        runs = _time_interleaved(runnable, args, min_reps, budget_s)
        point["times_s"] = {impl: statistics.median(t) for impl, t in runs.items()}
        point["min_times_s"] = {impl: min(t) for impl, t in runs.items()}
        point["reps"] = {impl: len(t) for impl, t in runs.items()}
    jax.clear_caches()
    times = point["times_s"]
    point["fastest"] = min(times, key=times.get) if times else None
    return point


def run(quick: bool = False, budget_s: float | None = None, grid: dict | None = None) -> dict:
    """Time the grid (the small one when `quick`) and return the results as a JSON-ready dict.
    `budget_s` (seconds of timing per point) and `grid` ({"lengths", "orders"}) override the defaults;
    `lmu-jax bench` shortens both."""
    grid = grid or (QUICK_GRID if quick else FULL_GRID)
    min_reps, default_budget = (2, 0.5) if quick else (3, 4.0)
    budget_s = default_budget if budget_s is None else budget_s
    started, load_start = time.time(), os.getloadavg()
    points = []
    for form in FORMS:
        for order in grid["orders"]:
            for n in grid["lengths"]:
                point = time_point(n, order, form, min_reps, budget_s)
                points.append(point)
                shown = " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in point["times_s"].items())
                print(f"{form:6s} order={order:3d} n={n:5d}  {shown}  fastest={point['fastest']}  "
                      f"{point['errors'] or ''}", flush=True)
    return score_auto({
        "benchmark": "lmu_memory forward+backward (jax.value_and_grad of 0.5*sum(out**2))",
        "platform": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "host": {"cpus": os.cpu_count(), "machine": host_platform.machine(), "processor": host_platform.processor()},
        "jax_version": jax.__version__,
        "quick": quick,
        "grid": {k: list(v) for k, v in grid.items()},
        "batch": BATCH,
        "channels": CHANNELS,
        "theta": "n",
        "chunk_len": "default_chunk_len(order): 32 for order < 128, 64 above (CPU)",
        "timing": (
            f"median over round-robin rounds after one compile/warm-up call per impl; >= {min_reps} rounds "
            f"and >= {budget_s:g} s per point, at most 9 rounds, stopping after {3 * budget_s:g} s (>= 2 rounds)"
        ),
        "total_s": round(time.time() - started, 1),
        "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},  # the machine is shared
        "points": points,
    })


def score_auto(results: dict) -> dict:
    """What impl="auto" picks at every point under the current decision table, its time ratio to the
    fastest and the worst ratio. "auto" dispatches at trace time to one impl, so its time is that impl's
    measured time: after a change of the table, `--rescore` re-scores recorded measurements."""
    for p in results["points"]:
        times = p["times_s"]
        p["auto"] = select_memory_impl(p["n"], p["order"], folded=p["form"] == "folded", platform=results["platform"])
        p["auto_ratio"] = times[p["auto"]] / times[p["fastest"]] if p["auto"] in times else None
    ratios = [p["auto_ratio"] for p in results["points"] if p["auto_ratio"] is not None]
    results["worst_auto_ratio"] = max(ratios) if ratios else None
    return results


def to_markdown(results: dict) -> str:
    lines = [
        f"# LMU memory forward+backward, {results['platform']} ({results['device']}, "
        f"{results['host']['cpus']} CPUs), jax {results['jax_version']}",
        "",
        f"batch={results['batch']}, channels={results['channels']}, theta=n, chunked: {results['chunk_len']}, "
        f"folded r = 3*order//10. {results['timing']}. Times in ms; ratio = auto / fastest.",
        "",
        "| form | order | n | " + " | ".join(MEMORY_IMPLS) + " | fastest | auto | auto/fastest |",
        "|---|---|---|" + "---|" * len(MEMORY_IMPLS) + "---|---|---|",
    ]
    for p in results["points"]:
        cells = []
        for impl in MEMORY_IMPLS:
            if impl in p["times_s"]:
                cells.append(f"{p['times_s'][impl] * 1e3:.1f}")
            else:
                cells.append(f"failed: {p['errors'][impl][:60]}")
        form = p["form"] + (f" (r={p['r']})" if "r" in p else "")
        ratio = f"{p['auto_ratio']:.2f}" if p["auto_ratio"] is not None else "n/a"
        lines.append(f"| {form} | {p['order']} | {p['n']} | " + " | ".join(cells) + f" | {p['fastest']} | {p['auto']} | {ratio} |")
    worst = results["worst_auto_ratio"]
    load = results["load_average_1min"]
    lines += [
        "",
        *([f"{results['rescored']}.", ""] if "rescored" in results else []),
        f"Worst auto/fastest: {'n/a' if worst is None else f'{worst:.2f}'}. Total benchmark time {results['total_s']} s; "
        f"1-min load average {load['start']:.1f} at the start, {load['end']:.1f} at the end (shared machine).",
        "Where two impls are closer than the run-to-run noise of a shared host (10-30 % here; the JSON also "
        "holds each impl's minimum time), the fastest column can flip between runs.",
        "",
    ]
    return "\n".join(lines)


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    return write_json_and_markdown(out_dir, f"lmu_memory_{results['platform']}", results, to_markdown(results))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, fewer runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rescore", type=Path, metavar="JSON",
                        help="re-score the auto picks of recorded results under the current decision table")
    args = parser.parse_args(argv)
    if args.rescore:
        results = score_auto(json.loads(args.rescore.read_text()))
        results["rescored"] = (f"auto re-scored {time.strftime('%Y-%m-%d')} under the current decision table; "
                               "the times are the recorded measurements")
    else:
        results = run(args.quick)
    for path in write_results(results, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
