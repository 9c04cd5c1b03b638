"""`lmu-jax sweep design`: a sweep spec whose ladders bracket each budget's compute-optimal size.

Budgets: log-spaced from the FLOP range's low end to its high end, about a factor 4 apart. Per budget
C, the centre N_opt(C) is a prior fit's G·C^a when given, else Chinchilla's ~20 tokens per parameter:
with C ≈ 6 N D (our FLOPs per token are close to 6 N) and D = 20 N, N_opt = sqrt(C / 120). The
budget's ladder is ``sizes_per_budget`` (5-7) sizes a factor 2 apart centred on it, so the isoFLOP
minimum lies inside it when the prior is within a factor ~2 of the truth.

Time: the spec's runs are planned (``spec.expand``, the real shapes and FLOPs per token) and timed by
``sweep plan``'s estimate (a measured FLOP/s, from a sweep directory's finished runs or given). Budgets
are kept from the smallest up while the total fits in the wall-clock budget; a design whose smallest
budget alone does not fit is refused. So is a design in which a run would read the corpus more than
``max_epochs`` times (repeated data is not fresh data; Muennighoff et al. 2023 find ~4 epochs nearly
as good as new data): the message says how many tokens it would need.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import yaml

from lmu_jax.errors import UserError, bad_value

TOKENS_PER_PARAM = 20.0
BUDGET_FACTOR = 4.0


def optimal_size(flops: float, prior: tuple | None = None) -> float:
    """N_opt(C): a prior fit's G·C^a, else ~20 tokens per parameter (N = sqrt(C / (6 · 20)))."""
    if prior is not None:
        g, a = prior
        return g * flops ** a
    return math.sqrt(flops / (6.0 * TOKENS_PER_PARAM))


def budgets_between(low: float, high: float) -> list[float]:
    """About a factor 4 apart, both ends included (one budget when they are equal)."""
    if high == low:
        return [float(f"{low:.3g}")]
    count = max(2, 1 + round(math.log(high / low) / math.log(BUDGET_FACTOR)))
    return [float(f"{c:.3g}") for c in np.geomspace(low, high, count)]


def ladder(n_opt: float, count: int) -> list[int]:
    """``count`` sizes a factor 2 apart around n_opt (2 significant digits)."""
    offsets = np.arange(count) - (count - 1) / 2
    return [int(float(f"{n_opt * 2.0 ** k:.2g}")) for k in offsets]


def design(families, low: float, high: float, hours: float, *, base: dict | None = None,
           flops_per_s: float | None = None, sweep_dir=None, prior: tuple | None = None,
           sizes_per_budget: int = 5, max_epochs: float = 4.0, name: str = "design",
           train_tokens: int | None = None) -> tuple[dict, list]:
    """(spec dict, plan rows of its runs); UserError when no design fits (the module docstring says when).

    ``train_tokens``: the corpus's training tokens (default: prepare the base config's corpus and count).
    """
    from lmu_jax.sweep.commands import measured_flops_per_s, plan_rows
    from lmu_jax.sweep.spec import expand, parse_spec

    if not 5 <= sizes_per_budget <= 7:
        raise bad_value("--sizes-per-budget", sizes_per_budget, "5, 6 or 7 (a bracket needs sizes on both sides)")
    if not 0 < low <= high:
        raise bad_value("--flops", f"{low:g}:{high:g}", "LOW:HIGH training FLOPs with 0 < LOW <= HIGH")
    if not hours > 0:
        raise bad_value("--hours", hours, "a positive wall-clock budget in hours")
    measured = measured_flops_per_s(sweep_dir) if sweep_dir is not None else {}
    rates = {family: flops_per_s or measured.get(family) for family in families}
    missing = [family for family, rate in rates.items() if not rate]
    if missing:
        raise bad_value("--flops-per-s", flops_per_s, f"a measured FLOP/s for the time estimate (no finished run of "
                        f"{', '.join(missing)} in --sweep-dir); `lmu-jax sweep plan` on a finished sweep, or "
                        "`lmu-jax bench`, measures one")
    base = base or {}
    sizeable = _Sizeable(families, base)
    centre = f"{prior[0]:.4g}·C^{prior[1]:.3g}" if prior else "sqrt(C / 120) (~20 tokens per parameter)"

    def spec_of(budgets):
        return {"name": name, "description": f"designed by `lmu-jax sweep design`: ladders of {sizes_per_budget} "
                                             f"sizes a factor 2 apart centred on N_opt(C) = {centre}",
                "families": list(families), "sizes": {c: ladders[c] for c in budgets}, "budgets": {"flops": budgets},
                "warmup_fraction": 0.05, "evals_per_run": 4, "base": base,
                "throughput": {family: float(f"{rate:.4g}") for family, rate in rates.items()}}

    ladders, runs, rows, total = {}, [], [], 0.0
    for c in budgets_between(low, high):  # smallest first; stop at the first that does not fit in the time
        ladders[c] = [sizeable(n) for n in ladder(optimal_size(c, prior), sizes_per_budget)]
        spec = parse_spec(spec_of([c]), name=name)
        budget_runs = expand(spec)
        budget_rows = plan_rows(spec, budget_runs, sweep_dir, None)
        cost = sum(r["est_s"] for r in budget_rows)
        if total + cost > hours * 3600:
            if not runs:
                raise UserError(f"--hours={hours:g} is invalid: the smallest design ({len(budget_runs)} runs at "
                                f"{c:.3g} FLOPs) takes an estimated {cost / 3600:.2g} h; lower --flops or raise "
                                "--hours")
            del ladders[c]
            break
        runs, rows, total = runs + budget_runs, rows + budget_rows, total + cost
    raw = spec_of(list(ladders))
    _check_epochs(runs, base, max_epochs, train_tokens)
    return raw, rows


