"""Scaling laws: functional forms and published constants (``laws``), fitters with convergence checks
and bootstrap (``fit``), family comparisons (``compare``) and the ``lmu-jax fit`` command (``commands``).

    from lmu_jax.scaling import fit_chinchilla, fit_power_law, frontier
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
from lmu_jax.scaling.laws import ChinchillaLaw, PowerLaw, lmu_paper_loss

__all__ = [
    "ChinchillaFit",
    "ChinchillaLaw",
    "Frontier",
    "PowerLaw",
    "PowerLawFit",
    "fit_chinchilla",
    "fit_power_law",
    "frontier",
    "lower_envelope",
    "lmu_paper_loss",
]
