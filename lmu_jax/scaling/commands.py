"""``lmu-jax fit``: fit a scaling law to a sweep's tidy table, per family.

    lmu-jax fit TABLE.csv --law chinchilla|kaplan-n|kaplan-d|frontier|isoflop [--family NAME]
                [--holdout top-budget|top-size] [--bootstrap K] [--seed S] [--drop-highest K]
                [--starts K] [--predict C] [--json OUT]

The table is a CSV with a header. Columns (aliases in brackets, so Epoch's Chinchilla file works):
``family`` (optional; absent: one family "all"), ``N`` [``Model Size``], ``D``, ``C``
[``Training FLOP``] and ``val_loss`` [``loss``]. A missing D is C / (6 N); a missing C is 6 N D.

Which points each law uses, per family, after ``--drop-highest K`` removed that family's K
highest-loss rows:
- ``chinchilla``: every row, L(N, D) = E + A/N^alpha + B/D^beta;
- ``kaplan-n``: the lowest-loss row of each distinct N, L(N) = E + A N^-alpha;
- ``kaplan-d``: the lowest-loss row of each distinct D, L(D) = E + A D^-alpha;
- ``frontier``: the lower envelope of (C, loss), L(C) = E + A C^-alpha;
- ``isoflop``: every row; per FLOP budget with >= 3 sizes a robust parabola of loss in log N (and
  log D) gives N_opt, D_opt, L_opt; across budgets N_opt = G C^a, D_opt = G' C^b, L_opt = K C^-gamma.

Every fit says whether its constants are identified and, when not, why (one sentence per failed
check; docs/scaling.md explains them). ``--holdout`` fits without the largest budget's (or size's)
runs and predicts them with intervals. ``--bootstrap`` defaults to 0 (none) for a plain fit, 200 for
isoflop and 100 with --holdout. ``--predict C`` (isoflop) extrapolates the lines to a budget C not
yet run: N_opt, D_opt and L_opt there with bootstrap intervals; written (``--json``) and committed
before C is run, it is a pre-registered prediction. Extra columns (run_id, seed, ...) are ignored.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

import numpy as np

from lmu_jax.errors import UserError, bad_value
from lmu_jax.scaling.fit import fit_chinchilla, fit_power_law, lower_envelope
from lmu_jax.scaling.isoflop import fit_isoflop
from lmu_jax.scaling.rollout import HOLDOUTS, rollout

LAWS = ("chinchilla", "kaplan-n", "kaplan-d", "frontier", "isoflop")
DEFAULT_BOOTSTRAP = {"isoflop": 200, "holdout": 100}
COLUMN_ALIASES = {"N": ("N", "Model Size"), "D": ("D",), "C": ("C", "Training FLOP"), "loss": ("val_loss", "loss")}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="fit a scaling law (Chinchilla L(N, D), Kaplan L(N), L(D), compute frontier) to a CSV table",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("table", help="CSV with columns family, N, D, C, val_loss (or Model Size, Training FLOP, loss)")
    parser.add_argument("--law", required=True, help=f"one of {', '.join(LAWS)}")
    parser.add_argument("--family", help="fit only this family (default: each family in the table)")
    parser.add_argument("--holdout", help=f"fit without these runs and predict them: one of {', '.join(HOLDOUTS)}")
    parser.add_argument("--bootstrap", type=int, help="resamples for intervals (default 0: none; isoflop 200; "
                        "--holdout 100)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--drop-highest", type=int, default=0, help="drop each family's K highest-loss rows")
    parser.add_argument("--starts", type=int, help="run only the K grid starts with the lowest initial objective")
    parser.add_argument("--predict", type=float, metavar="C", help="isoflop: predict N_opt, D_opt, L_opt at "
                        "this FLOP budget, with intervals")
    parser.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    parser.set_defaults(func=run_fit)


def read_table(path: str) -> dict:
    """The CSV as ``{"family": [...], "N"/"D"/"C"/"loss": float arrays or None when absent}``."""
    if not os.path.isfile(path):
        raise bad_value("TABLE", path, "an existing CSV file")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
        header = list(rows[0].keys()) if rows else []
    if not rows:
        raise bad_value("TABLE", path, "a CSV with a header row and at least one data row")
    table = {"family": [row.get("family") or "all" for row in rows]}
    for name, aliases in COLUMN_ALIASES.items():
        column = next((alias for alias in aliases if alias in header), None)
        table[name] = None if column is None else _numbers(rows, column)
    if table["loss"] is None or table["N"] is None:
        raise bad_value("columns", header, "needs val_loss (or loss) and N (or Model Size), plus D and/or C")
    if table["D"] is None and table["C"] is not None:
        table["D"] = table["C"] / (6.0 * table["N"])
    if table["C"] is None and table["D"] is not None:
        table["C"] = 6.0 * table["N"] * table["D"]
    return table


def _numbers(rows, column) -> np.ndarray:
    values = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            value = float(row[column])
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise bad_value(f"{column} (line {line})", row[column], "a finite number > 0")
        values.append(value)
    return np.array(values)


def points_for_law(law: str, N, D, C, loss) -> tuple[np.ndarray, str]:
    """Indices of the rows the law is fitted to, and a few words saying which they are."""
    if law in ("chinchilla", "isoflop"):
        return np.arange(len(loss)), "all rows"
    if law == "frontier":
        return lower_envelope(C, loss), "lower envelope of (C, loss)"
    by = N if law == "kaplan-n" else D
    best = {}
    for i in np.argsort(loss, kind="stable")[::-1]:  # lowest loss written last, so it stays
        best[by[i]] = i
    return np.array(sorted(best.values())), f"lowest loss per distinct {'N' if law == 'kaplan-n' else 'D'}"


def fit_family(law, N, D, C, loss, *, bootstrap, seed, max_starts, holdout=None):
    """The fit for one family's rows (already selected by ``points_for_law``), or its rollout."""
    if holdout is not None:
        return rollout(law, N, D, C, loss, holdout=holdout, bootstrap=bootstrap, seed=seed, max_starts=max_starts)
    if law == "isoflop":
        return fit_isoflop(N, D, C, loss, bootstrap=bootstrap, seed=seed)
    options = dict(bootstrap=bootstrap, seed=seed, max_starts=max_starts)
    if law == "chinchilla":
        return fit_chinchilla(N, D, loss, **options)
    x = {"kaplan-n": N, "kaplan-d": D, "frontier": C}[law]
    return fit_power_law(x, loss, **options)


