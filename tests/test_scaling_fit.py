"""The fitters: Epoch's Chinchilla golden numbers, the loss-scale regression, synthetic recovery, frontier.

Cost: one full 4500-start grid fit (the 240-run golden, ~17 s of CPU), shared by the tests that need a
point fit; everything else uses screened grids (``max_starts``) or starts from that point fit.
"""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import check_grad

from lmu_jax.errors import UserError
from lmu_jax.scaling import fit_chinchilla, fit_power_law, frontier, lower_envelope
from lmu_jax.scaling import laws
from lmu_jax.scaling.commands import read_table
from lmu_jax.scaling.fit import HuberLogProblem, minimize_from_starts, single_threaded_blas
from lmu_jax.scaling.laws import ChinchillaLaw, PowerLaw

CHINCHILLA_CSV = str(Path(__file__).parent / "data" / "chinchilla_epoch_fig4.csv")


@pytest.fixture(scope="module")
def chinchilla_runs():
    """All 245 runs (N, D = C/6N, loss) and the indices of the 240 without the 5 highest losses."""
    table = read_table(CHINCHILLA_CSV)
    N, D, loss = table["N"], table["D"], table["loss"]
    assert len(loss) == 245
    kept = np.sort(np.argsort(loss)[:-5])
    return N, D, loss, kept


@pytest.fixture(scope="module")
def fit_240(chinchilla_runs):
    N, D, loss, kept = chinchilla_runs
    return fit_chinchilla(N[kept], D[kept], loss[kept])  # the full published grid


def test_golden_point_fit_on_240_runs(fit_240):
    fit = fit_240
    assert fit.E == pytest.approx(1.8172, abs=0.005)
    assert fit.alpha == pytest.approx(0.3473, abs=0.005)
    assert fit.beta == pytest.approx(0.3672, abs=0.005)
    assert fit.A == pytest.approx(477.8, rel=0.05)
    assert fit.B == pytest.approx(2143.9, rel=0.05)
    assert fit.objective == pytest.approx(1.01827e-3, rel=1e-4)  # the summed objective at the refit's optimum
    assert fit.converged, fit.message
    assert fit.n_points == 240 and fit.n_starts == 4500
    assert fit.n_starts_agree > 100  # hundreds of starts end at the same optimum
    assert fit.predict(1e9, 2e10) == pytest.approx(fit.law.loss(1e9, 2e10))
    assert fit.a == pytest.approx(0.5139, abs=1e-3)


def test_all_245_runs_land_elsewhere(chinchilla_runs):
    N, D, loss, _ = chinchilla_runs
    fit = fit_chinchilla(N, D, loss, max_starts=300)  # screened grid: see minimize_from_starts
    assert fit.converged, fit.message
    assert fit.E == pytest.approx(1.8913, abs=0.005)
    assert fit.alpha == pytest.approx(0.3493, abs=0.005)
    assert fit.beta == pytest.approx(0.4531, abs=0.005)
    assert fit.A == pytest.approx(495.7, rel=0.05)
    assert fit.B == pytest.approx(12847, rel=0.05)
    assert fit.objective == pytest.approx(1.8260e-3, rel=1e-4)


def test_bootstrap_standard_errors_near_epochs(chinchilla_runs, fit_240):
    """200 resamples, each started from the point fit (the full run used 4000; see the report)."""
    N, D, loss, kept = chinchilla_runs
    point = fit_240
    start = [np.log(point.E), np.log(point.A), np.log(point.B), point.alpha, point.beta]
    fit = fit_chinchilla(N[kept], D[kept], loss[kept], grid=[start], bootstrap=200, seed=42)
    assert fit.alpha == pytest.approx(point.alpha, abs=1e-6)  # the one-start point fit is the same
    assert fit.stderr["alpha"] == pytest.approx(0.015, abs=0.003)  # Epoch: 0.0154
    assert fit.stderr["beta"] == pytest.approx(0.021, abs=0.005)  # Epoch: 0.021
    assert fit.stderr["E"] == pytest.approx(0.026, abs=0.006)  # Epoch: 0.026
    assert fit.bootstrap == 200 and fit.bootstrap_unconverged == 0
    for name in ("E", "A", "B", "alpha", "beta", "a"):
        lo, hi = fit.ci[name]
        assert lo < getattr(fit, name) < hi
        assert len(fit.bootstrap_samples[name]) == 200


