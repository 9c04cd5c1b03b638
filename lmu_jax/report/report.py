"""`lmu-jax report SWEEP_DIR`: fits, the comparisons the papers make, figures, report.md + report.html.

What it fits (every fit uses final validation losses of horizon-matched runs only, the valid (N, D)
points of docs/scaling.md, and the report lists the runs each fit used):

- L(N) per family and *token* budget (every run sees the same D, the LMU paper's setting):
  ``fit_power_law(N, loss)``, E fitted with >= 4 sizes, else Kaplan's pure form (E = 0) with 3. The
  runs of one FLOP budget form an isoFLOP profile, which is not a power law in N: drawn, not fitted;
- L(C) per family: the compute frontier (lower envelope of the best run per FLOP budget and the runs
  of token budgets) and a power law fitted to it, when the envelope has >= 3 points;
- L(N, D) per family: ``fit_chinchilla`` when the family has >= 6 runs at several N and D; its
  D -> infinity limit E + A/N^alpha is drawn on the L(N) figure. The same law is refitted without the
  largest budget's runs and without the largest size's, and predicts them (``scaling.rollout``);
- isoFLOP analysis per family (``scaling.isoflop``): N_opt, D_opt, L_opt per FLOP budget with >= 3
  sizes, and their power laws in C across the budgets whose minimum the ladder brackets; a prediction
  written before a budget was run (``report.prediction``) beside what that budget measured.

Every fit carries ``identified`` and ``warnings``; a fit that is not identified is labelled so and
never drawn as a law, and no fitted curve is drawn past 2x the range of its data.

Comparisons (``lmu_jax.scaling.compare``): loss at equal FLOPs per budget; data efficiency (the
tokens one family needs to reach another's final loss at the same N: the LMU paper's "10x");
per-position loss (Fig. 4); and the LMU paper's published fits as reference lines.
"""

from __future__ import annotations

import html
import math
import re
import shutil
import tempfile
import time

import numpy as np
import yaml

from lmu_jax import storage
from lmu_jax.errors import UserError
from lmu_jax.report import plots
from lmu_jax.report.claims import claims_sections
from lmu_jax.report.noise import family_floors, main_runs, noise_sections, seed_stats
from lmu_jax.report.prediction import prediction_sections
from lmu_jax.report.runs import budgets_in_order, load_results
from lmu_jax.report.stability import flagged, run_spikes, stability_sections

DEFAULT_BOOTSTRAP = 200


# ------------------------------------------------------------------------------------------- fits


def _fit_entry(kind, family, scope, runs, attempt):
    """Run one fit; a fit the points cannot support becomes a row saying why, not an exception."""
    entry = {"kind": kind, "family": family, "scope": scope, "run_ids": [r.row["run_id"] for r in runs],
             "fit": None, "reason": ""}
    try:
        entry["fit"] = attempt()
    except UserError as err:
        entry["reason"] = str(err)
    return entry


def frontier_candidates(runs) -> list:
    """Runs that can sit on a compute frontier: the best of each FLOP budget (the others of that budget
    cost the same up to step rounding, so they are no separate compute points), and every run of a
    token budget (whose runs differ in compute)."""
    best: dict = {}
    for r in runs:
        if r.row["budget_kind"] == "tokens":
            best[r.row["run_id"]] = r
        elif r.budget_key not in best or r.val_loss < best[r.budget_key].val_loss:
            best[r.budget_key] = r
    return sorted(best.values(), key=lambda r: r.C)


