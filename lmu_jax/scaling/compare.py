"""Comparing families: data efficiency, loss at equal compute, and fitted laws against each other.

Pure numpy. Curves are measured points, interpolated linearly in (log x, log loss), i.e. as a local
power law between neighbouring points, and never extrapolated: where a question falls outside a
curve the answer is NaN, with the reason when there is one to give.

- ``data_efficiency``: how many tokens family X needs to reach family Y's final loss (same N);
  e.g. the LMU paper's "10x more data efficient" is ``ratio ≈ 10`` with X = LMU, Y = transformer.
- ``losses_at_compute``: each family's loss at the same compute budgets.
- ``law_ratio`` / ``crossover``: two fitted L(N) laws at a given N, and the N where they meet;
- ``difference_with_noise``: a difference of seed means with its seed standard error ("within noise"
  under 2σ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmu_jax.errors import bad_value


def _curve(name, x, loss):
    """Validated (x, loss) arrays of one curve: positive, finite, x strictly increasing."""
    x, loss = np.asarray(x, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    if x.size == 0 or x.size != loss.size:
        raise bad_value(f"{name} lengths", (x.size, loss.size), "two non-empty arrays of equal length")
    for label, values in ((f"{name} x", x), (f"{name} loss", loss)):
        if not (np.all(np.isfinite(values)) and np.all(values > 0)):
            raise bad_value(label, values[~(np.isfinite(values) & (values > 0))][0], "finite values > 0")
    if np.any(np.diff(x) <= 0):
        raise bad_value(f"{name} x", x[1:][np.diff(x) <= 0][0], "strictly increasing values")
    return x, loss


def _loglog_interp(x0, y0, x1, y1, y):
    """The x at which the straight line through (log x0, log y0), (log x1, log y1) has log y."""
    t = (math.log(y) - math.log(y0)) / (math.log(y1) - math.log(y0))
    return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))


def tokens_to_reach(tokens, loss, target: float) -> tuple[float, str]:
    """Tokens at which a loss curve first gets down to ``target``, and "" or why that is NaN.

    The crossing is between the first point at or below the target and the point before it. NaN
    when the curve never gets there, or is already below it at its first point (the crossing lies
    before the measured curve).
    """
    tokens, loss = _curve("curve", tokens, loss)
    reached = np.flatnonzero(loss <= target)
    if reached.size == 0:
        lowest = int(loss.argmin())
        return math.nan, f"never reaches loss {target:.6g} (lowest {loss[lowest]:.6g} at {tokens[lowest]:.4g} tokens)"
    i = int(reached[0])
    if i == 0:
        if loss[0] == target:
            return float(tokens[0]), ""
        return math.nan, f"already below {target:.6g} at its first point ({tokens[0]:.4g} tokens, loss {loss[0]:.6g})"
    return _loglog_interp(tokens[i - 1], loss[i - 1], tokens[i], loss[i], target), ""


@dataclass(frozen=True)
class DataEfficiency:
    """Tokens family X needs to match family Y's final loss (curves of the same N)."""

    target_loss: float  # Y's final loss (its last point)
    tokens_y: float  # Y's final token count
    tokens_x: float  # tokens X needs for target_loss (NaN: see reason)
    ratio: float  # tokens_y / tokens_x: > 1 means X needs fewer tokens than Y did
    reason: str  # "" or why tokens_x is NaN


def data_efficiency(tokens_x, loss_x, tokens_y, loss_y) -> DataEfficiency:
    """How many times fewer tokens family X needs than family Y to reach Y's final loss.

    Both are loss-vs-tokens curves (e.g. periodic evals of one run each) at the same N. The target is
    the last point of Y; X's token count comes from ``tokens_to_reach`` (log-log interpolation).
    """
    tokens_y, loss_y = _curve("y", tokens_y, loss_y)
    target = float(loss_y[-1])
    tokens_needed, reason = tokens_to_reach(tokens_x, loss_x, target)
    return DataEfficiency(
        target_loss=target,
        tokens_y=float(tokens_y[-1]),
        tokens_x=tokens_needed,
        ratio=float(tokens_y[-1] / tokens_needed),
        reason=reason,
    )


def loss_at_compute(compute, loss, budgets) -> np.ndarray:
    """One family's loss at each compute budget (log-log interpolation; NaN outside its curve).

    ``compute`` is cumulative training compute along the curve (strictly increasing), in the same
    FLOP convention for every family compared (state it on the plot).
    """
    compute, loss = _curve("curve", compute, loss)
    budgets = np.asarray(budgets, dtype=float)
    inside = (budgets >= compute[0]) & (budgets <= compute[-1])
    log_budgets = np.log(np.where(inside, budgets, compute[0]))
    interpolated = np.exp(np.interp(log_budgets, np.log(compute), np.log(loss)))
    return np.where(inside, interpolated, np.nan)


def losses_at_compute(curves: dict, budgets) -> dict:
    """``{family: losses at budgets}`` for ``curves = {family: (compute, loss)}``."""
    return {family: loss_at_compute(compute, loss, budgets) for family, (compute, loss) in curves.items()}


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) of two groups of seeds, with its standard error from the seeds' scatter."""

    diff: float
    sigma: float  # sqrt(s_a²/n_a + s_b²/n_b); a group of one seed takes the noise floor as its s
    within_noise: bool  # |diff| < 2 sigma (False when sigma is unknown: no seeds and no floor)


def difference_with_noise(a, b, floor: float = math.nan, floor_b: float | None = None) -> Difference:
    """The difference of two groups' means set against seed noise (each group: one value per seed). A
    group of one seed borrows a floor as its scatter: ``floor`` for a, ``floor_b`` (default ``floor``) for b."""
    def variance(values, borrowed):
        return float(np.var(values, ddof=1)) if values.size > 1 else borrowed ** 2

    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    diff = float(a.mean() - b.mean())
    sigma = math.sqrt(variance(a, floor) / a.size + variance(b, floor if floor_b is None else floor_b) / b.size)
    return Difference(diff, sigma, bool(math.isfinite(sigma) and abs(diff) < 2 * sigma))


def _evaluate(law, N):
    """A law's loss at N: laws are callables, or objects with ``.loss(N)`` (PowerLaw) or ``.predict(N)``."""
    for method in ("loss", "predict"):
        if hasattr(law, method):
            return np.asarray(getattr(law, method)(N), dtype=float)
    return np.asarray(law(N), dtype=float)


def law_ratio(law_x, law_y, N):
    """``L_x(N) / L_y(N)``: below 1 where X's fitted law is lower."""
    return _evaluate(law_x, N) / _evaluate(law_y, N)


def crossover(law_x, law_y, lo: float, hi: float, *, rtol: float = 1e-10) -> float:
    """The N in [lo, hi] where two fitted L(N) laws give the same loss (bisection in log N).

    NaN when their difference has the same sign at both ends (no crossing, or an even number).
    """
    def gap(log_n):
        return float(_evaluate(law_x, math.exp(log_n)) - _evaluate(law_y, math.exp(log_n)))

    left, right = math.log(lo), math.log(hi)
    gap_left = gap(left)
    if gap_left == 0:
        return float(lo)
    if gap_left * gap(right) > 0:
        return math.nan
    while right - left > rtol:
        middle = 0.5 * (left + right)
        gap_middle = gap(middle)
        if gap_middle * gap_left > 0:
            left, gap_left = middle, gap_middle
        else:
            right = middle
    return math.exp(0.5 * (left + right))