def run_fit(args) -> int:
    if args.law not in LAWS:
        raise bad_value("--law", args.law, f"one of {', '.join(LAWS)}")
    if args.holdout is not None and args.holdout not in HOLDOUTS:
        raise bad_value("--holdout", args.holdout, f"one of {', '.join(HOLDOUTS)}")
    if args.holdout is not None and args.law == "isoflop":
        raise bad_value("--holdout", args.holdout, "works with --law chinchilla, kaplan-n, kaplan-d or frontier")
    if args.predict is not None and (args.law != "isoflop" or not args.predict > 0):
        raise bad_value("--predict", args.predict, "a FLOP budget > 0, with --law isoflop")
    if args.bootstrap is None:
        args.bootstrap = DEFAULT_BOOTSTRAP.get("holdout" if args.holdout else args.law, 0)
    for name in ("bootstrap", "drop_highest"):
        if getattr(args, name) < 0:
            raise bad_value(f"--{name.replace('_', '-')}", getattr(args, name), "an integer >= 0")
    if args.starts is not None and args.starts < 1:
        raise bad_value("--starts", args.starts, "an integer >= 1 (default: every grid start)")
    table = read_table(args.table)
    needed = {"chinchilla": "D", "kaplan-d": "D", "frontier": "C", "isoflop": "C"}.get(args.law)
    if needed and table[needed] is None:
        raise bad_value("columns", "no D and no C", f"--law {args.law} needs D or C (with N)")
    families = list(dict.fromkeys(table["family"]))
    if args.family is not None:
        if args.family not in families:
            raise bad_value("--family", args.family, f"one of {', '.join(families)}")
        families = [args.family]

    results = []
    for family in families:
        rows = np.flatnonzero(np.array(table["family"]) == family)
        n_rows = len(rows)
        if args.drop_highest:
            rows = np.sort(rows[np.argsort(table["loss"][rows], kind="stable")[: max(n_rows - args.drop_highest, 0)]])
        columns = {name: (None if table[name] is None else table[name][rows]) for name in ("N", "D", "C", "loss")}
        chosen, which = points_for_law(args.law, **columns)
        picked = {name: (None if values is None else values[chosen]) for name, values in columns.items()}
        try:
            fit = fit_family(args.law, **picked, bootstrap=args.bootstrap, seed=args.seed, max_starts=args.starts,
                             holdout=args.holdout)
        except UserError as err:
            raise UserError(f"family {family!r}: {err}") from None
        head = {"family": family, "law": args.law, "rows": n_rows, "dropped_highest": min(args.drop_highest, n_rows),
                "points": len(chosen), "points_used": which, "bootstrap": args.bootstrap, "seed": args.seed}
        if args.holdout:
            results.append(head | rollout_result(fit, picked))
        elif args.law == "isoflop":
            results.append(head | isoflop_result(fit, args.predict))
        else:
            results.append(head | law_result(fit, args.law))
    print(format_results(results))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(_plain(results), handle, indent=2)
            handle.write("\n")
    return 0


