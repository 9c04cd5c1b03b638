"""Scaling laws: functional forms and published constants (``laws``), fitters with convergence and
identifiability checks and bootstrap (``fit``), Chinchilla's IsoFLOP analysis (``isoflop``), held-out
prediction (``rollout``), family comparisons (``compare``) and the ``lmu-jax fit`` command (``commands``).

    from lmu_jax.scaling import fit_chinchilla, fit_isoflop, fit_power_law, frontier, rollout
"""

from lmu_jax.scaling.fit import (
    ChinchillaFit,
    Frontier,
    PowerLawFit,
    fit_chinchilla,
    fit_power_law,
    frontier,
    lower_envelope,
)
from lmu_jax.scaling.isoflop import IsoflopBudget, IsoflopFit, fit_isoflop
from lmu_jax.scaling.laws import ChinchillaLaw, PowerLaw, lmu_paper_loss
from lmu_jax.scaling.rollout import Rollout, rollout

__all__ = [
    "ChinchillaFit",
    "ChinchillaLaw",
    "Frontier",
    "IsoflopBudget",
    "IsoflopFit",
    "PowerLaw",
    "PowerLawFit",
    "Rollout",
    "fit_chinchilla",
    "fit_isoflop",
    "fit_power_law",
    "frontier",
    "lower_envelope",
    "lmu_paper_loss",
    "rollout",
]
