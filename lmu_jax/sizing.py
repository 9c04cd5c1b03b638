"""Solve a family's shape for a target number of non-embedding parameters (Kaplan's N).

    cfg = solve("lmu", 200_000, seq_len=256)       # -> LMUConfig with d_model chosen, |N/target - 1| <= 5 %

Every family has one shape rule, in its registry record (``Family.shape_rule``, lmu_jax/models/base.py),
that leaves a single width free; the solver picks that width, measuring N exactly with
``lmu_jax.flops.param_counts`` (so biases, norms and the LMU's L_i are all counted), never with a
formula. Per family (multiscale: the transformer's heads and d_ff, at a fixed depth; Transformer-XL,
SCH-TXL and the QRNN hybrid: d_model alone):

- transformer: the base config's aspect ratio d_model / n_layers is kept (default 128 / 2 = 64):
  n_layers = round((N / (12 a²))^(1/3)) (from N ≈ 12 L d², d = a L), then d_model is solved at that
  depth. Below ~170k parameters that gives one layer, which cannot compose two attention heads; a
  study comparing it with 2-layer LSTMs or LMUs wants ``rule="fixed_depth"``: the base's n_layers
  kept, d_model solved (a one-layer transformer at 107k lost 0.096 nats to a two-layer one at 1e13
  FLOPs, experiments/results/cpu_scaling_pystdlib/depth_check). Heads are ~64 wide: n_heads =
  max(1, d // 64), and the head width must be even (rotary), so tiny models get fewer heads (one head
  below d = 128).
- lstm: n_layers (and d_proj / d_model, if the base has a projection) fixed; d_model solved.
- lmu, lmu_attn: n_layers, order, q_reduced, d_ff / d_model fixed; d_model solved; lmu_attn heads
  follow the transformer's rule. ``rule="paper"`` instead sets d_model = round(sqrt(N / 24)), the
  paper's width rule (Chilkuri et al. 2021 §5; 24 d² is a 2-layer transformer), with everything else
  as in the base: the measured N is then whatever that shape has, not necessarily the target.

Search: N(width) is a quadratic in the width for every rule here (d_ff and projections scale with d),
so three exact counts fix it; its root gives the start, and exact counts of the neighbouring valid
widths settle the nearest one.
"""

from __future__ import annotations

import math
from dataclasses import replace

from lmu_jax.errors import UserError, bad_value
from lmu_jax.flops import param_counts
from lmu_jax.models import get_family
from lmu_jax.models.base import ModelConfig

TOLERANCE = 0.05
MAX_WIDTH = 1 << 15