def fit_sweep(results, bootstrap: int = DEFAULT_BOOTSTRAP, chinchilla_grid=None) -> dict:
    """Every fit the sweep's points support, per family; see the module docstring for which and why.

    ``chinchilla_grid``: starts for ``fit_chinchilla`` (default: its own, Hoffmann's 4500 starts, about
    10 s per family on one CPU core).
    """
    from lmu_jax.scaling.fit import fit_chinchilla, fit_power_law, frontier, lower_envelope
    from lmu_jax.scaling.isoflop import fit_isoflop
    from lmu_jax.scaling.rollout import HOLDOUTS

    by_family: dict = {}
    for r in results:
        by_family.setdefault(r.family, []).append(r)
    l_of_n, l_of_c, l_of_nd, frontiers, isoflops, rollouts = [], [], [], {}, [], []
    for family, runs in by_family.items():
        # L(N) at a fixed token budget (the LMU paper's setting). At a fixed FLOP budget the runs form an
        # isoFLOP profile, E + A/N^alpha + B (6N/C)^beta, which is no power law in N: not fitted.
        for budget in budgets_in_order(r for r in runs if r.row["budget_kind"] == "tokens"):
            points = sorted((r for r in runs if r.budget_key == budget), key=lambda r: r.N)
            if len({r.N for r in points}) < 3:
                continue
            free_E = len(points) >= 4
            entry = _fit_entry(
                "L(N)" if free_E else "L(N), E = 0", family, budget, points,
                lambda: fit_power_law([r.N for r in points], [r.val_loss for r in points],
                                      E=None if free_E else 0.0, bootstrap=bootstrap))
            entry["N"] = [r.N for r in points]
            l_of_n.append(entry)

        candidates = frontier_candidates(runs)
        compute = np.array([r.C for r in candidates])
        loss = np.array([r.val_loss for r in candidates])
        envelope = lower_envelope(compute, loss)
        front = {"C": compute[envelope], "loss": loss[envelope], "fit": None}
        frontiers[family] = front
        if len(envelope) >= 3:
            free_E = len(envelope) >= 4
            entry = _fit_entry("L(C) frontier" if free_E else "L(C) frontier, E = 0", family, "frontier runs",
                               [candidates[i] for i in envelope],
                               lambda: frontier(compute, loss, E=None if free_E else 0.0, bootstrap=bootstrap).fit)
            front["fit"] = entry["fit"]
            l_of_c.append(entry)

        if len({r.N for r in runs}) >= 2 and len({r.D for r in runs}) >= 2 and len(runs) >= 6:
            entry = _fit_entry("L(N, D)", family, "all runs", runs,
                               lambda: fit_chinchilla([r.N for r in runs], [r.D for r in runs],
                                                      [r.val_loss for r in runs], grid=chinchilla_grid,
                                                      bootstrap=bootstrap))
            entry["N"] = [r.N for r in runs]
            l_of_nd.append(entry)
            rollouts += [_rollout_entry(family, runs, holdout, bootstrap, chinchilla_grid) for holdout in HOLDOUTS]

        profiles = [r for r in runs if r.row["budget_kind"] == "flops"]
        if any(len({r.N for r in profiles if r.budget_key == b}) >= 3 for b in {r.budget_key for r in profiles}):
            isoflops.append(_fit_entry("isoflop", family, "FLOP budgets", profiles, lambda: fit_isoflop(
                [r.N for r in profiles], [r.D for r in profiles], [r.C for r in profiles],
                [r.val_loss for r in profiles], budget=[r.budget_key for r in profiles], bootstrap=bootstrap)))
    return {"L(N)": l_of_n, "L(C)": l_of_c, "L(N, D)": l_of_nd, "frontiers": frontiers, "isoflop": isoflops,
            "rollout": rollouts}


def _rollout_entry(family, runs, holdout, bootstrap, chinchilla_grid):
    """L(N, D) fitted without the largest budget's (or size's) runs, predicting them."""
    from lmu_jax.scaling.rollout import rollout

    entry = _fit_entry(f"L(N, D), {holdout} held out", family, holdout, runs, lambda: rollout(
        "chinchilla", [r.N for r in runs], [r.D for r in runs], [r.C for r in runs], [r.val_loss for r in runs],
        holdout=holdout, bootstrap=max(bootstrap, 20), grid=chinchilla_grid))
    return entry | {"N": [r.N for r in runs], "D": [r.D for r in runs]}


# ------------------------------------------------------------------------------------ comparisons


def _ladder_size(r):
    return r.row["size"] or r.N  # the ladder target, or N for runs collected without plan.json


