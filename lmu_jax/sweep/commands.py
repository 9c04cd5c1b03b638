"""CLI: `lmu-jax sweep plan|run|status|collect SPEC [--sweep-dir DIR]` and `lmu-jax sweep design`."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from lmu_jax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="plan, run, watch and collect a sweep at matched FLOPs")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))

    def common(q):
        q.add_argument("spec", help="sweep YAML (see lmu_jax/sweep/spec.py and experiments/*.yaml)")
        q.add_argument("--sweep-dir", help="where its runs live (default: runs/sweeps/<spec name>)")

    q = actions.add_parser("plan", help="print the runs: id, family, N, tokens, steps, FLOPs, est. time")
    common(q)
    q.add_argument("--format", choices=("table", "ids", "json"), default="table",
                   help="ids: one run id per line (for launchers); json: runs with their configs")
    q.add_argument("--flops-per-s", type=float, help="FLOP/s for the time estimate (overrides the spec)")
    q.set_defaults(func=cmd_plan)

    q = actions.add_parser("run", help="run every unfinished run, one process each (resumes partial ones)")
    common(q)
    q.add_argument("--only", metavar="RUN_ID", help="run just this one")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_run)

    q = actions.add_parser("status", help="done / running / failed (with the error) per run")
    common(q)
    q.set_defaults(func=cmd_status)

    q = actions.add_parser("collect", help="write results.csv and per_position.json of the finished runs")
    common(q)
    q.set_defaults(func=cmd_collect)

    q = actions.add_parser("design", help="write a spec whose ladders bracket each budget's compute-optimal size")
    q.add_argument("--families", required=True, help="comma-separated families, e.g. transformer,lmu")
    q.add_argument("--flops", required=True, metavar="LOW:HIGH", help="training FLOP range of the budgets")
    q.add_argument("--hours", required=True, type=float, help="wall-clock budget for the whole sweep here")
    q.add_argument("--out", required=True, help="where to write the spec (YAML)")
    q.add_argument("--base", help="a run config YAML: the spec's base (corpus, seq_len, batch, optimizer)")
    q.add_argument("--flops-per-s", type=float, help="measured FLOP/s for the time estimate")
    q.add_argument("--sweep-dir", help="a sweep with finished runs: its measured FLOP/s per family")
    q.add_argument("--prior", metavar="G,a", help="a prior fit N_opt = G * C^a (default: ~20 tokens per parameter)")
    q.add_argument("--sizes-per-budget", type=int, default=5, help="5-7 sizes a factor 2 apart (default 5)")
    q.add_argument("--max-epochs", type=float, default=4.0, help="refuse runs that repeat the corpus more often")
    q.add_argument("--name", help="the sweep's name (default: the --out file's stem)")
    q.set_defaults(func=cmd_design)


def default_sweep_dir(spec) -> Path:
    return Path("runs") / "sweeps" / spec.name


def _load(args):
    """(spec, runs, sweep dir). With an lr grid the main runs are among the runs only once the grid is done."""
    from lmu_jax import storage
    from lmu_jax.sweep.runner import SweepDir, sync_results, writes_sweep_dir
    from lmu_jax.sweep.spec import load_spec

    spec = load_spec(args.spec)
    sweep_dir = storage.path(args.sweep_dir, "--sweep-dir") if args.sweep_dir else default_sweep_dir(spec)
    if spec.results and writes_sweep_dir():  # committed runs count as done (before the lr rule reads them)
        sync_results(SweepDir(sweep_dir), spec.results)
    return spec, expand_in(spec, sweep_dir), sweep_dir


def expand_in(spec, sweep_dir) -> list:
    """``spec.expand`` with the lr rule of the sweep directory's finished lr grid, if it has one."""
    from lmu_jax.sweep.lr import rules_from_grid
    from lmu_jax.sweep.spec import expand

    runs = expand(spec)
    if not spec.lr_grids:
        return runs
    rules = rules_from_grid(sweep_dir, runs)
    return runs if rules is None else expand(spec, rules)


def waiting_for_grid(spec, runs) -> bool:
    return bool(spec.lr_grids) and all(r.stage == "lr_grid" for r in runs)


# ------------------------------------------------------------------------------------------- plan


def measured_flops_per_s(sweep_dir) -> dict:
    """Per family: training FLOPs / wall time (process start to exit) of its finished runs, median.

    Wall time includes start-up, compilation and evaluation, so estimates from it are what a run costs.
    """
    from lmu_jax.sweep.runner import SweepDir, read_record

    sweep = SweepDir(sweep_dir)
    rates: dict[str, list[float]] = {}
    for planned in sweep.read_plan():
        record = read_record(sweep.run_dir(planned["run_id"]))
        if planned.get("branch_of"):  # its FLOPs count the parent's prefix, which it did not run
            continue
        if record.get("state") == "done" and record.get("ended", 0) > record.get("started", 0):
            rates.setdefault(planned["family"], []).append(planned["flops"] / (record["ended"] - record["started"]))
    return {family: statistics.median(values) for family, values in rates.items()}


