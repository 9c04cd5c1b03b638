"""Scaling-law functional forms and the published constants, as data.

Two forms carry everything the fitters produce:

- ``PowerLaw``: ``L(x) = E + A * x**-alpha`` (Kaplan's pure forms are ``E = 0``, ``A = x_c**alpha``);
- ``ChinchillaLaw``: ``L(N, D) = E + A / N**alpha + B / D**beta`` with its compute-optimal frontier
  under ``C = 6 N D`` (Hoffmann et al. 2022, App. D.2).

Published laws live here as module constants, so plots can overlay them and tests can check them:
Kaplan et al. 2020 (L(N), L(D), L(C_min), L(N, S)), Hoffmann et al. 2022 (rounded and unrounded),
the Epoch AI replication (arXiv 2404.10102) and the LMU paper's fits (Chilkuri et al. 2021, Sec. 5;
``LMU_PAPER_FITS`` and ``lmu_paper_loss``). Losses are in nats per token; N counts non-embedding
parameters for Kaplan and the LMU paper, all parameters for Chinchilla.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmu_jax.errors import bad_value


@dataclass(frozen=True)
class PowerLaw:
    """``L(x) = E + A * x**-alpha``: a saturating power law in one variable (N, D or compute)."""

    E: float
    A: float
    alpha: float

    @classmethod
    def from_scale(cls, x_c: float, alpha: float, E: float = 0.0) -> PowerLaw:
        """Kaplan's way of writing it, ``E + (x_c / x)**alpha``."""
        return cls(E=E, A=x_c**alpha, alpha=alpha)

    @property
    def x_c(self) -> float:
        """The scale in Kaplan's notation: ``A * x**-alpha == (x_c / x)**alpha``."""
        return self.A ** (1.0 / self.alpha)

    def loss(self, x):
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha


@dataclass(frozen=True)
class ChinchillaLaw:
    """``L(N, D) = E + A / N**alpha + B / D**beta`` (Hoffmann et al. 2022, Approach 3).

    The compute-optimal allocation assumes ``C = 6 N D``: minimising L on that curve gives
    ``N_opt = G (C/6)**a`` and ``D_opt = (C/6)**b / G`` with ``G = (alpha A / (beta B))**(1/(alpha+beta))``,
    ``a = beta / (alpha + beta)`` and ``b = alpha / (alpha + beta)``.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        N = np.asarray(N, dtype=float)
        D = np.asarray(D, dtype=float)
        return self.E + self.A * N**-self.alpha + self.B * D**-self.beta

    @property
    def a(self) -> float:
        """Exponent of ``N_opt ∝ C**a``."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of ``D_opt ∝ C**b``."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def compute_optimal(self, C):
        """``(N_opt, D_opt)`` minimising the loss at training compute ``C = 6 N D`` (closed form)."""
        scaled = np.asarray(C, dtype=float) / 6.0
        return self.G * scaled**self.a, scaled**self.b / self.G

    def compute_optimal_loss(self) -> PowerLaw:
        """The loss along the frontier as a law in C: ``E + (A G**-alpha + B G**beta) (C/6)**-gamma``.

        Substituting ``N_opt`` and ``D_opt`` gives a saturating power law in compute with exponent
        ``gamma = alpha beta / (alpha + beta)``; it is what a compute-frontier fit should find.
        """
        gamma = self.alpha * self.beta / (self.alpha + self.beta)
        scale = self.A * self.G**-self.alpha + self.B * self.G**self.beta
        return PowerLaw(E=self.E, A=scale * 6.0**gamma, alpha=gamma)

    def tokens_per_param(self, C):
        """``D_opt / N_opt`` at compute C, from the closed form (about 20 for the 'Chinchilla rule')."""
        n_opt, d_opt = self.compute_optimal(C)
        return d_opt / n_opt


@dataclass(frozen=True)
class KaplanStepsLaw:
    """Kaplan et al. 2020 eq. 1.6: ``L(N, S_min) = (N_c / N)**alpha_N + (S_c / S_min)**alpha_S``.

    ``S_min`` is the number of steps the run would need at a batch far above the critical batch. A run
    of S steps at batch B (tokens) has ``S_min = S / (1 + B_crit(L) / B)`` with
    ``B_crit(L) = B_star / L**(1 / alpha_B)`` (eq. 5.4 and 1.4); ``loss_at_steps`` solves that fixed point.
    """

    N_c: float = 6.5e13
    alpha_N: float = 0.077
    S_c: float = 2.1e3
    alpha_S: float = 0.76
    B_star: float = 2e8  # tokens
    alpha_B: float = 0.21

    def loss(self, N, S_min):
        N = np.asarray(N, dtype=float)
        return (self.N_c / N) ** self.alpha_N + (self.S_c / np.asarray(S_min, dtype=float)) ** self.alpha_S

    def critical_batch(self, loss):
        return self.B_star / np.asarray(loss, dtype=float) ** (1.0 / self.alpha_B)

    def loss_at_steps(self, N, steps, batch_tokens, iterations: int = 100):
        """Loss after ``steps`` steps at ``batch_tokens`` tokens per batch, with Kaplan's S_min correction.

        B_crit depends on the loss being predicted, so iterate ``L -> L(N, S / (1 + B_crit(L) / B))``
        from ``S_min = S``; the map is a contraction here (B_crit varies slowly with L).
        """
        loss = self.loss(N, steps)
        for _ in range(iterations):
            s_min = steps / (1.0 + self.critical_batch(loss) / batch_tokens)
            loss = self.loss(N, s_min)
        return loss