def _loss_at(r, c_star) -> float:
    """A run's validation loss at C*, read off its curve; its final loss when that is all there is (a
    directory of collected results without the runs: the budget's C differ only by step rounding)."""
    from lmu_jax.scaling.compare import loss_at_compute

    if len(r.eval_loss) < 2:
        return r.val_loss
    return float(loss_at_compute(r.eval_flops, r.eval_loss, [c_star])[0])


def equal_flops_table(results) -> list[dict]:
    """Per budget and ladder size: each family's validation loss at exactly the same training FLOPs.

    The runs of a budget differ in FLOPs only by the rounding of their steps (<= 0.5/steps); each run's
    validation curve is read at C* = the smallest final C of the group (``compare.loss_at_compute``,
    log-log between evaluations), which removes that difference. A "best" row gives each family's
    lowest loss at C* over its sizes. Runs of several seeds give their mean (``seeds``: each seed's loss);
    cooldown branches are points of their own C and are left out.
    """
    from lmu_jax.scaling.compare import loss_at_compute

    rows = []
    results = main_runs(results)
    for budget in budgets_in_order(results):
        runs = [r for r in results if r.budget_key == budget]
        c_star = min(r.C for r in runs)
        at_c = {id(r): _loss_at(r, c_star) for r in runs}
        for size in sorted({_ladder_size(r) for r in runs}):
            row = {"budget": budget, "C": c_star, "size": size, "loss": {}, "N": {}, "seeds": {}}
            for r in runs:
                if _ladder_size(r) == size:
                    row["seeds"].setdefault(r.family, []).append(at_c[id(r)])
                    row["loss"][r.family], row["N"][r.family] = float(np.mean(row["seeds"][r.family])), r.N
            rows.append(row)
        best = {"budget": budget, "C": c_star, "size": "best", "loss": {}, "N": {}}
        for row in [row for row in rows if row["budget"] == budget]:  # the sizes' seed means
            for family, loss in row["loss"].items():
                if math.isfinite(loss) and loss < best["loss"].get(family, math.inf):
                    best["loss"][family], best["N"][family] = loss, row["N"][family]
        rows.append(best)
    return rows


def data_efficiency_table(results) -> list[dict]:
    """For each budget, ladder size and ordered pair of families (X, Y): tokens X needs to reach Y's loss.

    ``compare.data_efficiency`` on the validation curves (evaluations during training and the final
    one): the target is Y's final validation loss, X's tokens come from log-log interpolation of its
    curve. ratio = D_Y / D_X > 1 means X is more data-efficient (the LMU paper's "10x": the LMU at 13B
    tokens matches the transformer at 130B).
    """
    from lmu_jax.scaling.compare import data_efficiency

    rows = []
    groups: dict = {}
    for r in main_runs(results):
        groups.setdefault((r.budget_key, _ladder_size(r)), []).append(r)
    budget_rank = {b: i for i, b in enumerate(budgets_in_order(results))}
    for (budget, size), runs in sorted(groups.items(), key=lambda kv: (budget_rank[kv[0][0]], kv[0][1])):
        for x in runs:
            for y in runs:
                if x.family == y.family or x.row.get("seed") != y.row.get("seed"):  # seeds pair up
                    continue
                result = data_efficiency(x.eval_tokens, x.eval_loss, y.eval_tokens, y.eval_loss)
                rows.append({"budget": budget, "size": size, "x": x.family, "y": y.family, "N_x": x.N, "N_y": y.N,
                             "seed": x.row.get("seed"),
                             "target": result.target_loss, "tokens_x": result.tokens_x, "tokens_y": result.tokens_y,
                             "ratio": result.ratio, "reason": result.reason})
    return rows


# ------------------------------------------------------------------------------------------ writing


def _fmt(value, digits=4) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def _pm(fit, name) -> str:
    value, err = getattr(fit, name), fit.stderr.get(name, float("nan"))
    return f"{value:.4g} ± {err:.2g}" if math.isfinite(err) else f"{value:.4g}"


