"""The report's seeds, noise floor and learning-rate sections.

Runs that differ only in ``train.seed`` (spec key ``seeds``) form a seed group per (budget, family,
ladder size). The noise floor is the pooled standard deviation of the final validation loss over the
groups with >= 2 seeds, sqrt(sum (n_i - 1) s_i² / sum (n_i - 1)), per family (families differ: in the
stdlib study the LMU's seeds scatter 5x more than the transformer's), and over all families for a family
without seeds. Every comparison is set against it (``lmu_jax.scaling.compare.difference_with_noise``): a
difference under 2σ of its seed standard error is "within noise"; a group of one seed borrows its
family's floor as its scatter. Without seeds the floor is unknown and the report says so.
"""

from __future__ import annotations

import math

import numpy as np

from lmu_jax.report import plots
from lmu_jax.scaling.compare import difference_with_noise


def main_runs(results) -> list:
    """The runs of the budgets' own ladders: cooldown branches are (N, D) points of their own C."""
    return [r for r in results if r.row.get("budget_kind") != "branch"]


def seed_stats(results) -> list[dict]:
    """Per (budget, family, ladder size): N, the seeds, and the mean and std (ddof 1) of the final loss."""
    groups: dict = {}
    for r in main_runs(results):
        groups.setdefault((r.budget_key, r.family, r.row["size"] or r.N), []).append(r)
    stats = []
    for (budget, family, size), runs in groups.items():
        losses = np.array([r.val_loss for r in runs])
        stats.append({"budget": budget, "family": family, "size": size, "N": runs[0].N,
                      "seeds": sorted(r.row.get("seed") for r in runs), "mean": float(losses.mean()),
                      "std": float(losses.std(ddof=1)) if losses.size > 1 else math.nan})
    return stats


def noise_floor(stats) -> tuple[float, int]:
    """(pooled seed std of the final loss, number of groups it pools); NaN without a group of >= 2 seeds."""
    seeded = [s for s in stats if len(s["seeds"]) > 1]
    dof = sum(len(s["seeds"]) - 1 for s in seeded)
    if not dof:
        return math.nan, 0
    return math.sqrt(sum((len(s["seeds"]) - 1) * s["std"] ** 2 for s in seeded) / dof), len(seeded)


def family_floors(stats) -> dict:
    """Each family's noise floor (``noise_floor`` over its own groups), the all-family floor for a family
    without seeds; keyed by family, and ``None`` for the all-family floor."""
    floors = {None: noise_floor(stats)[0]}
    for family in dict.fromkeys(s["family"] for s in stats):
        own, pooled = noise_floor([s for s in stats if s["family"] == family])
        floors[family] = own if pooled else floors[None]
    return floors


def floor_of(floors: dict, family: str) -> float:
    """A family's floor from ``family_floors``: the all-family one for a family it does not name."""
    return floors.get(family, floors[None])


def _verdict(d) -> str:
    if not math.isfinite(d.sigma):
        return "noise unknown (one seed)"
    return "within noise" if d.within_noise else f"{abs(d.diff) / d.sigma:.1f}σ"


def equal_flops_differences(table, families, floors: dict) -> list[list[str]]:
    """Each pair of families at each (budget, size) row of the equal-FLOPs table: Δ = X - Y ± σ."""
    rows = []
    for row in table:
        if "seeds" not in row:  # the "best" row: each family's best size, one run each
            continue
        present = [f for f in families if f in row["seeds"] and all(map(math.isfinite, row["seeds"][f]))]
        for i, x in enumerate(present):
            for y in present[i + 1:]:
                d = difference_with_noise(row["seeds"][x], row["seeds"][y], floor_of(floors, x),
                                          floor_of(floors, y))
                rows.append([row["budget"], str(row["size"]), plots.label(x), plots.label(y),
                             f"{len(row['seeds'][x])} / {len(row['seeds'][y])}", f"{d.diff:+.4f}",
                             f"{d.sigma:.4f}" if math.isfinite(d.sigma) else "–", _verdict(d)])
    return rows


def efficiency_differences(table) -> list[list[str]]:
    """Data efficiency over the seeds (each seed of X against the same seed of Y): the mean ratio, and
    whether its log differs from 0 by more than 2σ of the seeds' scatter."""
    groups: dict = {}
    for row in table:
        if math.isfinite(row["ratio"]):
            groups.setdefault((row["budget"], row["size"], row["x"], row["y"]), []).append(row["ratio"])
    rows = []
    for (budget, size, x, y), ratios in groups.items():
        if len(ratios) < 2:
            continue
        d = difference_with_noise(np.log(ratios), [0.0], 0.0)
        rows.append([budget, str(size), plots.label(x), plots.label(y), str(len(ratios)),
                     f"{np.mean(ratios):.2f}× ± {np.std(ratios, ddof=1):.2f}", _verdict(d)])
    return rows


