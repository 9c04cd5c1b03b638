"""Published scaling laws as data: the LMU paper's fits (docs/lmu.md) and the Chinchilla frontier (docs/scaling.md)."""

import math

import numpy as np
import pytest

from lmu_jax.errors import UserError
from lmu_jax.scaling import laws
from lmu_jax.scaling.laws import ChinchillaLaw, PowerLaw, lmu_paper_loss

# docs/lmu.md, "The paper's published fits": N, d = sqrt(N/24), then one column per curve
LMU_TABLE_COLUMNS = ("lmu", "lmu_attn", "transformer_S25k", "transformer_S250k", "lstm")
LMU_TABLE = [
    (5.5e4, 47.9, 4.871, 4.774, 5.148, 5.022, 5.240),
    (1e5, 64.5, 4.665, 4.581, 4.923, 4.797, 5.023),
    (3e5, 111.8, 4.311, 4.247, 4.536, 4.410, 4.646),
    (1e6, 204.1, 3.953, 3.908, 4.148, 4.022, 4.265),
    (1e7, 645.5, 3.349, 3.334, 3.499, 3.373, 3.622),
    (1e8, 2041, 2.837, 2.844, 2.955, 2.829, 3.076),
]


@pytest.mark.parametrize("row", LMU_TABLE, ids=lambda row: f"N={row[0]:.0e}")
def test_lmu_paper_fits_reproduce_the_derived_values_table(row):
    N, width, *expected = row
    assert round(math.sqrt(N / 24), 1 if width < 1000 else 0) == width
    for name, value in zip(LMU_TABLE_COLUMNS, expected):
        assert round(float(lmu_paper_loss(name, N)), 3) == value, name


def test_the_table_takes_s_min_equal_to_the_step_count():
    """Eq. 12 with Kaplan's S_min = S / (1 + B_crit(L)/B) at the paper's batch would not give the table."""
    N = np.array([row[0] for row in LMU_TABLE[:4]])  # the fitted range, 55k to 1M
    table = np.array([row[2 + LMU_TABLE_COLUMNS.index("transformer_S25k")] for row in LMU_TABLE[:4]])
    as_printed = laws.KAPLAN_L_N_S.loss(N, 25_000)
    with_batch_correction = laws.KAPLAN_L_N_S.loss_at_steps(N, 25_000, batch_tokens=512 * 1024)
    np.testing.assert_allclose(as_printed, table, atol=5e-4)
    assert np.all(with_batch_correction - table > 0.015)


def test_loss_at_steps_solves_the_critical_batch_fixed_point():
    law = laws.KAPLAN_L_N_S
    loss = law.loss_at_steps(1e6, 25_000, batch_tokens=524_288)
    s_min = 25_000 / (1 + law.critical_batch(loss) / 524_288)
    assert loss == pytest.approx(law.loss(1e6, s_min), rel=1e-12)


def test_unknown_lmu_paper_curve_is_a_user_error():
    with pytest.raises(UserError, match="name='gpt'.*lmu"):
        lmu_paper_loss("gpt", 1e6)


def test_kaplan_constants_in_their_own_notation():
    assert laws.KAPLAN_L_N.loss(8.8e13) == pytest.approx(1.0)
    assert laws.KAPLAN_L_N.x_c == pytest.approx(8.8e13, rel=1e-12)
    assert laws.KAPLAN_L_D.loss(5.4e12) == pytest.approx(10**0.095)
    assert laws.KAPLAN_L_N_S.loss(6.5e13, 2.1e3) == pytest.approx(2.0)


# §2.3 item 6 [derived]: closed-form tokens per parameter at the Chinchilla budget, point estimates
@pytest.mark.parametrize(
    "law, expected",
    [(laws.EPOCH_HEADLINE, 18), (laws.HOFFMANN_ROUNDED, 93), (laws.HOFFMANN_UNROUNDED, 59)],
    ids=["epoch", "hoffmann-rounded", "hoffmann-unrounded"],
)
def test_closed_form_tokens_per_parameter_at_chinchilla_compute(law, expected):
    assert laws.CHINCHILLA_COMPUTE == pytest.approx(5.88e23)
    assert round(float(law.tokens_per_param(laws.CHINCHILLA_COMPUTE))) == expected


def test_compute_optimal_allocation_minimises_the_loss_on_the_isoflop_line():
    law = laws.EPOCH_HEADLINE
    C = 1e21
    n_opt, d_opt = law.compute_optimal(C)
    assert 6 * n_opt * d_opt == pytest.approx(C)
    assert law.a + law.b == pytest.approx(1.0)
    N = n_opt * np.geomspace(0.5, 2.0, 2001)
    losses = law.loss(N, C / (6 * N))
    assert N[np.argmin(losses)] == pytest.approx(n_opt, rel=1e-3)
    assert law.compute_optimal_loss().loss(C) == pytest.approx(law.loss(n_opt, d_opt), rel=1e-12)


def test_power_law_from_scale_round_trips():
    law = PowerLaw.from_scale(3.1e8, 0.05, E=1.5)
    assert law.x_c == pytest.approx(3.1e8, rel=1e-12)
    assert law.loss(3.1e8) == pytest.approx(2.5)


def test_chinchilla_law_broadcasts():
    law = ChinchillaLaw(E=1.0, A=1.0, B=1.0, alpha=1.0, beta=1.0)
    np.testing.assert_allclose(law.loss([1.0, 2.0], [[1.0], [4.0]]), [[3.0, 2.5], [2.25, 1.75]])
