"""IsoFLOP analysis: Chinchilla's Approach 2 (Hoffmann et al. 2022, Sec. 3.2).

Runs of one FLOP budget C at different sizes form an isoFLOP profile. Per budget with at least 3
sizes, a robust quadratic of final loss in log N gives the compute-optimal size N_opt(C) (its
minimum) and L_opt(C) (the loss there); the same in log D gives D_opt(C). A profile is a parabola
only near its minimum, so each budget's quadratic fits the runs within a factor WINDOW of its best
size (two steps of a factor-2 ladder either side); runs further out are kept and drawn, not fitted.
Across the budgets whose minimum the ladder brackets, straight lines in log-log give
``N_opt = G * C**a``, ``D_opt = G_D * C**b`` and ``L_opt = K * C**-gamma``. Chinchilla found a ≈ 0.50
and b ≈ 0.50 (Approach 2: 0.49 and 0.51).

Uncertainty: a residual bootstrap. Each budget's sizes stay fixed; its losses are redrawn as the
fitted parabola plus residuals resampled with replacement (scaled by sqrt(n / (n - 3)) for the three
fitted constants), the parabolas refitted, and the lines refitted to each joint resample of the
budgets' optima; intervals are percentiles. (Resampling the runs themselves, with 5-7 per budget,
often leaves all of a resample's sizes on one side of the minimum, whose vertex then lies anywhere.)
A budget whose minimum is not bracketed (the best measured size is the smallest or largest of its
ladder, the parabola's minimum lies outside the ladder, or the parabola opens downward) is flagged
with what to add and left out of the lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.polynomial.polynomial import polyval
from scipy.optimize import least_squares

from lmu_jax.errors import bad_value

ROBUST_SCALE = 0.01  # nats: residuals beyond this count linearly (Huber), so one bad run cannot bend a profile
BUDGET_RTOL = 0.1  # runs whose C lie within 10 % of their neighbours' belong to one budget (steps round C)
CHINCHILLA_A = 0.50  # Hoffmann et al.'s N_opt exponent (Approaches 1-2: 0.50, 0.49), drawn for reference
MIN_SIZES = 3
WINDOW = 4.5  # a budget's parabola fits the runs within this factor of its best size
# Each budget's optimum is itself fitted from >= MIN_SIZES runs and its scatter reaches the exponents through
# the bootstrap; what the count of budgets must give is a residual to test the power-law form against.
MIN_BRACKETED_BUDGETS = 3


def group_budgets(C) -> np.ndarray:
    """Budget index of each run: sorted by C, a new budget starts where C jumps by more than BUDGET_RTOL."""
    C = np.asarray(C, dtype=float)
    order = np.argsort(C, kind="stable")
    labels = np.empty(len(C), dtype=int)
    label = 0
    for previous, i in zip(np.r_[order[0], order[:-1]], order):
        if C[i] > C[previous] * (1 + BUDGET_RTOL):
            label += 1
        labels[i] = label
    return labels


def robust_quadratic(x, y) -> np.ndarray:
    """Coefficients (c0, c1, c2) of ``y ≈ c0 + c1 x + c2 x**2``, Huber loss at ROBUST_SCALE."""
    start = np.polyfit(x, y, 2)[::-1]
    if len(x) == 3:
        return start  # exact: nothing to be robust against
    result = least_squares(lambda c: polyval(x, c) - y, start, loss="huber", f_scale=ROBUST_SCALE)
    return result.x


def _vertex(coefficients, centre):
    """(log x, y) at the parabola's minimum, or NaNs when it opens downward."""
    c0, c1, c2 = coefficients
    if c2 <= 0:
        return math.nan, math.nan
    u = -c1 / (2 * c2)
    return centre + u, c0 + c1 * u + c2 * u**2