def noise_sections(sweep_dir, results, equal_flops, efficiency, families) -> list[tuple]:
    """("h2" | "p" | "table", payload) sections on learning rates, seeds and the noise floor."""
    s = [("h2", "Learning rates")]
    s += lr_sections(sweep_dir, results)
    s.append(("h2", "Seeds and the noise floor"))
    stats = seed_stats(results)
    floor, pooled = noise_floor(stats)
    if not pooled:
        s.append(("p", "One seed per run: the noise floor is unknown, and no difference in this report is set "
                       "against seed noise. A spec key `seeds: [0, 1, 2]` (for all runs or a matched subset) "
                       "measures it."))
        return s
    floors = family_floors(stats)
    own = "; ".join(f"{plots.label(f)} {v:.4f}" for f, v in floors.items() if f is not None)
    s.append(("p", f"Noise floor: {floor:.4f} nats per token, the pooled standard deviation of the final "
                   f"validation loss over the seeds of {pooled} (budget, family, size) groups; per family "
                   f"(pooled over its own groups): {own}. Differences smaller than twice their seed standard "
                   "error are marked \"within noise\"; a group of one seed borrows its family's floor as its "
                   "scatter (lmu_jax/report/noise.py)."))
    header = ["budget", "family", "size", "N", "seeds", "final val loss, mean ± std"]
    rows = [[st["budget"], plots.label(st["family"]), str(st["size"]), f"{st['N']:,}",
             ", ".join(map(str, st["seeds"])),
             f"{st['mean']:.4f} ± {st['std']:.4f}" if math.isfinite(st["std"]) else f"{st['mean']:.4f} (one seed)"]
            for st in stats]
    s.append(("table", (header, rows)))
    differences = equal_flops_differences(equal_flops, families, floors)
    if differences:
        s.append(("p", "Family against family at equal FLOPs (the table \"Loss at equal FLOPs\", seed means): "
                       "Δ = loss of X - loss of Y, with σ its seed standard error."))
        s.append(("table", (["budget", "size", "X", "Y", "seeds X / Y", "Δ (nats)", "σ", "verdict"], differences)))
    efficiency = efficiency_differences(efficiency)
    if efficiency:
        s.append(("p", "Data efficiency over the seeds (seed s of X against seed s of Y); within noise when the "
                       "log ratio is under 2σ of its seed standard error from 0."))
        s.append(("table", (["budget", "size", "X", "Y", "seeds", "ratio, mean ± std", "verdict"], efficiency)))
    return s


def lr_sections(sweep_dir, results) -> list[tuple]:
    """How each run's peak learning rate was chosen: the lr grid's rule, or the spec."""
    from lmu_jax.sweep.lr import read_rules

    rules = read_rules(sweep_dir) if sweep_dir is not None else {}
    used = sorted({(r.family, float(r.row.get("lr") or math.nan)) for r in results})
    if not rules:
        lrs = "; ".join(f"{plots.label(f)} {lr:.4g}" for f, lr in used)
        return [("p", f"Peak learning rates from the spec (not tuned per size here): {lrs}.")]
    s = [("p", "Peak learning rates from an lr grid (spec key lr_grid; lmu_jax/sweep/lr.py): at each grid size "
               "the best lr is the vertex of a parabola in log lr through the lowest final validation loss and its "
               "neighbours; per family, those best lrs interpolated in (log N, log lr) between grid sizes, "
               "and the nearest one beyond them, set every main run's lr (results.csv column lr). c·N^-γ is "
               "the least-squares power law through them, a description of the trend. A best lr at the "
               "grid's edge is not bracketed: widen the grid.")]
    rows = []
    for family, rule in rules.items():
        for p in rule["points"]:
            rows.append([plots.label(family), f"{rule['c']:.4g}", f"{rule['gamma']:.3f}", f"{p['N']:,}",
                         ", ".join(f"{lr:.3g}: {loss:.4f}" for lr, loss in zip(p["lrs"], p["losses"])),
                         f"{p['best_lr']:.4g}" + ("" if p["bracketed"] else " (at the grid's edge)")])
    s.append(("table", (["family", "c", "γ", "grid N", "lr: final loss", "best lr"], rows)))
    return s