def fit_rows(fits: dict) -> tuple[list[str], list[list[str]]]:
    header = ["fit", "family", "points", "E", "A", "alpha", "B", "beta", "converged", "objective", "identified",
              "runs used"]
    rows = []
    for kind in ("L(N)", "L(C)", "L(N, D)"):
        for entry in fits[kind]:
            fit = entry["fit"]
            used = f"{len(entry['run_ids'])} ({entry['scope']}): " + ", ".join(entry["run_ids"])
            if fit is None:
                rows.append([entry["kind"], entry["family"], str(len(entry["run_ids"])), "not fitted: " + entry["reason"],
                             "", "", "", "", "", "", "", used])
                continue
            chinchilla = hasattr(fit, "beta")
            rows.append([entry["kind"], entry["family"], str(fit.n_points), _pm(fit, "E"), _pm(fit, "A"),
                         _pm(fit, "alpha"), _pm(fit, "B") if chinchilla else "", _pm(fit, "beta") if chinchilla else "",
                         "yes" if fit.converged else f"NO ({fit.message})", f"{fit.objective:.3g}",
                         "yes" if fit.identified else "not identified: " + " ".join(fit.warnings), used])
    return header, rows


def not_identified_text(fits: dict) -> str:
    """One sentence per fit that is not identified, with its first reason; "" when every fit is."""
    failed = [entry for kind in ("L(N)", "L(C)", "L(N, D)", "isoflop") for entry in fits.get(kind, [])
              if entry["fit"] is not None and not entry["fit"].identified]
    if not failed:
        return ""
    reasons = " ".join(f"{plots.label(e['family'])} {e['kind']}: {e['fit'].warnings[0]}" for e in failed)
    return (f"Not identified, so not drawn as laws in any figure ({len(failed)} fits; the table gives every "
            f"reason): {reasons}")


def _interval(ci, name) -> str:
    lo, hi = ci.get(name, (math.nan, math.nan))
    return f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) else ""


def isoflop_rows(fits: dict) -> tuple[list[str], list[list[str]]]:
    header = ["family", "C", "sizes", "runs", "N_opt [interval]", "D_opt [interval]", "tokens per parameter",
              "L_opt [interval]", "in the exponents"]
    rows = []
    for entry in fits["isoflop"]:
        if entry["fit"] is None:
            rows.append([plots.label(entry["family"]), "not fitted: " + entry["reason"], *[""] * 7])
            continue
        for b in entry["fit"].budgets:  # an unbracketed minimum is an extrapolation: not shown
            optima = ([f"{_fmt(b.N_opt, 3)}{_interval(b.ci, 'N_opt')}", f"{_fmt(b.D_opt, 3)}{_interval(b.ci, 'D_opt')}",
                       f"{b.D_opt / b.N_opt:.0f}", f"{_fmt(b.L_opt)}{_interval(b.ci, 'L_opt')}"]
                      if b.bracketed else ["–"] * 4)
            outside = int((~b.fitted).sum())
            rows.append([plots.label(entry["family"]), f"{b.C:.3g}", str(len(set(b.N[b.fitted].tolist()))),
                         f"{int(b.fitted.sum())}" + (f" (+{outside} outside)" if outside else ""),
                         *optima, "yes" if b.bracketed else "no: " + b.flag])
    return header, rows


def isoflop_exponent_rows(fits: dict) -> tuple[list[str], list[list[str]]]:
    header = ["family", "budgets used", "a (N_opt ∝ C^a)", "b (D_opt ∝ C^b)", "gamma (L_opt ∝ C^-gamma)", "identified"]
    rows = []
    for entry in fits["isoflop"]:
        fit = entry["fit"]
        if fit is None:
            continue
        rows.append([plots.label(entry["family"]), f"{len(fit.used)} of {len(fit.budgets)}",
                     f"{_fmt(fit.a)}{_interval(fit.ci, 'a')}", f"{_fmt(fit.b)}{_interval(fit.ci, 'b')}",
                     f"{_fmt(fit.gamma)}{_interval(fit.ci, 'gamma')}",
                     "yes" if fit.identified else "not identified: " + " ".join(fit.warnings)])
    return header, rows