@dataclass(frozen=True)
class IsoflopBudget:
    """One budget's profile: its runs, the parabolas in log N and log D, their minima and intervals."""

    C: float  # geometric mean of the runs' C
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    fitted: np.ndarray  # bool per run: inside the window around the best size, so in the parabola
    coef_N: np.ndarray  # loss ≈ c0 + c1 u + c2 u², u = log N - centre_N
    centre_N: float
    coef_D: np.ndarray
    centre_D: float
    N_opt: float  # NaN when the parabola opens downward
    D_opt: float
    L_opt: float
    ci: dict  # "N_opt", "D_opt", "L_opt" -> (lo, hi)
    bracketed: bool
    flag: str  # "" or the sentence saying why this budget is left out and what to add

    def profile(self, N):
        u = np.log(np.asarray(N, dtype=float)) - self.centre_N
        return polyval(u, self.coef_N)


@dataclass(frozen=True)
class IsoflopFit:
    """Per-budget optima and, across the bracketed budgets, ``N_opt = G C^a``, ``D_opt = G_D C^b``,
    ``L_opt = K C^-gamma`` (NaN with fewer than 2 bracketed budgets).

    ``identified`` and ``warnings`` judge the exponents (as ``FitResult`` does a law's constants); a
    budget left out of them says why in its own ``flag``."""

    budgets: tuple
    a: float
    G: float
    b: float
    G_D: float
    gamma: float
    K: float
    ci: dict  # "a", "b", "gamma" -> (lo, hi)
    bootstrap: int
    bootstrap_used: int  # joint resamples in which every bracketed budget had a minimum
    identified: bool
    warnings: list = field(default_factory=list)
    lines: np.ndarray = field(default_factory=lambda: np.empty((0, 3, 2)), repr=False)  # bootstrap (slope,
    #                      intercept) of log N_opt, log D_opt, log L_opt against log C, one row per resample used
    ci_level: float = 0.95

    @property
    def used(self) -> list:
        return [b for b in self.budgets if b.bracketed]

    def N_opt(self, C):
        return self.G * np.asarray(C, dtype=float) ** self.a

    def D_opt(self, C):
        return self.G_D * np.asarray(C, dtype=float) ** self.b

    def L_opt(self, C):
        return self.K * np.asarray(C, dtype=float) ** -self.gamma

    def predict(self, C: float) -> dict:
        """N_opt, D_opt and L_opt at budget C with the bootstrap's percentile interval of each
        (``{"N_opt": (value, lo, hi), ...}``; NaN intervals without a bootstrap). The interval is the
        fit's uncertainty: a measured optimum at C carries its own profile's scatter on top. L_opt's line
        has no irreducible loss, so past the data it runs low of a loss that is flattening."""
        log_C = math.log(C)
        values = {"N_opt": float(self.N_opt(C)), "D_opt": float(self.D_opt(C)), "L_opt": float(self.L_opt(C))}
        out = {}
        for j, name in enumerate(values):
            draws = np.exp(self.lines[:, j, 0] * log_C + self.lines[:, j, 1]) if len(self.lines) >= 2 else None
            lo, hi = _percentiles(draws, self.ci_level) if draws is not None else (math.nan, math.nan)
            out[name] = (values[name], lo, hi)
        return out


def in_window(N, loss) -> np.ndarray:
    """Runs within a factor WINDOW of the best size (all of them when that leaves fewer than 3 sizes)."""
    best = N[np.argmin(loss)]
    inside = (N >= best / WINDOW) & (N <= best * WINDOW)
    return inside if len(np.unique(N[inside])) >= MIN_SIZES else np.ones_like(inside)


def _fit_profile(log_N, log_D, loss):
    """Parabolas in log N and log D and their minima: (N_opt, D_opt, L_opt, coef_N, centre_N, coef_D, centre_D)."""
    centre_N, centre_D = float(log_N.mean()), float(log_D.mean())
    coef_N = robust_quadratic(log_N - centre_N, loss)
    coef_D = robust_quadratic(log_D - centre_D, loss)
    log_n_opt, l_opt = _vertex(coef_N, centre_N)
    log_d_opt, _ = _vertex(coef_D, centre_D)
    return math.exp(log_n_opt), math.exp(log_d_opt), l_opt, coef_N, centre_N, coef_D, centre_D