# --- Kaplan et al. 2020 (arXiv 2001.08361), WebText2, GPT-2 BPE, N non-embedding, C in PF-days ----
KAPLAN_L_N = PowerLaw.from_scale(8.8e13, 0.076)  # converged, unlimited data
KAPLAN_L_D = PowerLaw.from_scale(5.4e13, 0.095)  # large model, early-stopped
KAPLAN_L_CMIN = PowerLaw.from_scale(3.1e8, 0.050)  # compute-efficient frontier, C_min in PF-days
KAPLAN_L_N_S = KaplanStepsLaw()  # Table 3 constants

# --- Hoffmann et al. 2022 (Chinchilla) and the Epoch replication ------------------------------------
HOFFMANN_ROUNDED = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
# unrounded, from the paper's TeX source: log A, log B, log E as printed there
HOFFMANN_UNROUNDED = ChinchillaLaw(
    E=math.exp(0.5267228), A=math.exp(6.0073404), B=math.exp(6.0179186), alpha=0.33917084, beta=0.2849083
)
# Epoch's headline (Huber-likelihood fit, 240 runs); their bootstrap SEs are EPOCH_HEADLINE_STDERR
EPOCH_HEADLINE = ChinchillaLaw(E=1.817, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
EPOCH_HEADLINE_STDERR = {"A": 124.52, "B": 1293.28, "E": 0.026, "alpha": 0.0154, "beta": 0.021}
# Epoch notebook's grid L-BFGS point fit (summed Huber, 240 runs: 5 highest losses dropped)
EPOCH_POINT_FIT_240 = ChinchillaLaw(E=1.81724, A=477.84, B=2143.86, alpha=0.34731, beta=0.36718)
CHINCHILLA_COMPUTE = 6 * 70e9 * 1.4e12  # Chinchilla itself: 70B parameters on 1.4T tokens

# --- The LMU paper (Chilkuri et al. 2021, arXiv 2110.02402), Sec. 5; docs/lmu.md ----------------------
LMU_PAPER_STEPS = 25_000  # "set to 25000 at batch size of 512"


def _transformer_eq12(steps: int):
    """Eq. 12 with the paper's S plugged in as Kaplan's S_min (see lmu_paper_loss)."""
    return lambda N: KAPLAN_L_N_S.loss(N, steps)


LMU_PAPER_FITS = {
    "lmu": PowerLaw.from_scale(1.95e14, 0.072).loss,
    "lmu_attn": PowerLaw.from_scale(3.80e14, 0.069).loss,  # LMU + global attention
    "transformer_S25k": _transformer_eq12(LMU_PAPER_STEPS),
    "transformer_S250k": _transformer_eq12(10 * LMU_PAPER_STEPS),  # "10x more training steps"
    "lstm": PowerLaw.from_scale(7.45e14, 0.071).loss,  # Kaplan's LSTM, trained 10x longer
}


def lmu_paper_loss(name: str, N):
    """Loss (nats) of one of the LMU paper's fitted curves at non-embedding parameter count N.

    ``name`` is a key of ``LMU_PAPER_FITS``. The transformer curves are eq. 12, i.e. Kaplan's L(N, S)
    with ``S_min`` set to the paper's step count S itself (25k, or 250k for "10x the steps"). This is
    what reproduces the derived-values table of docs/lmu.md to 3 decimals. Kaplan's S_min correction for
    the paper's batch (512 x 1024 tokens, ``KAPLAN_L_N_S.loss_at_steps``) gives S_min ≈ 0.87 S at
    N = 5.5e4 down to 0.71 S at 1e6 (B_crit grows as the loss falls), i.e. losses 0.017–0.046 nats higher
    at 25k steps over the fitted range, which changes every transformer cell of the table. The table
    takes S_min = S, as the paper's text does ("S is the total number of training steps").
    """
    if name not in LMU_PAPER_FITS:
        raise bad_value("name", name, f"one of {sorted(LMU_PAPER_FITS)}")
    return LMU_PAPER_FITS[name](N)
