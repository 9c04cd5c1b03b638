"""`lmu-jax demo` (what `make demo` runs): transformer, LSTM and LMU x 3 sizes at matched FLOPs, byte-level,
then the report. Sized to finish in about 10 minutes on a 2-core CPU.

The corpus is the King James Bible (`kjv`, Debian's bible-kjv) when it is installed, else the Python
standard library's sources (`pystdlib`, always present), with a notice. Rerunning resumes: finished runs
are skipped, a partial one continues from its last checkpoint. ``--quick`` (or LMU_JAX_DEMO_QUICK=1)
shrinks everything to a smoke test of about a minute.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

FAMILIES = ["transformer", "lstm", "lmu"]

# The full demo. At one FLOP budget every run costs the same training FLOPs; the ladder spans ~8x in N.
DEMO = {
    "sizes": [25_000, 70_000, 200_000],
    "budget": 4.0e11,
    "data": {"seq_len": 128, "val_windows": 64},
    "train": {"batch_size": 16},
}
# --quick: a smoke test of the whole path (plan, 9 runs, collect, fits, figures, report)
QUICK = {
    "sizes": [5_000, 10_000, 20_000],
    "budget": 3.0e9,
    "data": {"seq_len": 32, "val_windows": 8, "max_bytes": 200_000},
    "train": {"batch_size": 8},
}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job: 3 families x 3 sizes at matched FLOPs, then a report")
    p.add_argument("--out", default="runs/demo", help="sweep directory (rerunning resumes it)")
    p.add_argument("--quick", action="store_true", default=bool(os.environ.get("LMU_JAX_DEMO_QUICK")),
                   help="a tiny budget: checks the whole path in about a minute")
    p.add_argument("--corpus", help="override the corpus (default: kjv if installed, else pystdlib)")
    p.add_argument("--cache-dir", help="data cache (default: the config default, ~/.cache/lmu_jax)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)


def default_corpus() -> str:
    if shutil.which("bible"):  # how lmu_jax.data.corpora reads kjv
        return "kjv"
    print("notice: the King James Bible (Debian package bible-kjv) is not installed; the demo uses the "
          "Python standard library's sources (corpus pystdlib) instead. `apt-get install bible-kjv` for kjv.",
          file=sys.stderr)
    return "pystdlib"


def demo_spec(corpus: str, quick: bool = False, cache_dir: str | None = None) -> dict:
    """The demo as a sweep spec (written to <out>/spec.yaml like any other sweep)."""
    size = QUICK if quick else DEMO
    data = {"corpus": corpus, "tokenizer": "byte", **size["data"]}
    if corpus == "pystdlib" and "max_bytes" not in data:
        data["max_bytes"] = 4_000_000  # about the size of the KJV; tokenizing all 12+ MB buys nothing here
    if cache_dir:
        data["cache_dir"] = cache_dir
    return {
        "name": "demo-quick" if quick else "demo",
        "description": ("Transformer, LSTM and LMU at three sizes each, every run with the same training-FLOP "
                        f"budget, byte-level {corpus}."),
        "families": FAMILIES,
        "sizes": size["sizes"],
        "budgets": {"flops": [size["budget"]]},
        "warmup_fraction": 0.05,
        "evals_per_run": 4,
        "family_overrides": {  # transformer aspect d_model / n_layers = 32: the small ladder gets 1 to 3
            # layers. Peak lr per family: the best at ~50 k parameters (experiments/results/cpu_scaling_kjv/lr_check.md)
            "transformer": {"model": {"d_model": 64, "n_layers": 2}, "optim": {"lr": 3.0e-3}},
            "lstm": {"optim": {"lr": 2.0e-2}},
            "lmu": {"optim": {"lr": 1.0e-2}},
        },
        "base": {
            "data": data,
            "optim": {"lr": 3.0e-3, "schedule": "cosine", "min_lr_ratio": 0.1},
            "train": {**size["train"]},
            "checkpoint": {"every": 100, "keep": 1},
        },
    }


def cmd_demo(args) -> int:
    from lmu_jax.report.report import build_report
    from lmu_jax.sweep.commands import plan_rows, print_plan_table
    from lmu_jax.sweep.runner import Stopped, run_sweep
    from lmu_jax.sweep.spec import expand, parse_spec

    started = time.perf_counter()
    corpus = args.corpus or default_corpus()
    spec = parse_spec(demo_spec(corpus, args.quick, args.cache_dir))
    runs = expand(spec)
    out = Path(args.out)
    print(f"demo: {len(runs)} runs at {spec.budgets[0].label} each, corpus {corpus}, in {out}")
    print_plan_table(plan_rows(spec, runs, out))
    try:
        statuses = run_sweep(spec, runs, out, progress=not args.no_progress)
    except (KeyboardInterrupt, Stopped) as err:
        print(f"demo stopped ({type(err).__name__}); run it again to resume", file=sys.stderr)
        return 130
    failed = [s for s in statuses if s.state != "done"]
    for status in failed:
        print(f"run {status.run_id} failed: {status.error} (log: {out / 'runs' / status.run_id / 'train.log'})",
              file=sys.stderr)
    if len(failed) == len(statuses):
        print("demo: every run failed; no report", file=sys.stderr)
        return 1
    written = build_report(out)
    print(f"demo finished in {time.perf_counter() - started:.0f} s; {len(statuses) - len(failed)}/{len(statuses)} "
          f"runs done")
    print(f"report: {written['html'].resolve()}")
    print(f"        {written['markdown'].resolve()}")
    return 1 if failed else 0