def test_bootstrap_is_reproducible_from_its_seed(chinchilla_runs, fit_240):
    N, D, loss, kept = chinchilla_runs
    p = fit_240
    start = [np.log(p.E), np.log(p.A), np.log(p.B), p.alpha, p.beta]
    runs = [fit_chinchilla(N[kept], D[kept], loss[kept], grid=[start], bootstrap=10, seed=s) for s in (7, 7, 8)]
    assert runs[0].stderr == runs[1].stderr
    assert runs[0].stderr != runs[2].stderr


def test_resamples_started_from_the_point_fit_match_a_grid_per_resample(chinchilla_runs):
    """Justifies the cheap bootstrap: the point fit is a good enough start for every resample."""
    N, D, loss, kept = chinchilla_runs
    options = dict(max_starts=50, bootstrap=5, seed=3)
    per_grid = fit_chinchilla(N[kept], D[kept], loss[kept], bootstrap_from="grid", **options)
    from_point = fit_chinchilla(N[kept], D[kept], loss[kept], **options)
    for name in ("E", "A", "B", "alpha", "beta"):
        np.testing.assert_allclose(from_point.bootstrap_samples[name], per_grid.bootstrap_samples[name], rtol=2e-3)


def test_loss_scale_regression_mean_objective_stops_early_and_is_detected(chinchilla_runs):
    """Epoch's finding 3: a *mean* Huber objective with default L-BFGS tolerances, from Hoffmann's
    unrounded constants, stops almost where it started (Hoffmann's answer, not the optimum)."""
    N, D, loss, _ = chinchilla_runs
    hoffmann = laws.HOFFMANN_UNROUNDED
    start = [np.log(hoffmann.E), np.log(hoffmann.A), np.log(hoffmann.B), hoffmann.alpha, hoffmann.beta]
    problem = HuberLogProblem([np.log(N), np.log(D)], np.log(loss))

    stuck = minimize_from_starts(problem, start, reduction="mean", polish=False)
    A, B, E = np.exp(stuck.theta[[1, 2, 0]])
    assert (A, B, E) == pytest.approx((406.40, 410.73, 1.6934), rel=2e-4)  # where the mean-objective fit stops early
    assert not stuck.converged and "stopped early" in stuck.message

    handled = minimize_from_starts(problem, start, reduction="mean")  # polish: scale-free restarts
    assert handled.converged, handled.message
    assert handled.objective == pytest.approx(1.826011e-3, rel=1e-6)  # the 245-run optimum
    assert np.exp(handled.theta[1]) == pytest.approx(495.7, rel=1e-3)
    assert handled.polish_gain > 0.15

    # The summed objective alone is not enough from this single start either (it stops ~1 % short
    # with default tolerances); the same check flags it, and the polish fixes it.
    summed = minimize_from_starts(problem, start, polish=False)
    assert not summed.converged and summed.objective > 1.01 * handled.objective


def test_analytic_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    log_x = rng.normal(20, 2, size=(2, 60))
    log_loss = np.log(2 + rng.random(60))
    for log_E in (None, np.log(1.2), -np.inf):
        problem = HuberLogProblem(log_x, log_loss, log_E=log_E, weights=rng.integers(0, 3, 60))
        theta = np.r_[[0.5] if log_E is None else [], [5.0, 6.0, 0.3, 0.3]] + rng.normal(0, 0.1, problem.n_params)
        value, grad = problem.value_and_grad(theta)
        assert np.linalg.norm(grad) > 0.1
        error = check_grad(lambda t: problem.value_and_grad(t)[0], lambda t: problem.value_and_grad(t)[1], theta)
        assert error < 1e-6 * np.linalg.norm(grad)


def _noisy_chinchilla(truth, seed, sigma=0.005):
    rng = np.random.default_rng(seed)
    N = np.repeat(np.geomspace(5e7, 5e9, 8), 5)
    D = N * np.tile([5.0, 10.0, 20.0, 40.0, 80.0], 8)
    return N, D, truth.loss(N, D) * np.exp(rng.normal(0, sigma, N.size))


