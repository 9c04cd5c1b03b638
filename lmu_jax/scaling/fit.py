"""Fitting scaling laws the way Epoch AI refit Chinchilla (arXiv 2404.10102), plus convergence checks.

Both fitters minimise the **summed** Huber loss (delta = 1e-3) of log residuals,

    sum_i  w_i * huber(LSE(e, a_1 - alpha_1 log x_1i, ...) - log L_i),

where ``LSE`` is log-sum-exp, so ``exp(LSE(...)) = E + sum_j A_j x_j**-alpha_j`` with ``E = exp(e)`` and
``A_j = exp(a_j)``; ``w_i`` counts how often run i is in the sample (1, or the bootstrap multiplicity).
The gradient is analytic. The optimiser is scipy's L-BFGS-B with bounds ``E <= min(L)`` and
exponents in ``ALPHA_BOUNDS``, started from every point of a grid.

Why the extra machinery. L-BFGS-B stops when the objective falls by less than ``ftol * max(|f|, 1)``
per step; a Huber objective of log residuals is ~1e-3 summed and ~1e-6 averaged, so that test is an
*absolute* one and stops early (Hoffmann et al.'s fit, see Epoch's "loss scale" finding; on the 245
Chinchilla runs even the summed objective stops 1 % short when started from Hoffmann's constants).
Hence, after the grid:

1. **polish** -- restart L-BFGS-B from the best grid result on the objective divided by its value there
   (so the stopping test is relative) with tight tolerances;
2. **check** -- keep restarting the same way; the fit is ``converged`` once a restart lowers the
   objective by less than ``CONVERGED_RTOL`` (relative), within ``MAX_RESTARTS``. This detects an
   early stop whatever the objective's scale; run without the polish it is what flags the
   mean-objective fit of the loss-scale regression.

Bootstrap: resample the runs with replacement (seeded), refit, and report the standard deviation of
each constant as its standard error and percentile intervals as ``ci``. Each resample starts from the
point fit only (polish + check) rather than the whole grid: the resample's optimum is near the point
fit, and this costs one run instead of thousands. ``bootstrap_from="grid"`` runs the full grid per
resample instead, as a cross-check.

Every fit uses exactly the points it is given; choose them before calling (e.g. the CLI's
``--drop-highest``) and say which in any report.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from lmu_jax.errors import bad_value
from lmu_jax.scaling.laws import ChinchillaLaw, PowerLaw

HUBER_DELTA = 1e-3
ALPHA_BOUNDS = (0.01, 2.0)  # for alpha and beta in both forms (docs/scaling.md)
CONVERGED_RTOL = 1e-8  # a restart from the optimum may lower the objective by at most this, relatively
AGREE_RTOL = 1e-4  # grid starts within this relative objective of the best "agree"
EXACT_FIT_PER_POINT = 1e-12  # objective per point below which a fit is exact: log residuals ~1e-6, far below noise
MAX_RESTARTS = 10  # scale-free restarts after the grid (each is one L-BFGS-B run; usually 2 suffice)

# Hoffmann et al.'s grid as encoded in Epoch's replication: order (e, a, b, alpha, beta), 4500 starts
CHINCHILLA_GRID = np.array(
    list(
        itertools.product(
            np.arange(-1.0, 1.01, 0.5),  # e = log E
            np.arange(0.0, 25.1, 5.0),  # a = log A
            np.arange(0.0, 25.1, 5.0),  # b = log B
            np.arange(0.0, 2.01, 0.5),  # alpha
            np.arange(0.0, 2.01, 0.5),  # beta
        )
    )
)


@contextlib.contextmanager
def single_threaded_blas():
    """Run the block with one BLAS thread (threadpoolctl), restoring the previous setting afterwards.

    scipy's L-BFGS-B makes thousands of tiny BLAS calls per fit; OpenBLAS wakes its thread pool for
    them, which made a Chinchilla grid fit ~30x slower on a 2-core machine shared with other jobs
    (measured: 2.1 ms vs 66 us per objective evaluation).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _with_single_threaded_blas(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_threaded_blas():
            return fn(*args, **kwargs)

    return wrapper


class HuberLogProblem:
    """The objective above for k power-law terms; parameters ``theta = (e, a_1..a_k, alpha_1..alpha_k)``.

    With ``log_E`` given, E is fixed and ``theta = (a_1..a_k, alpha_1..alpha_k)``; ``log_E = -inf``
    means ``E = 0`` (Kaplan's pure power laws).
    """

    def __init__(self, log_x, log_loss, *, delta=HUBER_DELTA, log_E=None, weights=None):
        self.log_x = np.atleast_2d(np.asarray(log_x, dtype=float))  # (k, n)
        self.log_loss = np.asarray(log_loss, dtype=float)
        self.delta = float(delta)
        self.log_E = log_E
        self.weights = np.ones_like(self.log_loss) if weights is None else np.asarray(weights, dtype=float)
        self.k = self.log_x.shape[0]
        self.n_params = 2 * self.k + (log_E is None)

    def reweighted(self, weights) -> HuberLogProblem:
        return HuberLogProblem(self.log_x, self.log_loss, delta=self.delta, log_E=self.log_E, weights=weights)

    def bounds(self):
        exponent_bounds = [ALPHA_BOUNDS] * self.k
        a_bounds = [(None, None)] * self.k
        if self.log_E is None:
            # E <= the smallest loss among the points in play (a resample may leave some out)
            return [(None, float(self.log_loss[self.weights > 0].min()))] + a_bounds + exponent_bounds
        return a_bounds + exponent_bounds

    def _split(self, theta):
        """theta -> (log E, a[k], alpha[k]); log E is -inf when E = 0."""
        theta = np.asarray(theta, dtype=float)
        if self.log_E is None:
            return theta[0], theta[1 : 1 + self.k], theta[1 + self.k :]
        return self.log_E, theta[: self.k], theta[self.k :]

    def _shares(self, theta):
        """Log prediction and each row's share of the sum (softmax weights), computed stably."""
        log_E, a, alpha = self._split(theta)
        terms = a[:, None] - alpha[:, None] * self.log_x  # (k, n): log(A_j x_j**-alpha_j)
        top = np.maximum(terms.max(axis=0), log_E)
        term_share = np.exp(terms - top)
        E_share = np.exp(log_E - top)
        total = term_share.sum(axis=0) + E_share
        return top + np.log(total), term_share / total, E_share / total

    def predict_log(self, theta):
        return self._shares(theta)[0]

    def value_and_grad(self, theta):
        log_prediction, term_share, E_share = self._shares(theta)
        residual = log_prediction - self.log_loss
        psi = np.clip(residual, -self.delta, self.delta)  # huber'(residual)
        value = np.dot(self.weights, psi * (residual - 0.5 * psi))  # = sum w * huber(residual)
        pull = self.weights * psi
        weighted_share = term_share * pull
        grad_a = weighted_share.sum(axis=1)
        grad_alpha = -(weighted_share * self.log_x).sum(axis=1)
        if self.log_E is None:
            return value, np.concatenate([[E_share @ pull], grad_a, grad_alpha])
        return value, np.concatenate([grad_a, grad_alpha])

    def projected_grad_norm(self, theta) -> float:
        """Gradient norm with components that push against an active bound removed."""
        _, grad = self.value_and_grad(theta)
        for i, (lo, hi) in enumerate(self.bounds()):
            at_lower = lo is not None and theta[i] <= lo and grad[i] > 0
            at_upper = hi is not None and theta[i] >= hi and grad[i] < 0
            if at_lower or at_upper:
                grad[i] = 0.0
        return float(np.linalg.norm(grad))


@dataclass(frozen=True)
class Optimum:
    """Where the optimiser ended, and the evidence that it is a minimum."""

    theta: np.ndarray
    objective: float  # summed (weighted) Huber objective at theta
    converged: bool
    message: str
    grad_norm: float  # projected gradient norm of the summed objective at theta
    polish_gain: float  # relative objective decrease that the polish achieved over the grid's best
    n_starts: int
    n_starts_agree: int


def _clip_to_bounds(theta, bounds):
    lo = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    hi = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    return np.clip(np.asarray(theta, dtype=float), lo, hi)


def _restart_normalised(problem, theta):
    """L-BFGS-B from theta on objective / objective(theta), so its stopping tests are relative."""
    value = problem.value_and_grad(theta)[0]
    if value == 0:
        return theta, value, "exact fit"
    result = minimize(
        lambda t: tuple(part / value for part in problem.value_and_grad(t)),
        theta,
        jac=True,
        method="L-BFGS-B",
        bounds=problem.bounds(),
        options={"ftol": 1e-13, "gtol": 1e-10, "maxiter": 5000},
    )
    return result.x, result.fun * value, str(result.message)


@_with_single_threaded_blas
def minimize_from_starts(problem, starts, *, reduction="sum", polish=True, max_starts=None) -> Optimum:
    """Run L-BFGS-B (scipy's default tolerances) from every start; polish the best; check it.

    ``max_starts=K`` runs only the K starts with the lowest initial objective (a cheap screen: on
    the Chinchilla data the best 100 of the 4500 grid starts include 16-18 that reach the optimum).
    ``reduction="mean"`` divides the objective by the number of points during the grid stage. It is
    here only to demonstrate the loss-scale failure: with ``polish=False`` the early stop is reported
    (``converged=False``) rather than fixed.
    """
    if reduction not in ("sum", "mean"):
        raise bad_value("reduction", reduction, "'sum' or 'mean'")
    bounds = problem.bounds()
    starts = np.array([_clip_to_bounds(start, bounds) for start in np.atleast_2d(starts)])
    if max_starts is not None and not (isinstance(max_starts, (int, np.integer)) and max_starts >= 1):
        raise bad_value("max_starts", max_starts, "None (all starts) or an integer >= 1")
    if max_starts is not None and max_starts < len(starts):
        initial = np.array([problem.value_and_grad(start)[0] for start in starts])
        starts = starts[np.argsort(initial, kind="stable")[: int(max_starts)]]
    scale = 1.0 if reduction == "sum" else 1.0 / problem.weights.sum()
    ends = []
    for start in starts:
        result = minimize(
            lambda t: tuple(part * scale for part in problem.value_and_grad(t)),
            start,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
        )
        ends.append((result.fun / scale, result.x, str(result.message)))
    objectives = np.array([value for value, _, _ in ends])
    best_value, theta, message = ends[int(np.nanargmin(objectives))]
    value = problem.value_and_grad(theta)[0]
    exact_floor = EXACT_FIT_PER_POINT * problem.weights.sum()
    # Restart, scale-free, until a restart no longer lowers the objective (the Huber kink can end a
    # line search early, so one polish is not always enough). Without polish: one restart, to detect.
    for restart in range(1, (MAX_RESTARTS if polish else 1) + 1):
        new_theta, new_value, new_message = _restart_normalised(problem, theta)
        gain = (value - new_value) / value if value > 0 else 0.0
        converged = bool(np.isfinite(value) and (gain <= CONVERGED_RTOL or new_value <= exact_floor))
        if not polish:
            break
        if new_value < value:
            theta, value, message = new_theta, new_value, new_message
        if converged:
            break
    if not converged:
        what = "a restart lowers" if not polish else f"after {restart} restarts a restart still lowers"
        message = f"stopped early: {what} the objective by a relative {gain:.3g} ({message})"
    agree = int(np.sum(objectives <= value * (1 + AGREE_RTOL) + exact_floor))
    return Optimum(
        theta=np.asarray(theta),
        objective=float(value),
        converged=converged,
        message=message,
        grad_norm=problem.projected_grad_norm(theta),
        polish_gain=float((best_value - value) / best_value) if best_value > 0 else 0.0,
        n_starts=len(objectives),
        n_starts_agree=agree,
    )


# ----------------------------------------------------------------------------------------- results


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """What every fit reports besides its constants (the subclasses add those as attributes).

    ``stderr``/``ci`` hold NaN unless the fit was bootstrapped (``bootstrap`` resamples over runs).
    ``objective`` is the summed Huber objective; ``converged`` means a scale-free restart from the
    optimum could not lower it (see the module docstring); ``n_starts_agree`` counts the grid starts
    whose own L-BFGS-B run ended within ``AGREE_RTOL`` of the optimum. ``identified`` is False when
    any check of ``identifiability`` failed; ``warnings`` says which, one sentence each.
    """

    stderr: dict
    ci: dict
    objective: float
    converged: bool
    message: str
    grad_norm: float
    n_starts: int
    n_starts_agree: int
    n_points: int
    bootstrap: int = 0
    bootstrap_unconverged: int = 0
    bootstrap_samples: dict = field(default_factory=dict, repr=False, compare=False)
    identified: bool = True
    warnings: list = field(default_factory=list)

    PARAM_NAMES: ClassVar[tuple] = ()  # each subclass names its constants

    @property
    def params(self) -> dict:
        return {name: getattr(self, name) for name in self.PARAM_NAMES}

    def __repr__(self):
        constants = ", ".join(f"{k}={v:.6g}" for k, v in self.params.items())
        return (
            f"{type(self).__name__}({constants}, objective={self.objective:.6g}, converged={self.converged}, "
            f"n_points={self.n_points}, n_starts_agree={self.n_starts_agree}/{self.n_starts}, "
            f"bootstrap={self.bootstrap}, identified={self.identified})"
        )

    def summary(self) -> str:
        lines = []
        for name, value in self.params.items():
            lo, hi = self.ci.get(name, (np.nan, np.nan))
            lines.append(f"{name:>6} = {value:.6g} ± {self.stderr.get(name, np.nan):.3g}  [{lo:.6g}, {hi:.6g}]")
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True, repr=False)
class PowerLawFit(FitResult):
    """``L(x) = E + A * x**-alpha`` fitted by ``fit_power_law``."""

    E: float
    A: float
    alpha: float
    PARAM_NAMES = ("E", "A", "alpha")

    @property
    def law(self) -> PowerLaw:
        return PowerLaw(E=self.E, A=self.A, alpha=self.alpha)

    @property
    def x_c(self) -> float:
        """Kaplan's scale: ``A * x**-alpha == (x_c / x)**alpha``."""
        return self.law.x_c

    def predict(self, x):
        return self.law.loss(x)