def rollout_rows(fits: dict) -> tuple[list[str], list[list[str]]]:
    header = ["family", "held out", "fitted on", "run", "N", "D", "measured", "predicted", "interval", "error",
              "inside", "fit identified"]
    rows = []
    for entry in fits["rollout"]:
        result, family = entry["fit"], plots.label(entry["family"])
        if result is None:
            rows.append([family, entry["scope"], "not fitted: " + entry["reason"]] + [""] * 9)
            continue
        for k, i in enumerate(result.held):
            rows.append([family, result.holdout, f"{result.fit.n_points} runs", entry["run_ids"][i], _fmt(entry["N"][i]),
                         _fmt(entry["D"][i], 3), f"{result.measured[k]:.4f}", f"{result.predicted[k]:.4f}",
                         f"[{result.lo[k]:.4f}, {result.hi[k]:.4f}]", f"{100 * result.error[k]:+.1f} %",
                         "yes" if result.inside[k] else "NO", "yes" if result.fit.identified else "no"])
    return header, rows


def runs_rows(results) -> tuple[list[str], list[list[str]]]:
    header = ["run", "family", "N", "N total", "D (tokens)", "C (FLOPs)", "C_6N", "steps", "budget",
              "train loss", "val loss", "bits/byte", "FLOP/s"]
    rows = [[r.row["run_id"], r.family, _fmt(r.N), _fmt(int(r.row["N_total"])), _fmt(r.D), _fmt(r.C, 3),
             _fmt(r.row["C_6N"], 3), _fmt(int(r.row["steps"])), r.budget_key, _fmt(r.row["train_loss"]),
             _fmt(r.val_loss), _fmt(r.row["bits_per_byte"]), _fmt(float(r.row["flops_per_s"]) if r.row.get("flops_per_s") else "", 3)]
            for r in sorted(results, key=lambda r: (r.budget_key, r.family, r.N))]
    return header, rows


def equal_flops_rows(table, families) -> tuple[list[str], list[list[str]]]:
    header = ["budget", "C*", "size"] + [plots.label(f) for f in families]
    rows = []
    for row in table:
        cells = [f"{_fmt(row['loss'][f])} (N={row['N'][f]:,})" if f in row["loss"] else "" for f in families]
        rows.append([row["budget"], _fmt(row["C"], 3), _fmt(row["size"])] + cells)
    return header, rows


def efficiency_rows(table) -> tuple[list[str], list[list[str]]]:
    header = ["budget", "size", "family X", "reaches the final loss of Y", "target loss", "tokens X needed",
              "tokens Y used", "data efficiency of X over Y"]
    rows = [[row["budget"], _fmt(row["size"]), plots.label(row["x"]), plots.label(row["y"]),
             f"{row['target']:.4f}", _fmt(row["tokens_x"], 3) if math.isfinite(row["tokens_x"]) else row["reason"],
             _fmt(row["tokens_y"], 3), f"{row['ratio']:.2f}×" if math.isfinite(row["ratio"]) else "–"]
            for row in table]
    return header, rows


def reference_rows(results) -> tuple[list[str], list[list[str]]]:
    from lmu_jax.scaling.laws import LMU_PAPER_FITS

    header = ["N (non-emb.)"] + [plots.PAPER_CURVES[k][0] for k in plots.PAPER_CURVES]
    sizes = sorted({int(_ladder_size(r)) for r in results} | {55_000, 1_000_000})
    rows = [[f"{n:,}"] + [f"{float(LMU_PAPER_FITS[k](n)):.3f}" for k in plots.PAPER_CURVES] for n in sizes]
    return header, rows