def _bracket_flag(N, loss, n_opt, coef_N) -> str:
    """"" when the ladder brackets the minimum, else the sentence saying where it is and what to add."""
    n_min, n_max = N.min(), N.max()
    best = N[np.argmin(loss)]
    below = best == n_min or (math.isfinite(n_opt) and n_opt < n_min)
    above = best == n_max or (math.isfinite(n_opt) and n_opt > n_max)
    if not (below or above or coef_N[2] <= 0):
        return ""
    where = ""
    if math.isfinite(n_opt) and not n_min <= n_opt <= n_max:
        where = f", the parabola's minimum at N ≈ {n_opt:,.3g}"
    elif coef_N[2] <= 0:
        where = ", the parabola opens downward"
    if below and not above:
        target = min(n_min / 2, max(n_opt / 2, n_min / 16)) if math.isfinite(n_opt) else n_min / 4
        return (f"optimum below the ladder (the smallest size, N = {n_min:,.0f}, is best{where}): "
                f"add sizes down to ~{target:,.3g}.")
    if above and not below:
        target = max(n_max * 2, min(n_opt * 2, n_max * 16)) if math.isfinite(n_opt) else n_max * 4
        return (f"optimum above the ladder (the largest size, N = {n_max:,.0f}, is best{where}): "
                f"add sizes up to ~{target:,.3g}.")
    return (f"no minimum inside the ladder{where}: the profile is not bracketed; add sizes on both "
            f"sides of N = {best:,.0f}.")


def _percentiles(values, ci_level):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return (math.nan, math.nan)
    tail = 100 * (1 - ci_level) / 2
    return tuple(float(q) for q in np.percentile(values, [tail, 100 - tail]))


def _line(log_C, log_y):
    """Slope and intercept of a least-squares line, or NaNs with fewer than 2 finite points."""
    keep = np.isfinite(log_y)
    if keep.sum() < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(log_C[keep], log_y[keep], 1)
    return float(slope), float(intercept)