def throughput_for(family: str, measured: dict, spec, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--flops-per-s"
    if family in measured:
        return measured[family], "measured"
    if family in spec.throughput:
        return spec.throughput[family], "spec"
    if "default" in spec.throughput:
        return spec.throughput["default"], "spec"
    return None, "unknown"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def plan_rows(spec, runs, sweep_dir, flops_per_s: float | None = None) -> list[dict]:
    measured = measured_flops_per_s(sweep_dir) if sweep_dir is not None else {}
    rows = []
    for run in runs:
        rate, source = throughput_for(run.family, measured, spec, flops_per_s)
        target = run.budget.value if run.budget.kind == "flops" and not run.branch_of else None
        kind = f"branch {run.fraction:g} of {run.branch_of}" if run.branch_of else run.stage
        rows.append({
            "run_id": run.run_id, "family": run.family, "size": run.size, "N": run.n_params,
            "N_total": run.params["total"], "shape": f"d={run.config.model.d_model} L={run.config.model.n_layers}",
            "steps": run.steps, "tokens": run.tokens, "flops": run.flops, "flops_6n": run.flops_6n,
            "budget": run.budget.label, "flops_vs_budget": run.flops / target - 1 if target else None,
            "est_s": (run.flops - run.flops * _prefix(run)) / rate if rate else None, "rate_source": source,
            "lr": run.lr, "seed": run.seed, "kind": kind,
        })
    return rows


def _prefix(run) -> float:
    """The share of a branch's FLOPs its parent has already spent (a branch runs only its cooldown)."""
    if not run.branch_of:
        return 0.0
    return int(run.config.train.branch_from.rsplit("/", 1)[1]) / run.steps


def print_plan_table(rows: list[dict], out=sys.stdout) -> None:
    header = ("run_id", "family", "N", "N_total", "shape", "steps", "tokens", "FLOPs", "vs budget", "6ND",
              "est.time", "lr", "seed", "kind")
    table = [header]
    for r in rows:
        delta = "" if r["flops_vs_budget"] is None else f"{100 * r['flops_vs_budget']:+.1f}%"
        table.append((r["run_id"], r["family"], f"{r['N']:,}", f"{r['N_total']:,}", r["shape"], str(r["steps"]),
                      f"{r['tokens']:,}", f"{r['flops']:.3g}", delta, f"{r['flops_6n']:.3g}",
                      format_seconds(r["est_s"]), f"{r['lr']:.4g}", str(r["seed"]), r["kind"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))),
              file=out)
    known = [r["est_s"] for r in rows if r["est_s"] is not None]
    sources = sorted({r["rate_source"] for r in rows})
    total = format_seconds(sum(known)) if len(known) == len(rows) else "? (no FLOP/s for some families)"
    print(f"{len(rows)} runs; FLOPs = training FLOPs per token (3 x analytic forward) x tokens; "
          f"est. time {total} (FLOP/s from: {', '.join(sources)})", file=out)
    loose = [r["run_id"] for r in rows if r["flops_vs_budget"] is not None and abs(r["flops_vs_budget"]) > 0.02]
    if loose:
        print(f"note: {len(loose)} runs are off their FLOP budget by more than 2 % (fewer than 25 steps, so the "
              f"rounding of steps shows): {', '.join(loose)}; raise the budget to match them closer", file=out)


def cmd_plan(args) -> int:
    spec, runs, sweep_dir = _load(args)
    if args.format == "ids":
        for run in runs:
            print(run.run_id)
        return 0
    rows = plan_rows(spec, runs, sweep_dir, args.flops_per_s)
    if args.format == "json":
        for row, run in zip(rows, runs):
            row["config"] = run.config.to_dict()
        print(json.dumps({"name": spec.name, "sweep_dir": str(sweep_dir), "runs": rows}, indent=1))
        return 0
    print_plan_table(rows)
    if waiting_for_grid(spec, runs):
        print("the main runs follow once these lr-grid runs are done: their lr comes from the rule fitted to "
              "the grid (lmu_jax/sweep/lr.py); `sweep run` runs both")
    return 0


# ------------------------------------------------------------------------------------ run, status