def heads_for_width(d_model: int) -> int:
    """Heads of width ~64; one head for d < 128."""
    return max(1, d_model // 64)


def _attention_width_ok(d_model: int) -> bool:
    heads = heads_for_width(d_model)
    return d_model % heads == 0 and (d_model // heads) % 2 == 0


def _with_width(base: ModelConfig, width: int) -> ModelConfig:
    """The base config at d_model = width, with the other widths following the family's rule."""
    rule = get_family(base.family).shape_rule
    changes = {"d_model": width}
    if rule.heads:
        changes[rule.heads] = heads_for_width(width)
    for key in rule.scaled:
        if getattr(base, key):
            changes[key] = max(1, round(width * getattr(base, key) / base.d_model))
    return replace(base, **changes)


def _valid_widths(base: ModelConfig) -> list[int]:
    if get_family(base.family).shape_rule.heads:  # attention: even head widths
        return [w for w in range(2, MAX_WIDTH + 1, 2) if _attention_width_ok(w)]
    return list(range(1, MAX_WIDTH + 1))


def non_embedding_params(cfg: ModelConfig, seq_len: int, vocab_size: int) -> int:
    return param_counts(cfg.resolved(vocab_size, seq_len), seq_len)["non_embedding"]


def _solve_width(base: ModelConfig, target: float, seq_len: int, vocab_size: int) -> ModelConfig:
    """The valid width whose exact non-embedding count is nearest the target (other shape fixed)."""
    widths = _valid_widths(base)
    counts: dict[int, int] = {}

    def count(index: int) -> int:
        width = widths[index]
        if width not in counts:
            counts[width] = non_embedding_params(_with_width(base, width), seq_len, vocab_size)
        return counts[width]

    # Quadratic through three exact counts -> the (real) width where it meets the target.
    probes = [min(range(len(widths)), key=lambda i: abs(widths[i] - w)) for w in (16, 64, 256)]
    xs, ys = [widths[i] for i in probes], [count(i) for i in probes]
    a, b, c = _quadratic_through(xs, ys)
    c -= target
    if a > 0:
        guess = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
    else:
        guess = -c / b
    index = min(range(len(widths)), key=lambda i: abs(widths[i] - guess))

    # Walk to the nearest width by exact counts (N increases with the width).
    def error(i):
        return abs(count(i) - target)

    while index + 1 < len(widths) and count(index) < target and error(index + 1) < error(index):
        index += 1
    while index > 0 and count(index) > target and error(index - 1) < error(index):
        index -= 1
    return _with_width(base, widths[index])


def _quadratic_through(xs, ys):
    """Coefficients (a, b, c) of the parabola through three points (Lagrange form, expanded)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
    a = y0 / d0 + y1 / d1 + y2 / d2
    b = -(y0 * (x1 + x2) / d0 + y1 * (x0 + x2) / d1 + y2 * (x0 + x1) / d2)
    c = y0 * x1 * x2 / d0 + y1 * x0 * x2 / d1 + y2 * x0 * x1 / d2
    return a, b, c


def paper_width(target_non_embedding_params: float) -> int:
    """The LMU paper's d = sqrt(N / 24)."""
    return max(1, round(math.sqrt(target_non_embedding_params / 24)))


def solve(family: str, target_non_embedding_params: float, *, base_cfg: ModelConfig | None = None,
          seq_len: int = 256, vocab_size: int = 256, rule: str = "search") -> ModelConfig:
    """A config of `family` with about `target_non_embedding_params` non-embedding parameters.

    base_cfg supplies everything the rule keeps fixed (default: the family's defaults). The result
    is ``base_cfg`` with its shape keys replaced, unresolved (theta = 0 still means seq_len);
    seq_len and vocab_size are only used to build the model for counting. rule: "search" (every
    family; within 5 % of the target), "fixed_depth" (the same, but families whose depth follows the
    target keep the base's n_layers) or "paper" (lmu, lmu_attn: d = sqrt(N/24), no search).
    """
    fam = get_family(family)
    base = base_cfg if base_cfg is not None else fam.config_cls(family=family)
    if base.family != family:
        raise bad_value("base_cfg.family", base.family, f"the family being solved, {family!r}")
    if target_non_embedding_params <= 0:
        raise bad_value("target_non_embedding_params", target_non_embedding_params, "a positive number")
    if rule == "paper":
        if not fam.shape_rule.paper_width:
            raise bad_value("rule", rule, "'search' for this family ('paper' is the LMU width rule)")
        return _with_width(base, paper_width(target_non_embedding_params))
    if rule not in ("search", "fixed_depth"):
        raise bad_value("rule", rule, "search, fixed_depth or paper")

    if fam.shape_rule.depth and rule == "search":
        aspect = base.d_model / base.n_layers
        ideal_layers = (target_non_embedding_params / (12 * aspect**2)) ** (1 / 3)
        depths = sorted({max(1, math.floor(ideal_layers)), max(1, math.ceil(ideal_layers))},
                        key=lambda layers: abs(layers - ideal_layers))
        bases = [replace(base, n_layers=layers) for layers in depths]  # nearest the aspect ratio first
    else:
        bases = [base]

    best, best_error = None, math.inf
    for candidate_base in bases:
        cfg = _solve_width(candidate_base, target_non_embedding_params, seq_len, vocab_size)
        error = abs(non_embedding_params(cfg, seq_len, vocab_size) / target_non_embedding_params - 1)
        if error <= TOLERANCE:
            return cfg
        if error < best_error:
            best, best_error = cfg, error
    raise UserError(f"cannot size {family} to {target_non_embedding_params:,.0f} non-embedding parameters "
                    f"within {TOLERANCE:.0%} (nearest: d_model={best.d_model}, n_layers={best.n_layers}, "
                    f"off by {best_error:.1%}); change the base config's fixed keys")