def markdown_table(header, rows) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 3px}.note{color:#555}"""


def build_report(sweep_dir, *, bootstrap: int = DEFAULT_BOOTSTRAP, chinchilla_grid=None) -> dict:
    """Write report.md, report.html and the figures (PNG + SVG) into ``<sweep_dir>/report`` (drawn in a
    local directory first and copied there when the sweep directory is remote)."""
    sweep_dir = storage.path(sweep_dir, "SWEEP_DIR")
    results, collected = load_results(sweep_dir)
    if not results:
        raise UserError(f"SWEEP_DIR={str(sweep_dir)!r} has no finished runs to report "
                        f"({len(collected['missing'])} unfinished); run `lmu-jax sweep run SPEC` first")
    out = sweep_dir / "report"
    local = storage.path(tempfile.mkdtemp(prefix="lmu_jax-report-")) if storage.is_remote(out) else out
    spec = yaml.safe_load((sweep_dir / "spec.yaml").read_text()) if (sweep_dir / "spec.yaml").exists() else {}
    families = list(dict.fromkeys(r.family for r in sorted(results, key=lambda r: _family_order(spec, r.family))))
    fits = fit_sweep(results, bootstrap=bootstrap, chinchilla_grid=chinchilla_grid)
    figures = {
        "loss_vs_flops": plots.loss_vs_flops(results, fits["frontiers"], local),
        "loss_vs_params": plots.loss_vs_params(results, [e for e in fits["L(N)"] + fits["L(N, D)"]
                                                         if e["fit"] is not None], local),
    }
    if collected["curves"]:
        figures["loss_vs_tokens"] = plots.loss_vs_tokens(results, local)
    if all(r.per_position_loss.size for r in results):
        figures["per_position"] = plots.per_position(results, local)
    if any(e["fit"] is not None for e in fits["isoflop"]):
        figures["isoflop"] = plots.isoflop([e for e in fits["isoflop"] if e["fit"] is not None], local)
    sections = build_sections(spec, results, collected, fits, families, bootstrap, figures)
    (local / "report.md").write_text(render_markdown(sections))
    (local / "report.html").write_text(render_html(sections, spec.get("name", sweep_dir.name)))
    if local != out:
        storage.copy_tree(local, out)
        shutil.rmtree(local)
    return {"markdown": out / "report.md", "html": out / "report.html", "figures": figures, "fits": fits,
            "results": results, "spikes": flagged(run_spikes(results)) if collected["curves"] else []}


def _family_order(spec, family):
    order = list(spec.get("families") or [])
    return order.index(family) if family in order else len(order)


def build_sections(spec, results, collected, fits, families, bootstrap, figures) -> list[tuple]:
    """The report as a list of (kind, payload): ("h", title), ("p", text), ("table", (header, rows)),
    ("figure", (stem, caption)); rendered to markdown and HTML by the functions below."""
    first = results[0].row
    data = (spec.get("base") or {}).get("data") or {}
    s = [("h1", f"Sweep report: {spec.get('name') or collected['sweep_dir'].name}")]
    if spec.get("description"):
        s.append(("p", spec["description"]))
    s.append(("p", f"{len(results)} finished runs of {', '.join(plots.label(f) for f in families)}; "
                   + (f"corpus {data.get('corpus', 'default')}, tokenizer {data.get('tokenizer', 'byte')}, " if spec
                      else "corpus and tokenizer as in the sweep's spec (no spec.yaml in this directory), ")
                   + f"sequence length {first['seq_len']}, batch {first['batch_size']} sequences, "
                   f"schedule {first['schedule']} ending at each run's own horizon. "
                   f"Written {time.strftime('%Y-%m-%d %H:%M')}."))
    if collected["missing"]:
        s.append(("p", f"Not finished (left out of everything below): {', '.join(collected['missing'])}."))
    if not collected["curves"]:
        s.append(("p", "This directory holds the collected results (results.csv, per_position.json) without the "
                       "runs' directories, so each run is known by its final evaluation only: the loss-vs-tokens "
                       "figure and the data-efficiency table, which read the curves, are left out, and the "
                       "equal-FLOPs table gives final losses (the runs of a budget differ in C only by the "
                       "rounding of steps)."))
    s.append(("h2", "Conventions"))
    s.append(("p", "FLOPs (C): " + plots.FLOP_CONVENTION + ". C_6N is Kaplan's 6·N·D, given beside it. "
                   "Runs of one budget were planned at matched C (their C differ only by the rounding of steps). "
                   "N counts non-embedding parameters (token embeddings, untied heads and position tables "
                   "excluded). Losses are nats per token on the fixed validation windows; bits per byte beside "
                   "them. Train loss is the mean minibatch loss of the last 10 steps."))
    s.append(("h2", "Runs"))
    s.append(("table", runs_rows(results)))
    s.append(("p", "The same table, unrounded: results.csv in the sweep directory (per-position losses: "
                   "per_position.json); `lmu-jax fit <sweep dir>/results.csv --law chinchilla|frontier|kaplan-n|isoflop` "
                   "refits it."))
    s += stability_sections(results, collected["curves"])
    s.append(("h2", "Loss at equal FLOPs"))
    s.append(("p", "Validation loss of each family at the same training FLOPs C*, per ladder size (each family's "
                   "own N in brackets), and each family's best size. The runs of a budget differ in C only by the "
                   "rounding of steps; C* is the smallest of them and each run's validation curve is read there "
                   "(log-log interpolation, lmu_jax.scaling.compare.loss_at_compute)."))
    equal_flops, efficiency = equal_flops_table(results), data_efficiency_table(results)
    s.append(("table", equal_flops_rows(equal_flops, families)))
    if collected["curves"]:
        s += data_efficiency_sections(efficiency)
    s += noise_sections(collected.get("sweep_dir"), results, equal_flops, efficiency, families)
    s += fit_sections(fits, bootstrap)
    s += prediction_sections(spec, fits["isoflop"])
    s += claims_sections(results, equal_flops, efficiency if collected["curves"] else [],
                         family_floors(seed_stats(results)), families)
    s.append(("h2", "Figures"))
    for stem, caption in FIGURES:
        if stem in figures:
            s.append(("figure", (stem, caption)))
    s.append(("h2", "Published reference fits (LMU paper, Sec. 5)"))
    s.append(("p", "Chilkuri et al. 2021 fitted L(N) on OpenWebText2 with the GPT-2 BPE vocabulary (50,257 tokens), "
                   "sequence 1024, 25k steps of 512 sequences; the transformer and LSTM curves are Kaplan et al.'s "
                   "WebText2 fits. Their losses are nats per BPE token: reference shapes, not comparable in level "
                   "with this sweep's byte-level losses. Values at this sweep's N and the paper's range:"))
    s.append(("table", reference_rows(results)))
    return s


FIGURES = (
    ("loss_vs_tokens", "Loss vs training tokens per family and size (log-log)."),
    ("loss_vs_flops", "Loss vs training FLOPs: curves, final points, each family's frontier and its fitted law "
                      "(drawn only when identified)."),
    ("loss_vs_params", "L(N): final validation loss vs non-embedding parameters with the identified fits; right: "
                       "the LMU paper's published fits, reference shapes only."),
    ("isoflop", "IsoFLOP profiles with their parabolas and minima; N_opt(C) with the fitted line, its band and "
                "Chinchilla's a ≈ 0.50 for reference."),
    ("per_position", "Validation loss by position in the context (LMU paper Fig. 4)."),
)


def data_efficiency_sections(efficiency) -> list[tuple]:
    s = []
    s.append(("h2", "Data efficiency"))
    s.append(("p", "Tokens family X needed to reach family Y's final validation loss at the same ladder size and "
                   "budget, read off X's validation curve (evaluations during training, log-log interpolation; "
                   "lmu_jax.scaling.compare.data_efficiency), against the tokens Y used. Above 1×: X is more "
                   "data-efficient. The LMU paper's claim is that the LMU at 13 B tokens matches the transformer at "
                   "130 B (10×). At matched FLOPs the families see different token counts; evaluations before the "
                   "end of a run are not horizon-matched (the learning rate has not decayed yet), so a ratio read "
                   "there understates X's efficiency. Where no ratio can be read, the table says why."))
    s.append(("table", efficiency_rows(efficiency)))
    return s


def fit_sections(fits, bootstrap) -> list[tuple]:
    """Fits, their identification, the isoFLOP analysis and the held-out predictions."""
    from lmu_jax.scaling.isoflop import WINDOW

    s = [("h2", "Fits")]
    s.append(("p", f"Huber (δ = 1e-3) on log residuals, summed, L-BFGS-B from a grid, polished and restarted "
                   f"(lmu_jax.scaling.fit); ± is the bootstrap standard error over runs ({bootstrap} resamples). "
                   "Only final losses of horizon-matched runs are used; the last column lists them. A fit is "
                   "identified when its data pin its constants down: it converged, has at least 3 points per "
                   "constant, its grid starts agree, E neither ran to zero nor sits at the smallest loss, no "
                   "exponent sits at its bound, and no bootstrap interval reaches zero or is wider than its value "
                   "(docs/scaling.md). Only identified fits are drawn, and no further than 2× beyond their data."))
    header, rows = fit_rows(fits)
    if rows:
        s.append(("table", (header, rows)))
        text = not_identified_text(fits)
        if text:
            s.append(("p", text))
    else:
        s.append(("p", "No fits: no family has 3 sizes at one token budget (L(N)), 3 compute-frontier points "
                       "from several budgets (L(C)) or 6 runs at several N and D (L(N, D)). A single FLOP "
                       "budget gives an isoFLOP profile per family, compared above and drawn in the L(N) figure."))
    if fits["isoflop"]:
        s.append(("h2", "IsoFLOP analysis (Chinchilla Approach 2)"))
        s.append(("p", "Per FLOP budget with at least 3 sizes, a robust parabola (Huber) of final loss in log N, and "
                       "one in log D, gives N_opt, D_opt and L_opt at its minimum. It fits the runs within a factor "
                       f"{WINDOW} of the budget's best size (a profile is a parabola only near its minimum; runs "
                       "further out are counted as outside and drawn hollow). Intervals are percentiles of a "
                       f"residual bootstrap ({bootstrap} resamples: the sizes fixed, the parabola's residuals "
                       "redrawn). A budget whose minimum the "
                       "ladder does not bracket is left out of the exponents and says what sizes to add. Across the "
                       "remaining budgets N_opt = G·C^a, D_opt = G'·C^b and L_opt = K·C^-gamma (Chinchilla: "
                       "a ≈ 0.50, b ≈ 0.50)."))
        s.append(("table", isoflop_rows(fits)))
        s.append(("table", isoflop_exponent_rows(fits)))
    if fits["rollout"]:
        s.append(("h2", "Held-out prediction (rollout)"))
        s.append(("p", "L(N, D) refitted without the largest FLOP budget's runs (top-budget) or the largest size's "
                       "(top-size), then each held-out run predicted. The interval adds the bootstrap refits' "
                       "spread and the fit's residual scatter (lmu_jax.scaling.rollout); about 95 % of held-out "
                       "runs should fall inside it when the law holds. A prediction from a fit that is not "
                       "identified is an extrapolation of constants the data did not fix."))
        s.append(("table", rollout_rows(fits)))
    return s


def render_markdown(sections) -> str:
    out = []
    for kind, payload in sections:
        if kind == "h1":
            out.append(f"# {payload}")
        elif kind in ("h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {payload}")
        elif kind == "p":
            out.append(payload)
        elif kind == "table":
            out.append(markdown_table(*payload))
        elif kind == "figure":
            stem, caption = payload
            out.append(f"![{caption}]({stem}.png)\n\n*{caption}* ([SVG]({stem}.svg))")
    return "\n\n".join(out) + "\n"


def render_html(sections, title) -> str:
    body = []
    for kind, payload in sections:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(payload)}</{kind}>")
        elif kind == "p":  # `command` in the text -> <code>
            body.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(payload)) + "</p>")
        elif kind == "table":
            body.append(html_table(*payload))
        elif kind == "figure":
            stem, caption = payload
            body.append(f'<figure><img src="{stem}.svg" alt="{html.escape(caption)}">'
                        f'<figcaption class="note">{html.escape(caption)} (<a href="{stem}.png">PNG</a>)'
                        "</figcaption></figure>")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(str(title))}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