def test_chinchilla_fit_recovers_known_constants_within_its_intervals():
    """Four noise draws x five constants: a 95 % interval should miss about 1 in 20 (this set: 2)."""
    truth = ChinchillaLaw(E=1.7, A=400.0, B=1200.0, alpha=0.33, beta=0.29)
    covered = []
    for seed in range(4):
        fit = fit_chinchilla(*_noisy_chinchilla(truth, seed), max_starts=100, bootstrap=100, seed=0)
        assert fit.converged, fit.message
        for name in fit.PARAM_NAMES:
            lo, hi = fit.ci[name]
            covered.append(lo <= getattr(truth, name) <= hi)
            assert abs(getattr(fit, name) - getattr(truth, name)) < 4 * fit.stderr[name]
    assert sum(covered) >= 18, covered


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_fit_recovers_known_constants_within_its_intervals(seed):
    truth = PowerLaw(E=2.0, A=50.0, alpha=0.3)
    rng = np.random.default_rng(seed)
    x = np.geomspace(1e6, 1e9, 15)
    fit = fit_power_law(x, truth.loss(x) * np.exp(rng.normal(0, 0.003, x.size)), bootstrap=100, seed=0)
    assert fit.converged, fit.message
    for name in fit.PARAM_NAMES:
        lo, hi = fit.ci[name]
        assert lo <= getattr(truth, name) <= hi, name


def test_exact_data_give_the_exact_constants():
    x = np.geomspace(1e6, 1e9, 12)
    saturating = fit_power_law(x, PowerLaw(E=2.0, A=50.0, alpha=0.3).loss(x))
    assert (saturating.E, saturating.A, saturating.alpha) == pytest.approx((2.0, 50.0, 0.3), rel=1e-6)
    assert saturating.converged and saturating.n_starts_agree > 1
    kaplan = fit_power_law(x, laws.KAPLAN_L_N.loss(x), E=0.0)  # pure power law, E held at 0
    assert kaplan.E == 0.0
    assert (kaplan.x_c, kaplan.alpha) == pytest.approx((8.8e13, 0.076), rel=1e-6)


def test_frontier_of_dense_runs_follows_the_closed_form_compute_optimal_loss():
    truth = laws.EPOCH_HEADLINE
    N, tokens_per_param = np.meshgrid(np.geomspace(1e7, 1e11, 41), np.geomspace(1, 300, 41))
    N, D = N.ravel(), (N * tokens_per_param).ravel()
    C, loss = 6 * N * D, truth.loss(N, D)
    result = frontier(C, loss)
    assert np.all(np.diff(result.compute) > 0) and np.all(np.diff(result.loss) < 0)
    expected = truth.compute_optimal_loss()
    assert result.fit.converged, result.fit.message
    assert result.fit.alpha == pytest.approx(expected.alpha, rel=0.03)  # alpha beta / (alpha + beta)
    assert result.fit.E == pytest.approx(truth.E, abs=0.02)
    inner = (result.compute > 1e18) & (result.compute < 1e24)
    C_inner = result.compute[inner]
    np.testing.assert_allclose(result.fit.predict(C_inner), expected.loss(C_inner), rtol=3e-3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=40))
def test_lower_envelope_keeps_exactly_the_undominated_points(points):
    compute, loss = (np.array(column, dtype=float) for column in zip(*points))
    kept = lower_envelope(compute, loss)
    assert np.all(np.diff(compute[kept]) > 0) and np.all(np.diff(loss[kept]) < 0)
    for k in kept:  # nothing reaches a lower loss with no more compute
        assert not np.any((compute <= compute[k]) & (loss < loss[k]))
    for i in range(len(compute)):  # every run is matched or beaten by an envelope point
        assert np.any((compute[kept] <= compute[i]) & (loss[kept] <= loss[i]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fit_chinchilla([1e8] * 5, [1e9] * 5, [3.0] * 5), "points=5"),
        (lambda: fit_power_law([1, 2, 3, 4], [3.0, 2.0, -1.0, 1.5]), "loss=-1.0"),
        (lambda: fit_power_law([1, 2, 3], [3.0, 2.0, 1.5, 1.2]), "lengths"),
        (lambda: fit_power_law(np.arange(1, 9), np.linspace(3, 2, 8), E=2.5), "E=2.5"),
        (lambda: fit_power_law(np.arange(1, 9), np.linspace(3, 2, 8), bootstrap=1), "bootstrap=1"),
        (lambda: fit_power_law(np.arange(1, 9), np.linspace(3, 2, 8), max_starts=0), "max_starts=0"),
    ],
)
def test_bad_input_is_a_user_error(call, match):
    with pytest.raises(UserError, match=match):
        call()


def test_fits_pin_blas_to_one_thread_and_restore_it():
    """L-BFGS-B's tiny BLAS calls are ~30x slower when OpenBLAS wakes its thread pool on shared cores."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library that threadpoolctl can see is loaded")
    with single_threaded_blas():
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
