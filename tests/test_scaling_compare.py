"""Family comparisons: data efficiency, loss at equal compute, fitted-law ratios and crossovers."""

import math

import numpy as np
import pytest

from lmu_jax.errors import UserError
from lmu_jax.scaling import compare
from lmu_jax.scaling.laws import LMU_PAPER_FITS, PowerLaw

TOKENS = np.geomspace(1e8, 1.3e11, 25)


def transformer_curve(tokens):
    return 6.0 * tokens**-0.05  # a pure power law: log-log interpolation is exact on it


def test_tokens_to_reach_is_exact_on_a_power_law():
    target = 1.9
    tokens, reason = compare.tokens_to_reach(TOKENS, transformer_curve(TOKENS), target)
    assert reason == ""
    assert tokens == pytest.approx((6.0 / target) ** 20, rel=1e-10)


def test_a_family_that_learns_ten_times_faster_is_ten_times_more_data_efficient():
    lmu_like = transformer_curve(10 * TOKENS[:20])  # the same curve, 10x fewer tokens, shorter run
    result = compare.data_efficiency(TOKENS[:20], lmu_like, TOKENS, transformer_curve(TOKENS))
    assert result.target_loss == pytest.approx(transformer_curve(TOKENS[-1]))
    assert result.tokens_y == TOKENS[-1]
    assert result.ratio == pytest.approx(10.0, rel=1e-9)
    assert result.reason == ""


def test_a_curve_that_never_reaches_the_target_gives_nan_and_says_why():
    worse = transformer_curve(TOKENS) + 0.5
    result = compare.data_efficiency(TOKENS, worse, TOKENS, transformer_curve(TOKENS))
    assert math.isnan(result.tokens_x) and math.isnan(result.ratio)
    assert "never reaches" in result.reason


def test_a_curve_already_below_the_target_at_its_first_point_gives_nan():
    tokens, reason = compare.tokens_to_reach(TOKENS, transformer_curve(TOKENS), target=5.0)
    assert math.isnan(tokens) and "already below" in reason


def test_first_crossing_of_a_noisy_curve():
    tokens = np.array([1.0, 2.0, 4.0, 8.0])
    loss = np.array([4.0, 2.0, 2.5, 1.0])  # dips to 2.0, bounces, falls again
    reached, _ = compare.tokens_to_reach(tokens, loss, 3.0)
    assert reached == pytest.approx(4 / 3)  # on the log-log line through (1, 4) and (2, 2): loss = 4 / t


def test_loss_at_compute_interpolates_in_log_log_and_never_extrapolates():
    compute = np.geomspace(1e15, 1e19, 9)
    law = PowerLaw(E=0.0, A=80.0, alpha=0.07)
    budgets = np.array([1e14, 3e15, 1e17, 1e19, 1e20])
    loss = compare.loss_at_compute(compute, law.loss(compute), budgets)
    np.testing.assert_allclose(loss[1:4], law.loss(budgets[1:4]), rtol=1e-12)
    assert np.isnan(loss[0]) and np.isnan(loss[4])


def test_losses_at_compute_per_family():
    compute = np.geomspace(1e15, 1e19, 9)
    curves = {"lmu": (compute, 70.0 * compute**-0.07), "transformer": (compute, 80.0 * compute**-0.07)}
    losses = compare.losses_at_compute(curves, [1e16, 1e18])
    assert set(losses) == {"lmu", "transformer"}
    np.testing.assert_allclose(losses["lmu"] / losses["transformer"], 70 / 80)


def test_law_ratio_of_the_lmu_paper_fits():
    ratio = compare.law_ratio(LMU_PAPER_FITS["lmu"], LMU_PAPER_FITS["transformer_S25k"], 1e6)
    assert ratio == pytest.approx(3.953 / 4.148, abs=2e-4)
    law = PowerLaw.from_scale(1.95e14, 0.072)
    assert compare.law_ratio(law, law, [1e5, 1e6]) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize(
    "x, y, expected",
    [("lmu", "transformer_S250k", 5.2e7), ("lmu_attn", "transformer_S250k", 4.8e7), ("lmu_attn", "lmu", 4.2e7)],
)
def test_extrapolated_crossovers_of_lmu_md_section_10(x, y, expected):
    N = compare.crossover(LMU_PAPER_FITS[x], LMU_PAPER_FITS[y], 1e6, 1e9)
    assert float(f"{N:.1e}") == expected


def test_laws_that_never_cross_give_nan():
    assert math.isnan(compare.crossover(LMU_PAPER_FITS["lmu"], LMU_PAPER_FITS["lstm"], 1e4, 1e7))


@pytest.mark.parametrize(
    "tokens, loss, match",
    [
        ([1.0, 1.0, 2.0], [3.0, 2.0, 1.0], "strictly increasing"),
        ([1.0, 2.0], [3.0, np.nan], "finite"),
        ([1.0], [], "lengths"),
    ],
)
def test_bad_curves_are_user_errors(tokens, loss, match):
    with pytest.raises(UserError, match=match):
        compare.tokens_to_reach(tokens, loss, 2.0)