@dataclass(frozen=True, kw_only=True, repr=False)
class ChinchillaFit(FitResult):
    """``L(N, D) = E + A / N**alpha + B / D**beta`` fitted by ``fit_chinchilla``.

    ``stderr`` and ``ci`` also cover ``a = beta/(alpha+beta)`` and ``b = alpha/(alpha+beta)``.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    PARAM_NAMES = ("E", "A", "B", "alpha", "beta")

    @property
    def law(self) -> ChinchillaLaw:
        return ChinchillaLaw(E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta)

    @property
    def a(self) -> float:
        return self.law.a

    @property
    def b(self) -> float:
        return self.law.b

    def predict(self, N, D):
        return self.law.loss(N, D)

    def compute_optimal(self, C):
        """``(N_opt, D_opt)`` at compute ``C = 6 N D`` (closed form, point estimates)."""
        return self.law.compute_optimal(C)

    def tokens_per_param(self, C):
        return self.law.tokens_per_param(C)


# ----------------------------------------------------------------------------------------- fitting


def _as_positive(name, values):
    array = np.asarray(values, dtype=float).ravel()
    if array.size and not (np.all(np.isfinite(array)) and np.all(array > 0)):
        bad = array[~(np.isfinite(array) & (array > 0))][0]
        raise bad_value(name, float(bad), "every value must be finite and > 0")
    return array


def _check_points(n_params, **columns):
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise bad_value("lengths", lengths, "all columns must have the same length")
    n = next(iter(lengths.values()))
    if n < n_params + 1:
        raise bad_value("points", n, f"at least {n_params + 1} points are needed to fit {n_params} constants")
    for name, values in columns.items():
        if len(np.unique(values)) < 2:
            raise bad_value(name, float(values[0]), "needs at least 2 distinct values")


def _bootstrap(problem, theta_point, starts, count, seed, bootstrap_from, max_starts):
    """Refit on ``count`` resamples of the runs (drawn with replacement, numpy Generator(seed))."""
    rng = np.random.default_rng(seed)
    n = problem.log_loss.size
    thetas, unconverged = [], 0
    for _ in range(count):
        weights = np.bincount(rng.integers(0, n, size=n), minlength=n)
        resampled = problem.reweighted(weights)
        if bootstrap_from == "grid":
            optimum = minimize_from_starts(resampled, starts, max_starts=max_starts)
        else:
            optimum = minimize_from_starts(resampled, theta_point, polish=True)
        thetas.append(optimum.theta)
        unconverged += not optimum.converged
    return np.array(thetas), unconverged


def _uncertainty(samples: dict, point: dict, ci_level: float):
    if not samples:
        nan = float("nan")
        return {k: nan for k in point}, {k: (nan, nan) for k in point}
    tail = 100 * (1 - ci_level) / 2
    stderr = {k: float(np.std(v, ddof=1)) for k, v in samples.items()}
    ci = {k: tuple(float(q) for q in np.percentile(v, [tail, 100 - tail])) for k, v in samples.items()}
    return stderr, ci


def _check_bootstrap_args(bootstrap, ci_level, bootstrap_from):
    if int(bootstrap) != bootstrap or bootstrap < 0 or bootstrap == 1:
        raise bad_value("bootstrap", bootstrap, "0 (no bootstrap) or an integer >= 2")
    if not 0 < ci_level < 1:
        raise bad_value("ci_level", ci_level, "a probability in (0, 1)")
    if bootstrap_from not in ("point", "grid"):
        raise bad_value("bootstrap_from", bootstrap_from, "'point' or 'grid'")


@_with_single_threaded_blas
def fit_chinchilla(
    N,
    D,
    loss,
    *,
    delta: float = HUBER_DELTA,
    grid=None,
    bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    bootstrap_from: str = "point",
    max_starts: int | None = None,
) -> ChinchillaFit:
    """Fit ``L(N, D) = E + A / N**alpha + B / D**beta`` to every (N, D, loss) point given.

    Method as in the module docstring. ``grid`` is an array of starts ``(e, a, b, alpha, beta)``,
    default ``CHINCHILLA_GRID`` (Hoffmann's 4500 starts, on raw N and D as Epoch fitted them); a start
    outside the bounds is clipped onto them, and ``max_starts`` screens them (``minimize_from_starts``).
    ``bootstrap=K`` adds standard errors and ``ci_level`` percentile intervals from K resamples of
    the runs, seeded by ``seed``; they cover ``a`` and ``b`` as well as the five constants.
    """
    N, D, loss = _as_positive("N", N), _as_positive("D", D), _as_positive("loss", loss)
    _check_points(5, N=N, D=D, loss=loss)
    _check_bootstrap_args(bootstrap, ci_level, bootstrap_from)
    starts = CHINCHILLA_GRID if grid is None else np.atleast_2d(np.asarray(grid, dtype=float))
    problem = HuberLogProblem([np.log(N), np.log(D)], np.log(loss), delta=delta)
    optimum = minimize_from_starts(problem, starts, max_starts=max_starts)

    def constants(theta):
        e, a, b, alpha, beta = np.moveaxis(np.asarray(theta), -1, 0)
        named = {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}
        return named | {"a": beta / (alpha + beta), "b": alpha / (alpha + beta)}

    # (label, coefficient, exponent, mean log of the variable) of each term: see ``identifiability``
    terms = [("A/N^alpha", "A", "alpha", float(np.mean(np.log(N)))),
             ("B/D^beta", "B", "beta", float(np.mean(np.log(D))))]
    return _finish(ChinchillaFit, problem, optimum, starts, constants, free=ChinchillaFit.PARAM_NAMES, terms=terms,
                   bootstrap=bootstrap, seed=seed, ci_level=ci_level, bootstrap_from=bootstrap_from,
                   max_starts=max_starts)


def _finish(cls, problem, optimum, starts, constants, *, free, terms, bootstrap, seed, ci_level, bootstrap_from,
            max_starts):
    """The tail both fitters share: bootstrap, uncertainties, identifiability, the result object.

    ``constants(theta)`` maps optimiser parameters (one row or many) to named constants; ``free``
    names the fitted ones; ``terms`` describe each power-law term for ``identifiability``.
    """
    samples, unconverged = {}, 0
    if bootstrap:
        thetas, unconverged = _bootstrap(problem, optimum.theta, starts, bootstrap, seed, bootstrap_from, max_starts)
        samples = constants(thetas)
    point = {k: float(v) for k, v in constants(optimum.theta).items()}
    stderr, ci = _uncertainty(samples, point, ci_level)
    n_points = problem.log_loss.size
    warnings = identifiability(point, samples, free=free, terms=terms, ci_level=ci_level, n_points=n_points,
                               optimum=optimum, min_loss=float(np.exp(problem.log_loss.min())),
                               unconverged=unconverged, bootstrap=bootstrap)
    message = optimum.message
    if optimum.n_starts > 1 and optimum.n_starts_agree < 2:
        message += "; only one start reached the optimum"
    if unconverged:
        message += f"; {unconverged} of {bootstrap} bootstrap refits did not converge"
    return cls(
        **{k: point[k] for k in cls.PARAM_NAMES},
        stderr=stderr,
        ci=ci,
        objective=optimum.objective,
        converged=optimum.converged,
        message=message,
        grad_norm=optimum.grad_norm,
        n_starts=optimum.n_starts,
        n_starts_agree=optimum.n_starts_agree,
        n_points=n_points,
        bootstrap=int(bootstrap),
        bootstrap_unconverged=unconverged,
        bootstrap_samples=samples,
        identified=not warnings,
        warnings=warnings,
    )


POINTS_PER_CONSTANT = 3  # fewer points than this per free constant cannot pin the constants down
NEAR_ZERO = 0.01  # E below this fraction of the smallest loss has "run to zero"
BOUND_RTOL = 1e-3  # a constant within this (relative) of a bound sits on it
MAX_UNCONVERGED_SHARE = 0.1  # bootstrap refits that may fail to converge before the fit is suspect


def _interval_text(ci_level, name, lo, hi) -> str:
    return f"The {100 * ci_level:.0f} % bootstrap interval of {name}, [{lo:.3g}, {hi:.3g}],"


def identifiability(point, samples, *, free, terms, ci_level, n_points, optimum, min_loss, unconverged,
                    bootstrap) -> list[str]:
    """Sentences saying why a fit's constants are not pinned down by its data; empty when they are.

    Checks: convergence; at least ``POINTS_PER_CONSTANT`` points per free constant; more than one grid
    start reaching the optimum (restarts agree); E not run to zero and not at its bound min(loss);
    exponents not at ``ALPHA_BOUNDS``; and, when bootstrapped, intervals that neither reach zero nor are
    wider than the value, for E, each exponent and each term's size at the data's geometric centre
    (``A * x**-alpha`` there). A and B themselves are not judged: they are the terms extrapolated to
    x = 1, far outside any data, and trade off against the exponents even when the law is well fixed.
    """
    warnings = []
    if not optimum.converged:
        warnings.append(f"The optimiser did not converge ({optimum.message}).")
    if "E" in free:
        if point["E"] < NEAR_ZERO * min_loss:
            warnings.append(f"E = {point['E']:.3g} ran to zero (below {100 * NEAR_ZERO:g} % of the smallest loss, "
                            f"{min_loss:.4g}): the data do not reach the irreducible loss, so E, A and alpha trade "
                            "off freely.")
        elif point["E"] > (1 - BOUND_RTOL) * min_loss:
            warnings.append(f"E = {point['E']:.4g} sits at its bound, the smallest loss: the law saturates "
                            "inside the data.")
    exponents = [exponent for _, _, exponent, _ in terms]
    for name in exponents:
        for bound in ALPHA_BOUNDS:
            if abs(point[name] - bound) <= BOUND_RTOL * bound + 1e-9:
                warnings.append(f"{name} = {point[name]:.4g} sits at its bound {bound:g}.")
    if n_points < POINTS_PER_CONSTANT * len(free):
        warnings.append(f"{n_points} points for {len(free)} free constants: fewer than {POINTS_PER_CONSTANT} "
                        "points per constant cannot pin them down.")
    if optimum.n_starts > 1 and optimum.n_starts_agree < 2:
        warnings.append(f"Only 1 of {optimum.n_starts} starts reached the optimum: restarts disagree, so "
                        "another minimum may fit as well.")
    if bootstrap and unconverged > MAX_UNCONVERGED_SHARE * bootstrap:
        warnings.append(f"{unconverged} of {bootstrap} bootstrap refits did not converge.")
    if not samples:
        return warnings
    tail = 100 * (1 - ci_level) / 2
    point = dict(point)
    judged = {name: samples[name] for name in (["E"] if "E" in free else []) + exponents}
    for label, coefficient, exponent, log_centre in terms:
        judged[f"{label} at the data's centre"] = samples[coefficient] * np.exp(-samples[exponent] * log_centre)
        point[f"{label} at the data's centre"] = point[coefficient] * np.exp(-point[exponent] * log_centre)
    for name, values in judged.items():
        lo, hi = np.percentile(values, [tail, 100 - tail])
        zero = NEAR_ZERO * (min_loss if name == "E" else abs(point[name]))
        if lo <= zero:
            warnings.append(f"{_interval_text(ci_level, name, lo, hi)} reaches zero.")
        elif hi - lo > abs(point[name]):
            warnings.append(f"{_interval_text(ci_level, name, lo, hi)} is wider than its value "
                            f"{point[name]:.3g}.")
    return warnings


def power_law_grid(loss, *, fixed_E: bool = False):
    """Default starts ``(e, a', alpha)`` for ``fit_power_law``, where x is in units of its geometric mean.

    In those units ``A'`` is the loss above E at the middle of the data, so ``a'`` is tried at
    fractions of the typical loss and ``e`` at fractions of the smallest loss (E must lie below it).
    """
    loss = np.asarray(loss, dtype=float)
    e_values = np.log(loss.min() * np.array([0.1, 0.5, 0.9, 0.99]))
    a_values = np.log(np.median(loss) * np.array([0.003, 0.03, 0.3, 1.0]))
    alpha_values = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    if fixed_E:
        return np.array(list(itertools.product(a_values, alpha_values)))
    return np.array(list(itertools.product(e_values, a_values, alpha_values)))


@_with_single_threaded_blas
def fit_power_law(
    x,
    loss,
    *,
    E: float | None = None,
    delta: float = HUBER_DELTA,
    grid=None,
    bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    bootstrap_from: str = "point",
    max_starts: int | None = None,
) -> PowerLawFit:
    """Fit ``L(x) = E + A * x**-alpha`` to every (x, loss) point given, in log space.

    Same objective, optimiser, checks and bootstrap as ``fit_chinchilla`` (one term instead of two).
    ``E=None`` fits E (bounded by the smallest loss); ``E=0.0`` fits Kaplan's pure power law
    ``(x_c / x)**alpha``; another number holds E fixed there. Internally x is divided by its geometric
    mean (the fit is the same, the grid is better conditioned); ``grid`` rows are ``(e, a', alpha)``
    in those units (``(a', alpha)`` with E fixed), default ``power_law_grid(loss)``; ``max_starts``
    screens them as in ``minimize_from_starts``.
    """
    x, loss = _as_positive("x", x), _as_positive("loss", loss)
    if E is not None and not (np.isfinite(E) and 0 <= E < loss.min()):
        raise bad_value("E", E, f"None (fit it) or a fixed value in [0, min(loss)={loss.min():.6g})")
    n_free = 3 if E is None else 2
    _check_points(n_free, x=x, loss=loss)
    _check_bootstrap_args(bootstrap, ci_level, bootstrap_from)
    log_x0 = float(np.mean(np.log(x)))
    log_E = None if E is None else (np.log(E) if E > 0 else -np.inf)
    problem = HuberLogProblem(np.log(x) - log_x0, np.log(loss), delta=delta, log_E=log_E)
    starts = power_law_grid(loss, fixed_E=E is not None) if grid is None else np.atleast_2d(grid)
    optimum = minimize_from_starts(problem, starts, max_starts=max_starts)

    def constants(theta):
        columns = np.moveaxis(np.asarray(theta), -1, 0)
        e = columns[0] if E is None else np.log(E) if E > 0 else -np.inf
        a_scaled, alpha = columns[-2], columns[-1]
        E_values = np.exp(e) * np.ones_like(alpha)
        return {"E": E_values, "A": np.exp(a_scaled + alpha * log_x0), "alpha": alpha}

    return _finish(PowerLawFit, problem, optimum, starts, constants,
                   free=("E", "A", "alpha") if E is None else ("A", "alpha"),
                   terms=[("A/x^alpha", "A", "alpha", log_x0)], bootstrap=bootstrap, seed=seed,
                   ci_level=ci_level, bootstrap_from=bootstrap_from, max_starts=max_starts)


# ----------------------------------------------------------------------------------------- frontier


@dataclass(frozen=True)
class Frontier:
    """The compute frontier: the lower envelope of (compute, loss) points and a power law fitted to it."""

    indices: np.ndarray  # positions (into the arrays given) of the envelope points, by increasing compute
    compute: np.ndarray
    loss: np.ndarray
    fit: PowerLawFit


def lower_envelope(compute, loss) -> np.ndarray:
    """Indices of the points no cheaper point beats: loss strictly below every point of lower compute.

    These are the compute-efficient runs (Kaplan's L(C_min), Hoffmann's Approach 1 envelope),
    returned in order of increasing compute. Of points with equal compute only the lowest loss counts.
    """
    compute, loss = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    order = np.lexsort((loss, compute))
    kept, best = [], np.inf
    for i in order:
        if loss[i] < best:
            kept.append(i)
            best = loss[i]
    return np.array(kept, dtype=int)


def frontier(compute, loss, **fit_kwargs) -> Frontier:
    """Lower envelope of (compute, loss) for one family, and ``fit_power_law`` on those points only.

    Pass the points of one family at a time (the CLI groups by family); ``fit_kwargs`` go to
    ``fit_power_law`` (e.g. ``E=0.0`` for Kaplan's pure L(C), ``bootstrap=200``). The fit's bootstrap
    resamples the envelope points, not all runs.
    """
    compute, loss = _as_positive("C", compute), _as_positive("loss", loss)
    indices = lower_envelope(compute, loss)
    fit = fit_power_law(compute[indices], loss[indices], **fit_kwargs)
    return Frontier(indices=indices, compute=compute[indices], loss=loss[indices], fit=fit)