def fit_isoflop(N, D, C, loss, *, budget=None, bootstrap: int = 200, seed: int = 0,
                ci_level: float = 0.95) -> IsoflopFit:
    """Chinchilla Approach 2 on one family's runs (see the module docstring).

    ``budget``: a label per run saying which runs share a budget; default ``group_budgets(C)``. Extra
    runs at one size (seeds) are kept: the parabola fits all of them. Budgets with fewer than 3
    distinct sizes are skipped; if none has 3, this is a ``UserError``.
    """
    N, D, C, loss = (np.asarray(v, dtype=float).ravel() for v in (N, D, C, loss))
    if not (len(N) == len(D) == len(C) == len(loss)):
        raise bad_value("lengths", (len(N), len(D), len(C), len(loss)), "N, D, C and loss of equal length")
    for name, values in (("N", N), ("D", D), ("C", C), ("loss", loss)):
        if not (values.size and np.all(np.isfinite(values)) and np.all(values > 0)):
            raise bad_value(name, values.tolist()[:3], "finite values > 0, at least one")
    if int(bootstrap) != bootstrap or bootstrap < 0 or bootstrap == 1:
        raise bad_value("bootstrap", bootstrap, "0 (no intervals) or an integer >= 2")
    if not 0 < ci_level < 1:
        raise bad_value("ci_level", ci_level, "a probability in (0, 1)")
    labels = group_budgets(C) if budget is None else np.asarray(budget)
    groups = [np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())]
    groups = sorted((g for g in groups if len(np.unique(N[g])) >= MIN_SIZES), key=lambda g: C[g].mean())
    if not groups:
        most = max(len(np.unique(N[labels == label])) for label in set(labels.tolist()))
        raise bad_value("sizes per budget", most, f"isoflop needs a FLOP budget with at least {MIN_SIZES} distinct "
                        "sizes N (a spec with one size per budget has no isoFLOP profile)")

    rng = np.random.default_rng(seed)
    budgets, replicates, warnings = [], [], []
    for g in groups:
        fitted = in_window(N[g], loss[g])
        log_N, log_D, y = np.log(N[g][fitted]), np.log(D[g][fitted]), loss[g][fitted]
        n_opt, d_opt, l_opt, coef_N, centre_N, coef_D, centre_D = _fit_profile(log_N, log_D, y)
        C_budget = float(np.exp(np.log(C[g]).mean()))
        predicted = polyval(log_N - centre_N, coef_N)
        residuals = (y - predicted) * math.sqrt(len(y) / max(len(y) - 3, 1))
        draws = np.full((bootstrap, 3), np.nan)
        for k in range(bootstrap):
            draws[k] = _fit_profile(log_N, log_D, predicted + rng.choice(residuals, size=len(y)))[:3]
        replicates.append(draws)
        flag = _bracket_flag(N[g][fitted], y, n_opt, coef_N)
        if not flag and len(y) == MIN_SIZES:
            warnings.append(f"C = {C_budget:.3g}: 3 runs for a 3-constant parabola: it passes through every point, "
                            "so its interval shows no scatter.")
        budgets.append(IsoflopBudget(
            C=C_budget, N=N[g], D=D[g], loss=loss[g], fitted=fitted, coef_N=coef_N, centre_N=centre_N, coef_D=coef_D,
            centre_D=centre_D,
            N_opt=n_opt, D_opt=d_opt, L_opt=l_opt,
            ci={name: _percentiles(draws[:, j], ci_level) for j, name in enumerate(("N_opt", "D_opt", "L_opt"))}
            if bootstrap else {},
            bracketed=not flag, flag=flag))

    used = [i for i, b in enumerate(budgets) if b.bracketed]
    log_C = np.log([budgets[i].C for i in used])
    point = {}
    for name, column in (("N", 0), ("D", 1), ("L", 2)):
        values = [(budgets[i].N_opt, budgets[i].D_opt, budgets[i].L_opt)[column] for i in used]
        point[name] = _line(log_C, np.log(values)) if len(used) >= 2 else (math.nan, math.nan)
    ci, n_used, lines = {}, 0, np.empty((0, 3, 2))
    if bootstrap and len(used) >= 2:
        joint = np.stack([replicates[i] for i in used], axis=1)  # (bootstrap, budgets, 3)
        complete = np.all(np.isfinite(joint), axis=(1, 2))
        n_used = int(complete.sum())
        lines = np.array([[_line(log_C, np.log(draw[:, j])) for j in range(3)]
                          for draw in joint[complete]]).reshape(-1, 3, 2)
        slopes = lines[:, :, 0]
        if n_used >= 2:
            ci = {"a": _percentiles(slopes[:, 0], ci_level), "b": _percentiles(slopes[:, 1], ci_level),
                  "gamma": tuple(sorted(-q for q in _percentiles(slopes[:, 2], ci_level)))}
        if n_used < 0.9 * bootstrap:
            warnings.append(f"Only {n_used} of {bootstrap} resamples had a minimum at every budget used: the "
                            "profiles barely curve.")
    if len(used) < 2:
        warnings.append(f"{len(used)} of {len(budgets)} budgets bracket their optimum: no exponents (a line needs "
                        "at least 2).")
    else:
        if len(used) < MIN_BRACKETED_BUDGETS:
            warnings.append(f"{len(used)} budgets bracket their optimum: a line through fewer than "
                            f"{MIN_BRACKETED_BUDGETS} cannot show that N_opt(C) is a power law.")
        for name, value in (("a", point["N"][0]), ("b", point["D"][0])):
            lo, hi = ci.get(name, (math.nan, math.nan))
            if not bootstrap:
                continue
            if not math.isfinite(lo):
                warnings.append(f"{name} has no bootstrap interval.")
            elif lo <= 0 <= hi:
                warnings.append(f"The {100 * ci_level:.0f} % bootstrap interval of {name}, [{lo:.3g}, {hi:.3g}], "
                                "contains zero.")
            elif hi - lo > abs(value):
                warnings.append(f"The {100 * ci_level:.0f} % bootstrap interval of {name}, [{lo:.3g}, {hi:.3g}], "
                                f"is wider than its value {value:.3g}.")
    return IsoflopFit(
        budgets=tuple(budgets),
        a=point["N"][0], G=math.exp(point["N"][1]), b=point["D"][0], G_D=math.exp(point["D"][1]),
        gamma=-point["L"][0], K=math.exp(point["L"][1]), ci=ci, bootstrap=int(bootstrap), bootstrap_used=n_used,
        identified=not warnings, warnings=warnings, lines=lines, ci_level=ci_level,
    )