class _Sizeable:
    """``(n)`` -> n, or the nearest of n x (1 ± 10 %, ± 20 %) that every family can be sized to (a small
    width's steps are coarser than sizing's 5 % tolerance)."""

    def __init__(self, families, base: dict):
        from lmu_jax.config import config_from_dict
        from lmu_jax.sweep.spec import deep_merge

        self.cfgs = {f: config_from_dict(deep_merge(base, {"model": {"family": f}})) for f in families}
        self.vocab = {f: cfg.resolved_model().vocab_size for f, cfg in self.cfgs.items()}

    def __call__(self, n: int) -> int:
        from lmu_jax.sweep.spec import solve_shape

        for factor in (1.0, 1.1, 0.9, 1.2, 0.8):
            candidate = int(float(f"{n * factor:.2g}"))
            try:
                for family, cfg in self.cfgs.items():
                    solve_shape(family, candidate, cfg.model, cfg.data.seq_len, self.vocab[family])
            except UserError:
                continue
            return candidate
        return n  # expand() then says which family cannot be sized


def _check_epochs(runs, base: dict, max_epochs: float, train_tokens: int | None) -> None:
    if train_tokens is None:
        from lmu_jax.config import config_from_dict
        from lmu_jax.data.pipeline import prepare

        train_tokens = len(prepare(config_from_dict({"data": base.get("data") or {}}).data).tokens("train"))
    worst = max(runs, key=lambda r: r.tokens)
    epochs = worst.tokens / train_tokens
    if epochs > max_epochs:
        raise UserError(f"--flops={worst.budget.value:.3g} is invalid: {worst.family} at N={worst.n_params:,} reads "
                        f"{worst.tokens:,} tokens, {epochs:.1f} epochs of the corpus's {train_tokens:,} training "
                        f"tokens (at most {max_epochs:g}); it needs >= {math.ceil(worst.tokens / max_epochs):,} "
                        "tokens of data: a bigger corpus, or a lower --flops")


def write_design(path, raw: dict) -> None:
    header = "# written by `lmu-jax sweep design`; `lmu-jax sweep plan` shows its runs, `sweep run` runs them\n"
    text = yaml.safe_dump(raw, sort_keys=False)
    with open(path, "w") as f:
        f.write(header + text)


def summary_lines(raw: dict, prior) -> list[str]:
    lines = []
    for c, sizes in raw["sizes"].items():
        lines.append(f"budget {c:.3g} FLOPs: N_opt ~ {optimal_size(c, prior):,.0f}, ladder {', '.join(f'{n:,}' for n in sizes)}")
    return lines


def print_design(raw: dict, rows: list, prior, out=sys.stdout) -> None:
    from lmu_jax.sweep.commands import print_plan_table

    for line in summary_lines(raw, prior):
        print(line, file=out)
    print_plan_table(rows, out=out)
