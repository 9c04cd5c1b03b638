"""Held-out prediction ("rollout"): fit a law without the largest runs, then predict them.

A law is worth what it predicts. ``rollout`` holds out the runs of the largest FLOP budget
(``top-budget``) or the largest size (``top-size``), fits the law to the rest with a bootstrap, and
gives each held-out run a prediction interval from two sources added in log space:

- parameter uncertainty: the law of every bootstrap refit evaluated at the held-out point;
- residual scatter: a log residual of the fit on the training points (scaled by sqrt(n / (n - p))
  for the p constants fitted), drawn at random for each refit.

The interval is the percentile interval of those samples; a well-calibrated fit puts about
``ci_level`` of held-out runs inside their intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmu_jax.errors import bad_value
from lmu_jax.scaling.fit import ChinchillaFit, fit_chinchilla, fit_power_law
from lmu_jax.scaling.isoflop import group_budgets

HOLDOUTS = ("top-budget", "top-size")
LAWS = ("chinchilla", "kaplan-n", "kaplan-d", "frontier")
FREE_CONSTANTS = {"chinchilla": 5, "kaplan-n": 3, "kaplan-d": 3, "frontier": 3}


@dataclass(frozen=True)
class Rollout:
    """Predictions for the held-out runs of a fit made without them."""

    law: str
    holdout: str
    fit: object  # the FitResult on the training runs
    held: np.ndarray  # indices (into the arrays given) of the held-out runs
    measured: np.ndarray
    predicted: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    ci_level: float

    @property
    def inside(self) -> np.ndarray:
        return (self.lo <= self.measured) & (self.measured <= self.hi)

    @property
    def error(self) -> np.ndarray:
        """Relative error of the prediction, (predicted - measured) / measured."""
        return (self.predicted - self.measured) / self.measured


def held_out(holdout: str, N, C) -> np.ndarray:
    """Boolean mask of the runs ``holdout`` leaves out: the largest budget's, or the largest size's."""
    if holdout == "top-budget":
        labels = group_budgets(C)
        return labels == labels.max()
    if holdout == "top-size":
        N = np.asarray(N, dtype=float)
        return N == N.max()
    raise bad_value("--holdout", holdout, f"one of {', '.join(HOLDOUTS)}")


def _law_values(law, constants, N, D, C):
    """The law's loss for every set of constants (arrays over resamples) at every point: (resamples, points)."""
    c = {k: np.atleast_1d(np.asarray(v, dtype=float))[:, None] for k, v in constants.items()}
    if law == "chinchilla":
        return c["E"] + c["A"] * N[None, :] ** -c["alpha"] + c["B"] * D[None, :] ** -c["beta"]
    x = {"kaplan-n": N, "kaplan-d": D, "frontier": C}[law]
    return c["E"] + c["A"] * x[None, :] ** -c["alpha"]


def rollout(law: str, N, D, C, loss, *, holdout: str, bootstrap: int = 100, seed: int = 0,
            ci_level: float = 0.95, **fit_kwargs) -> Rollout:
    """Fit ``law`` on the runs ``holdout`` keeps and predict the ones it leaves out (module docstring).

    The rows are the points the law uses (``commands.points_for_law``); ``fit_kwargs`` go to the fitter
    (``grid``, ``max_starts``). Bad choices are ``UserError``: a holdout that leaves nothing out or
    too few points to fit, or fewer than 2 bootstrap resamples.
    """
    if law not in LAWS:
        raise bad_value("--law", law, f"one of {', '.join(LAWS)} with --holdout")
    N, D, C, loss = (np.asarray(v, dtype=float).ravel() for v in (N, D, C, loss))
    if int(bootstrap) != bootstrap or bootstrap < 2:
        raise bad_value("--bootstrap", bootstrap, "an integer >= 2 with --holdout (it gives the prediction intervals)")
    held = held_out(holdout, N, C)
    kept = ~held
    what = "budget" if holdout == "top-budget" else "size"
    if not kept.any():
        raise bad_value("--holdout", holdout, f"needs at least 2 distinct {what}s: this one leaves nothing to fit")
    n_free = FREE_CONSTANTS[law]
    if kept.sum() < n_free + 1:
        raise bad_value("--holdout", holdout, f"leaves {int(kept.sum())} point(s) to fit the {n_free} constants of "
                        f"{law}: at least {n_free + 1} are needed")
    options = dict(bootstrap=bootstrap, seed=seed, ci_level=ci_level, **fit_kwargs)
    if law == "chinchilla":
        fit = fit_chinchilla(N[kept], D[kept], loss[kept], **options)
    else:
        x = {"kaplan-n": N, "kaplan-d": D, "frontier": C}[law]
        fit = fit_power_law(x[kept], loss[kept], **options)
    names = ChinchillaFit.PARAM_NAMES if law == "chinchilla" else ("E", "A", "alpha")

    def log_law(constants, rows):
        return np.log(_law_values(law, constants, N[rows], D[rows], C[rows]))

    point = {k: fit.params[k] for k in names}
    residuals = np.log(loss[kept]) - log_law(point, kept)[0]
    dof = kept.sum() - n_free
    residuals = residuals * math.sqrt(kept.sum() / dof)
    rng = np.random.default_rng(seed + 1)  # not the bootstrap's own stream
    samples = log_law({k: fit.bootstrap_samples[k] for k in names}, held)  # (bootstrap, held)
    samples = samples + rng.choice(residuals, size=samples.shape)
    tail = 100 * (1 - ci_level) / 2
    lo, hi = np.exp(np.percentile(samples, [tail, 100 - tail], axis=0))
    return Rollout(law=law, holdout=holdout, fit=fit, held=np.flatnonzero(held), measured=loss[held],
                   predicted=np.exp(log_law(point, held)[0]), lo=lo, hi=hi, ci_level=ci_level)