def cmd_run(args) -> int:
    from lmu_jax.sweep.runner import Stopped, run_sweep

    spec, runs, sweep_dir = _load(args)
    try:
        statuses = run_sweep(spec, runs, sweep_dir, only=args.only, progress=not args.no_progress)
        if waiting_for_grid(spec, runs) and args.only is None:
            runs = expand_in(spec, sweep_dir)  # the grid is done (or failed: then nothing new)
            if not waiting_for_grid(spec, runs):
                statuses = run_sweep(spec, runs, sweep_dir, progress=not args.no_progress)
    except (KeyboardInterrupt, Stopped) as err:
        print(f"stopped ({type(err).__name__}); the run in flight saved a checkpoint: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    failed = [s for s in statuses if s.state not in ("done", "running")]
    elsewhere = [s for s in statuses if s.state == "running"]
    print(f"{len(statuses) - len(failed) - len(elsewhere)}/{len(statuses)} runs done in {sweep_dir}"
          + (f"; {len(elsewhere)} running in another process" if elsewhere else "")
          + (f"; {len(failed)} failed: see `lmu-jax sweep status {args.spec}`" if failed else ""))
    return 1 if failed or elsewhere else 0


def status_lines(runs, sweep_dir) -> list[str]:
    from lmu_jax.sweep.runner import SweepDir, run_status

    sweep = SweepDir(sweep_dir)
    lines, counts = [], {}
    for run in runs:
        status = run_status(sweep, run.run_id)
        counts[status.state] = counts.get(status.state, 0) + 1
        line = f"{run.run_id}  {run.family:<12} N={run.n_params:<10,} {status.state:<8} step {status.step}/{run.steps}"
        if status.attempts:
            line += f"  attempts {status.attempts}"
        if status.error:
            line += f"  error: {status.error.removeprefix('error: ')}"
        lines.append(line)
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + f"  ({sweep_dir})")
    return lines


def cmd_status(args) -> int:
    _, runs, sweep_dir = _load(args)
    for line in status_lines(runs, sweep_dir):
        print(line)
    return 0


def cmd_collect(args) -> int:
    from lmu_jax.sweep.collect import collect

    _, _, sweep_dir = _load(args)
    if not sweep_dir.is_dir():
        raise UserError(f"--sweep-dir {sweep_dir} does not exist; run `lmu-jax sweep run {args.spec}` first")
    result = collect(sweep_dir)
    print(f"{len(result['rows'])} finished runs -> {result['csv']} and {result['json']}"
          + (f"; {len(result['missing'])} not finished" if result["missing"] else ""))
    return 0


def _numbers(field: str, text: str, count: int, sep: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(sep)]
    except ValueError:
        values = []
    if len(values) != count or not all(v > 0 and math.isfinite(v) for v in values):
        raise UserError(f"{field}={text!r} is invalid: {count} positive numbers separated by {sep!r}")
    return values


def cmd_design(args) -> int:
    from lmu_jax import storage
    from lmu_jax.config import read_yaml
    from lmu_jax.models import FAMILIES
    from lmu_jax.sweep.design import budgets_between, design, print_design, write_design

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for family in families or [""]:
        if family not in FAMILIES:
            raise UserError(f"--families={args.families!r} is invalid: families among {', '.join(sorted(FAMILIES))}")
    low, high = _numbers("--flops", args.flops, 2, ":")
    prior = tuple(_numbers("--prior", args.prior, 2, ",")) if args.prior else None
    sweep_dir = storage.path(args.sweep_dir, "--sweep-dir") if args.sweep_dir else None
    base = read_yaml(args.base) if args.base else {}
    base.pop("model", None)  # sizing sets the shape; the family comes from --families
    raw, rows = design(families, low, high, args.hours, base=base, flops_per_s=args.flops_per_s,
                       sweep_dir=sweep_dir, prior=prior, sizes_per_budget=args.sizes_per_budget,
                       max_epochs=args.max_epochs, name=args.name or Path(args.out).stem)
    write_design(args.out, raw)
    print_design(raw, rows, prior)
    dropped = [c for c in budgets_between(low, high) if c not in raw["budgets"]["flops"]]
    if dropped:
        print(f"left out to fit in --hours={args.hours:g}: the budgets {', '.join(f'{c:.3g}' for c in dropped)} FLOPs")
    if len(raw["budgets"]["flops"]) < 3:
        print(f"note: {len(raw['budgets']['flops'])} budget(s) bracket N_opt but fix no exponent N_opt ~ C^a, which "
              "needs >= 3 budgets (docs/scaling.md, 'Designing a study'): widen --flops or raise --hours")
    print(f"wrote {args.out}; `lmu-jax sweep run {args.out}` runs it")
    return 0
