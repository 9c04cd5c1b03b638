"""Learning rate per size: the best peak lr of each (family, size) from a sweep's lr grid, and the rule
per family that sets the main runs' lr from them (spec key ``lr_grid``, lmu_jax/sweep/spec.py).

The best lr is the vertex of a parabola in log lr through the grid's lowest final validation loss and
its two neighbours (a parabola is the local shape of loss against log lr near its minimum; far from it
the curve is not one). When the lowest loss is at an end of the grid the optimum is not bracketed, and
no rule is fitted: main runs are not planned on an extrapolated lr, and the sweep says which lrs to add
(``lr_rule.json`` still records the grid). The rule interpolates the best lrs linearly in
(log N, log lr*) between grid sizes and holds the nearest one beyond them: a power law where the optima
follow one, and no assumed shape where they do not (a power law through optima that bend misses every
one of them, by 2x at the study's grid sizes, and keeps bending past the largest). The least-squares
power law lr* = c · N^-γ is fitted beside it, to describe the trend. ``rules_from_grid`` writes
``lr_rule.json`` in the sweep directory, which the report reads to say how each run's lr was chosen.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from lmu_jax import storage
from lmu_jax.errors import UserError

RULE_FILE = "lr_rule.json"


@dataclass(frozen=True)
class BestLr:
    lr: float
    bracketed: bool  # False: the lowest loss is at an end of the grid (the rule then extrapolates less well)


def best_lr(lrs, losses) -> BestLr:
    """The lr at the vertex of the parabola in log lr through the lowest loss and its neighbours."""
    order = np.argsort(np.asarray(lrs, dtype=float))
    grid = np.asarray(lrs, dtype=float)[order]
    x, y = np.log(grid), np.asarray(losses, dtype=float)[order]
    finite = np.isfinite(y)  # a diverged run (NaN loss) is not a minimum
    i = int(np.argmin(np.where(finite, y, np.inf)))
    if i == 0 or i == len(x) - 1 or not finite[i - 1:i + 2].all():
        return BestLr(float(grid[i]), False)
    a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)  # a > 0: y[i] is below both neighbours
    return BestLr(float(math.exp(-b / (2 * a))), True)


@dataclass(frozen=True)
class LrRule:
    family: str
    c: float
    gamma: float
    points: tuple  # dicts: size, N, lrs, losses, best_lr, bracketed

    def lr(self, n_params: int) -> float:
        """The lr at N non-embedding parameters: the grid's best lrs interpolated in (log N, log lr),
        the nearest one beyond the grid's sizes (4 significant digits: a readable config)."""
        points = sorted(self.points, key=lambda p: p["N"])
        log_lr = np.interp(math.log(n_params), [math.log(p["N"]) for p in points],
                           [math.log(p["best_lr"]) for p in points])
        return float(f"{math.exp(log_lr):.4g}")


def fit_rule(family: str, points: list[dict]) -> LrRule:
    """The rule through the points' (N, best_lr); its c · N^-γ is the least-squares line in logs."""
    n = np.log([p["N"] for p in points])
    lr = np.log([p["best_lr"] for p in points])
    if len(set(n.tolist())) < 2:
        return LrRule(family, float(math.exp(lr.mean())), 0.0, tuple(points))
    slope, intercept = np.polyfit(n, lr, 1)
    return LrRule(family, float(math.exp(intercept)), float(-slope), tuple(points))


def rules_from_grid(sweep_dir, runs) -> dict | None:
    """``{family: LrRule}`` from the finished lr-grid runs among ``runs`` (PlannedRun), or None while one
    of them is yet to run; writes ``lr_rule.json`` into the sweep directory. A grid run that failed
    (typically: diverged at a too-high lr, ``train.nonfinite=stop``) counts as a NaN loss."""
    from lmu_jax.sweep.runner import SweepDir, read_record

    sweep = SweepDir(sweep_dir)
    grid = [r for r in runs if r.stage == "lr_grid"]
    groups: dict = {}
    for run in grid:
        run_dir = sweep.run_dir(run.run_id)
        if (run_dir / "DONE").exists() and (run_dir / "eval.json").exists():
            loss = json.loads((run_dir / "eval.json").read_text())["loss"]
        elif read_record(run_dir).get("state") == "failed":
            loss = math.nan
        else:
            return None
        groups.setdefault((run.family, run.size), {"N": run.n_params, "lrs": [], "losses": []})
        groups[run.family, run.size]["lrs"].append(run.lr)
        groups[run.family, run.size]["losses"].append(float(loss))
    points: dict = {}
    for (family, size), group in groups.items():
        best = best_lr(group["lrs"], group["losses"])
        points.setdefault(family, []).append({"size": size, **group, "best_lr": best.lr, "bracketed": best.bracketed})
    rules = {family: fit_rule(family, pts) for family, pts in points.items()}
    if sweep.path.exists():
        storage.write_text(sweep.path / RULE_FILE, json.dumps({f: asdict(r) for f, r in rules.items()}, indent=1) + "\n")
    edges = [(family, p) for family, pts in points.items() for p in pts if not p["bracketed"]]
    if edges:
        where = "; ".join(f"{family} at N={p['N']:,}: {p['best_lr']:g}" for family, p in edges)
        ends = [word for word, end in (("smaller", min), ("larger", max))
                if any(p["best_lr"] == end(p["lrs"]) for _, p in edges)]
        raise UserError(f"lr_grid.lrs={sorted(set(edges[0][1]['lrs']))} is invalid: the best lr lies at the grid's "
                        f"edge ({where}), so the rule would extrapolate; add {' and '.join(ends)} lrs "
                        "(lr_rule.json has the grid's losses)")
    return rules


def read_rules(sweep_dir) -> dict:
    """The recorded rules of a sweep directory ({} when its lr came from the spec)."""
    path = storage.path(sweep_dir) / RULE_FILE
    return json.loads(path.read_text()) if path.exists() else {}