def _plain(value):
    """JSON-ready copy: numpy scalars as Python numbers, NaN (no bootstrap) as null."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def law_result(fit, law) -> dict:
    return {
        "constants": fit.params,
        "stderr": fit.stderr,
        "ci": fit.ci,
        "objective": fit.objective,
        "converged": fit.converged,
        "message": fit.message,
        "grad_norm": fit.grad_norm,
        "starts": fit.n_starts,
        "starts_agree": fit.n_starts_agree,
        "identified": fit.identified,
        "warnings": fit.warnings,
        **({"a": fit.a, "b": fit.b} if law == "chinchilla" else {"x_c": fit.x_c}),
    }


def isoflop_result(fit, predict: float | None = None) -> dict:
    budgets = [{"C": b.C, "sizes": len(np.unique(b.N[b.fitted])), "runs": int(b.fitted.sum()),
                "outside_window": int((~b.fitted).sum()), "N_opt": b.N_opt, "D_opt": b.D_opt,
                "L_opt": b.L_opt, "ci": b.ci, "bracketed": b.bracketed, "flag": b.flag} for b in fit.budgets]
    return {"isoflop": {"budgets": budgets, "a": fit.a, "G": fit.G, "b": fit.b, "G_D": fit.G_D, "gamma": fit.gamma,
                        "K": fit.K, "ci": fit.ci, "bootstrap_used": fit.bootstrap_used},
            "identified": fit.identified, "warnings": fit.warnings,
            **({"prediction": {"C": predict, "ci_level": fit.ci_level, "identified": fit.identified,
                               **{name: {"value": v, "lo": lo, "hi": hi}
                                  for name, (v, lo, hi) in fit.predict(predict).items()}}}
               if predict and math.isfinite(fit.a) else {})}


def rollout_result(result, picked) -> dict:
    held = result.held
    predictions = [{"N": picked["N"][i], "D": None if picked["D"] is None else picked["D"][i],
                    "C": None if picked["C"] is None else picked["C"][i], "measured": result.measured[k],
                    "predicted": result.predicted[k], "lo": result.lo[k], "hi": result.hi[k],
                    "error": result.error[k], "inside": bool(result.inside[k])} for k, i in enumerate(held)]
    return {"holdout": result.holdout, "fit_points": result.fit.n_points, "ci_level": result.ci_level,
            "constants": result.fit.params, "identified": result.fit.identified, "warnings": result.fit.warnings,
            "predictions": predictions}


def _interval(ci, name, digits=".4g") -> str:
    lo, hi = ci.get(name, (math.nan, math.nan))
    return "" if not math.isfinite(lo) else f" [{lo:{digits}}, {hi:{digits}}]"


def _identification_lines(result) -> list[str]:
    if result["identified"]:
        checked = "" if result["bootstrap"] else " (intervals not checked: no bootstrap)"
        return [f"  identified: yes{checked}"]
    return ["  identified: NO, not a law to extrapolate:"] + [f"    - {w}" for w in result["warnings"]]


def format_results(results) -> str:
    """One block per family: which points, the constants (or optima, or predictions), identification."""
    lines = []
    for result in results:
        dropped = f", {result['dropped_highest']} highest-loss dropped" if result["dropped_highest"] else ""
        lines.append(
            f"{result['family']}: {result['law']} on {result['points']} points "
            f"({result['points_used']}; {result['rows']} rows{dropped})"
        )
        if "holdout" in result:
            lines += _rollout_lines(result)
        elif "isoflop" in result:
            lines += _isoflop_lines(result)
        else:
            lines += _law_lines(result)
        lines += _identification_lines(result)
    return "\n".join(lines)


def _law_lines(result) -> list[str]:
    lines = []
    for name, value in result["constants"].items():
        stderr = result["stderr"][name]
        error = "" if math.isnan(stderr) else f" ± {stderr:.4g}"
        lines.append(f"  {name:>6} = {value:.6g}{error}")
    if "a" in result:
        stderr = result["stderr"].get("a", math.nan)
        error = "" if math.isnan(stderr) else f" ± {stderr:.4f}"
        lines.append(f"  a = beta/(alpha+beta) = {result['a']:.4f}{error} (N_opt ∝ C^a), b = {result['b']:.4f}")
    status = "converged" if result["converged"] else "NOT CONVERGED"
    lines.append(
        f"  objective {result['objective']:.6g}, {status} ({result['message']}), |grad| {result['grad_norm']:.2g}, "
        f"{result['starts_agree']}/{result['starts']} starts agree"
        + (f", bootstrap {result['bootstrap']} (seed {result['seed']})" if result["bootstrap"] else "")
    )
    return lines


def _isoflop_lines(result) -> list[str]:
    iso = result["isoflop"]
    lines = []
    for b in iso["budgets"]:
        place = "bracketed" if b["bracketed"] else "NOT bracketed, left out of the exponents"
        outside = f" (+{b['outside_window']} outside the window)" if b["outside_window"] else ""
        lines.append(f"  C = {b['C']:.3g}: {b['sizes']} sizes, {b['runs']} runs{outside}, {place}")
        if b["bracketed"]:  # an unbracketed minimum is an extrapolation: only its flag is printed
            lines.append(f"    N_opt = {b['N_opt']:.4g}{_interval(b['ci'], 'N_opt')}, D_opt = {b['D_opt']:.4g}"
                         f"{_interval(b['ci'], 'D_opt')}, L_opt = {b['L_opt']:.4f}{_interval(b['ci'], 'L_opt')}")
        if b["flag"]:
            lines.append(f"    {b['flag']}")
    if math.isfinite(iso["a"]):
        lines.append(f"  N_opt = {iso['G']:.4g}·C^a, a = {iso['a']:.4f}{_interval(iso['ci'], 'a')} "
                     "(Chinchilla: a ≈ 0.50)")
        lines.append(f"  D_opt = {iso['G_D']:.4g}·C^b, b = {iso['b']:.4f}{_interval(iso['ci'], 'b')}")
        lines.append(f"  L_opt = {iso['K']:.4g}·C^-gamma, gamma = {iso['gamma']:.4f}{_interval(iso['ci'], 'gamma')}")
    if result["bootstrap"]:
        lines.append(f"  bootstrap {result['bootstrap']} (seed {result['seed']}), {iso['bootstrap_used']} usable "
                     "for the exponents")
    if "prediction" in result:
        p = result["prediction"]
        caveat = "" if p["identified"] else " (from a fit that is NOT identified: see above)"
        lines.append(f"  prediction at C = {p['C']:.3g}{caveat}: " + ", ".join(
            f"{name} = {p[name]['value']:.4g}{_interval({name: (p[name]['lo'], p[name]['hi'])}, name)}"
            for name in ("N_opt", "D_opt", "L_opt")))
    return lines


def _rollout_lines(result) -> list[str]:
    level = f"{100 * result['ci_level']:.0f} %"
    lines = [f"  fitted on {result['fit_points']} points without {result['holdout']}; "
             f"held out {len(result['predictions'])}, each predicted with its {level} interval:",
             f"  {'N':>12} {'D':>12} {'measured':>9} {'predicted':>9} {'interval':>19} {'error':>7}  inside"]
    for p in result["predictions"]:
        D = "" if p["D"] is None else f"{p['D']:.4g}"
        lines.append(f"  {p['N']:>12.4g} {D:>12} {p['measured']:>9.4f} {p['predicted']:>9.4f} "
                     f"{'[' + format(p['lo'], '.4f') + ', ' + format(p['hi'], '.4f') + ']':>19} "
                     f"{100 * p['error']:>+6.1f}%  {'yes' if p['inside'] else 'NO'}")
    inside = sum(p["inside"] for p in result["predictions"])
    lines.append(f"  {inside} of {len(result['predictions'])} inside their {level} intervals")
    return lines
