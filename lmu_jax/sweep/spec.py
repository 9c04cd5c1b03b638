"""A sweep spec (YAML) -> the list of runs it means, at matched training FLOPs.

A spec names model families, a ladder of target sizes (non-embedding parameters, each solved into a
shape per family by ``lmu_jax.sizing``) and budgets, plus a ``base`` RunConfig dict shared by every run::

    name: demo
    families: [transformer, lstm, lmu]
    sizes: [20000, 60000, 180000]          # target non-embedding parameters
    sizing_rules: {lmu: paper}             # optional, per family: search (default) | fixed_depth (the
                                           # transformer keeps the base's n_layers) | paper (d = sqrt(N/24))
    budgets:
      flops: [3.0e12]                      # training FLOPs per run (model_flops_per_token convention)
      tokens: []                           # and/or token budgets (FLOPs then differ across runs)
    warmup_fraction: 0.05                  # optional: optim.warmup_steps = this x the run's own steps, at
                                           # least 2 / (1 - optim.b2) (40 at b2 0.95) and at most half the run
    evals_per_run: 4                       # optional: train.eval_every = the run's steps / this
    base:                                  # any RunConfig sections; model shape keys come from sizing, and
      data: {corpus: kjv, seq_len: 128}    # base.model holds only keys every family has (dtype, ...)
      optim: {lr: 3.0e-3, schedule: cosine}
      train: {batch_size: 16}
    family_overrides:                      # merged over base for one family (before sizing): its own
      lstm: {optim: {lr: 1.0e-2}}          # model keys (order, n_heads, ...) and anything else
    run_overrides:                         # merged last, onto the runs that match every given key
      - match: {family: lstm, size: 180000}  # keys: family, size, budget
        set: {train: {batch_size: 32}}
    throughput:                            # FLOP/s for the plan's time estimates (measured ones win)
      default: 2.0e10
      lstm: 5.0e9
    seeds: [0, 1, 2]                       # optional: each run once per seed (train.seed), or for some runs:
                                           # {values: [0, 1, 2], match: {family: lstm, size: 20000}}
    branches: [0.125, 0.25, 0.5, 1]        # optional, wsd only: cooldown branches at these fractions of each
                                           # run's horizon, or {fractions: [...], match: {...}} for some runs
    lr_grid:                               # optional: tune lr per size first, then lr(N) per family from it
      lrs: [1.0e-3, 3.0e-3, 1.0e-2]        # >= 3 peak learning rates, tried at every grid size
      sizes: [20000, 60000]                # target sizes of the grid runs
      budget: 1.0e12                       # their one FLOP budget (or {tokens: 2.0e6})
                                           # (or a list of such grids, each with its own families:, so
                                           # that one family gets a larger size or other lrs)
    results: experiments/results/demo      # optional: keep each finished run's small files here (commit
                                           # them): `sweep run` on a fresh clone counts those runs as done

``sizes`` may also be a mapping from budget value to that budget's ladder (``lmu-jax sweep design`` writes
one: each budget's ladder brackets its own compute-optimal size), and a budget's ladder may be a mapping
from family to that family's ladder (``{1.0e13: {transformer: [...], lstm: [...], lmu: [...]}}``, every
family named), where the families' compute-optimal sizes lie too far apart for one ladder of 5.

A FLOP budget C gives each run ``steps = round(C / (flops_per_token * batch * seq_len))``, so the runs'
training FLOPs match up to the rounding of steps (within 0.5 / steps). The learning-rate schedule's
horizon is the run's own ``train.steps`` (cosine decays to it; WSD cools down at its end), so every
final loss is a valid (N, D) point (docs/scaling.md); a ``constant`` schedule is
refused for that reason. Run ids are ``lmu_jax.config.run_id`` of the resolved config.

Seeds: a run with several seeds is several runs (distinct ids; ``train.seed`` sets parameters and data
order), and the replicates run after every budget's first seed; the report gives their mean and
standard deviation and the noise floor.

Cooldown branches (wsd): a branch at fraction f of a run of T steps has the horizon T_b = round(f T) and
the wsd schedule of that horizon, whose stable phase is the parent's; it starts from the parent's
checkpoint at its own cooldown start (``optim.cooldown_start``), optimizer state and step included
(``train.branch_from``), and runs only its cooldown. Its tokens and FLOPs count the parent's prefix: it
is the (N, D = T_b tokens) point that a run of T_b steps would give. The parent keeps those checkpoints
(``checkpoint.at``); branch runs come right after their parent. Fraction 1 is the parent itself.

Learning rate grid: its runs (stage ``lr_grid``) run first; the best lr per (family, size) is the vertex
of a parabola in log lr through the final validation losses, and those best lrs, interpolated in
(log N, log lr) per family, set ``optim.lr`` of every main run (``lmu_jax.sweep.lr``; the rule wins over
the spec's lr). The main
runs are planned once the grid is done. Grid runs take the base and family overrides, not run_overrides,
seeds or branches.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmu_jax.config import OptimConfig, RunConfig, config_from_dict, read_yaml, run_id
from lmu_jax.errors import UserError, bad_value
from lmu_jax.models import FAMILIES, feeds_carry

SPEC_KEYS = ("name", "description", "families", "sizes", "sizing_rules", "budgets", "warmup_fraction",
             "evals_per_run", "base", "family_overrides", "run_overrides", "throughput", "seeds", "branches",
             "lr_grid", "results")
SIZING_RULES = ("search", "fixed_depth", "paper")
BUDGET_KINDS = ("flops", "tokens")
MATCH_KEYS = ("family", "size", "budget")
HORIZON_SCHEDULES = ("cosine", "wsd")

# Sweep runs are launched in the background with their output in a log file: no progress bar there.
RUN_DEFAULTS = {"log": {"progress": False, "tensorboard": False}}


@dataclass(frozen=True)
class Budget:
    kind: str  # "flops" (training FLOPs, our convention) or "tokens"
    value: float

    @property
    def label(self) -> str:
        return f"{self.value:.3g} {'FLOPs' if self.kind == 'flops' else 'tokens'}"


@dataclass(frozen=True)
class RunOverride:
    match: dict  # subset of {family, size, budget}
    set: dict  # a partial RunConfig dict

    def applies(self, family: str, size: int, budget: Budget) -> bool:
        return _matches(self.match, family, size, budget)


def _matches(match: dict, family: str, size: int, budget: Budget) -> bool:
    have = {"family": family, "size": size, "budget": budget.value}
    return all(have[key] == value for key, value in match.items())


@dataclass(frozen=True)
class Subset:
    """Values (seeds, branch fractions) for the runs that match every given key (all runs when empty)."""

    values: tuple
    match: dict = field(default_factory=dict)

    def applies(self, family: str, size: int, budget: Budget) -> bool:
        return _matches(self.match, family, size, budget)


@dataclass(frozen=True)
class LrGrid:
    lrs: tuple
    sizes: tuple
    budget: Budget
    families: tuple


@dataclass(frozen=True)
class SweepSpec:
    name: str
    families: tuple
    sizes: tuple
    budgets: tuple  # of Budget
    sizing_rules: dict = field(default_factory=dict)  # family -> lmu_jax.sizing rule
    base: dict = field(default_factory=dict)
    family_overrides: dict = field(default_factory=dict)
    run_overrides: tuple = ()
    warmup_fraction: float | None = None
    evals_per_run: int | None = None
    throughput: dict = field(default_factory=dict)  # family or "default" -> FLOP/s
    description: str = ""
    seeds: Subset | None = None
    branches: Subset | None = None
    lr_grids: tuple = ()  # of LrGrid; their runs together give each family's lr rule
    ladders: dict = field(default_factory=dict)  # budget value -> its ladder, or family -> ladder (else ``sizes``)
    results: str = ""  # a directory (in the repository) that keeps each finished run's small files
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the spec as written

    def ladder(self, budget: Budget, family: str) -> tuple:
        ladder = self.ladders.get(budget.value, self.sizes)
        return ladder[family] if isinstance(ladder, dict) else ladder


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its resolved config and what it costs."""

    run_id: str
    family: str
    size: int  # the target on the ladder; ``n_params`` is what sizing achieved
    budget: Budget
    config: RunConfig
    params: dict  # total, non_embedding, embedding (param_counts)
    flops_per_token: float  # training FLOPs per token (3 x analytic forward)
    tokens_per_step: int
    stage: str = "main"  # "lr_grid": a run of the learning-rate grid (before the main runs)
    branch_of: str = ""  # a cooldown branch: its parent's run id
    fraction: float = 1.0  # a branch: its horizon as a fraction of its parent's

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def lr(self) -> float:
        return self.config.optim.lr

    @property
    def steps(self) -> int:
        return self.config.train.steps

    @property
    def n_params(self) -> int:
        return self.params["non_embedding"]

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def flops_6n(self) -> float:
        return 6.0 * self.n_params * self.tokens

    def summary(self) -> dict:
        """What plan.json and collect need about a run (without the whole config)."""
        return {"run_id": self.run_id, "family": self.family, "size": self.size, "budget_kind": self.budget.kind,
                "budget": self.budget.value, "N": self.n_params, "N_total": self.params["total"],
                "steps": self.steps, "tokens": self.tokens, "flops": self.flops, "flops_6n": self.flops_6n,
                "flops_per_token": self.flops_per_token, "seq_len": self.config.data.seq_len,
                "batch_size": self.config.train.batch_size, "schedule": self.config.optim.schedule,
                "seed": self.seed, "lr": self.lr, "stage": self.stage, "branch_of": self.branch_of,
                "fraction": self.fraction, **({"budget_kind": "branch", "budget": self.flops} if self.branch_of else {})}


# ------------------------------------------------------------------------------------------ parsing


def deep_merge(*dicts: dict) -> dict:
    """Nested dict merge, later wins; inputs are not modified."""
    out: dict = {}
    for d in dicts:
        for key, value in (d or {}).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def _number_list(path: str, value, *, integer: bool) -> tuple:
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, str):  # YAML 1.1 reads 1e12 and 2.0e10 (no exponent sign) as strings
            try:
                v = float(v)
            except ValueError:
                raise bad_value(path, v, "positive numbers") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v:
            raise bad_value(path, v, "positive numbers")
        if integer and float(v) != int(v):
            raise bad_value(path, v, "whole numbers")
        out.append(int(v) if integer else float(v))
    return tuple(out)


def _mapping(path: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_value(path, value, "a mapping")
    return value


def parse_spec(raw: dict, name: str = "sweep") -> SweepSpec:
    """Check a spec dict's shape (not yet the run configs: ``expand`` does that) and build a SweepSpec."""
    raw = _mapping("spec", raw)
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"{unknown[0]} is not a known sweep spec key; allowed: {', '.join(SPEC_KEYS)}")

    families = raw.get("families") or []
    if isinstance(families, str):
        families = [families]
    if not families:
        raise bad_value("families", raw.get("families"), f"a non-empty list of: {', '.join(sorted(FAMILIES))}")
    for family in families:
        if family not in FAMILIES:
            raise bad_value("families", family, f"one of {', '.join(sorted(FAMILIES))}")

    ladders_raw = raw.get("sizes") if isinstance(raw.get("sizes"), dict) else {}
    ladders, every_size = {}, set()
    for key, ladder in ladders_raw.items():
        (value,) = _number_list("sizes", key, integer=False)
        if isinstance(ladder, dict):
            if set(ladder) != set(families):
                raise bad_value(f"sizes.{key}", sorted(ladder), f"one ladder per family: {', '.join(families)}")
            ladders[value] = {family: _ladder(f"sizes.{key}.{family}", ladder[family]) for family in families}
            every_size.update(*ladders[value].values())
        else:
            ladders[value] = _ladder(f"sizes.{key}", ladder)
            every_size.update(ladders[value])
    sizes = tuple(sorted(every_size)) if ladders else _number_list("sizes", raw.get("sizes") or [], integer=True)
    if not sizes:
        raise bad_value("sizes", raw.get("sizes"), "a non-empty ladder of target non-embedding parameter counts")

    sizing_rules = _mapping("sizing_rules", raw.get("sizing_rules"))
    for family, rule in sizing_rules.items():
        if family not in families:
            raise bad_value("sizing_rules", family, f"one of the sweep's families: {', '.join(families)}")
        if rule not in SIZING_RULES:
            raise bad_value(f"sizing_rules.{family}", rule, f"one of {', '.join(SIZING_RULES)}")

    budgets_raw = _mapping("budgets", raw.get("budgets"))
    budgets = []
    for kind, values in budgets_raw.items():
        if kind not in BUDGET_KINDS:
            raise bad_value("budgets", kind, f"a mapping with keys {' and/or '.join(BUDGET_KINDS)}")
        budgets += [Budget(kind, v) for v in _number_list(f"budgets.{kind}", values or [], integer=False)]
    if not budgets:
        raise bad_value("budgets", raw.get("budgets"), "at least one budget, e.g. {flops: [1.0e12]}")
    if ladders and set(ladders) != {b.value for b in budgets}:
        raise bad_value("sizes", sorted(ladders), "one ladder per budget, keyed by the budgets: "
                        f"{', '.join(f'{b.value:g}' for b in budgets)}")

    family_overrides = _mapping("family_overrides", raw.get("family_overrides"))
    for family, override in family_overrides.items():
        if family not in families:
            raise bad_value("family_overrides", family, f"one of the sweep's families: {', '.join(families)}")
        _mapping(f"family_overrides.{family}", override)

    run_overrides = []
    for i, entry in enumerate(raw.get("run_overrides") or []):
        entry = _mapping(f"run_overrides[{i}]", entry)
        if set(entry) != {"match", "set"}:
            raise bad_value(f"run_overrides[{i}]", entry, "a mapping with keys match and set")
        run_overrides.append(RunOverride(match=_match(f"run_overrides[{i}].match", entry["match"]),
                                         set=_mapping(f"run_overrides[{i}].set", entry["set"])))

    warmup_fraction = raw.get("warmup_fraction")
    if warmup_fraction is not None and (isinstance(warmup_fraction, bool) or
                                        not isinstance(warmup_fraction, (int, float)) or
                                        not 0 <= warmup_fraction < 1):
        raise bad_value("warmup_fraction", warmup_fraction, "a number in [0, 1)")

    evals_per_run = raw.get("evals_per_run")
    if evals_per_run is not None:
        (evals_per_run,) = _number_list("evals_per_run", evals_per_run, integer=True)

    throughput = {}
    for key, value in _mapping("throughput", raw.get("throughput")).items():
        (throughput[key],) = _number_list(f"throughput.{key}", value, integer=False)

    results = raw.get("results", "")
    if not isinstance(results, str):
        raise bad_value("results", results, "a directory path, e.g. experiments/results/<name>")

    return SweepSpec(name=str(raw.get("name") or name), families=tuple(families), sizes=sizes,
                     budgets=tuple(budgets), sizing_rules=sizing_rules, base=_mapping("base", raw.get("base")),
                     family_overrides=family_overrides, run_overrides=tuple(run_overrides),
                     warmup_fraction=warmup_fraction, evals_per_run=evals_per_run, throughput=throughput,
                     description=str(raw.get("description") or ""), seeds=_seeds(raw.get("seeds")),
                     branches=_branches(raw.get("branches")), lr_grids=_lr_grids(raw.get("lr_grid"), families),
                     ladders=ladders, results=results, raw=raw)


def _ladder(path: str, ladder) -> tuple:
    sizes = _number_list(path, ladder or [], integer=True)
    if not sizes:
        raise bad_value(path, ladder, "a non-empty ladder of target non-embedding parameter counts")
    return sizes


def _match(path: str, match) -> dict:
    match = dict(_mapping(path, match))
    for key in match:
        if key not in MATCH_KEYS:
            raise bad_value(path, key, f"keys among {', '.join(MATCH_KEYS)}")
    # numbers as the ladder and budgets hold them (YAML may give "1e12")
    if "size" in match:
        (match["size"],) = _number_list(f"{path}.size", match["size"], integer=True)
    if "budget" in match:
        (match["budget"],) = _number_list(f"{path}.budget", match["budget"], integer=False)
    return match


def _subset(path: str, value, key: str) -> tuple[list, dict]:
    """``[v, ...]`` or ``{<key>: [v, ...], match: {...}}`` -> (values, match)."""
    if isinstance(value, dict):
        if key not in value or not set(value) <= {key, "match"}:
            raise bad_value(path, value, f"a list, or a mapping with keys {key} and (optionally) match")
        return value[key], _match(f"{path}.match", value.get("match"))
    return value, {}


def _seeds(value) -> Subset | None:
    if value is None:
        return None
    seeds, match = _subset("seeds", value, "values")
    seeds = seeds if isinstance(seeds, (list, tuple)) else [seeds]
    if not seeds or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in seeds):
        raise bad_value("seeds", seeds, "a non-empty list of distinct integers >= 0")
    if len(set(seeds)) != len(seeds):
        repeated = sorted({v for v in seeds if seeds.count(v) > 1})
        raise bad_value("seeds", list(seeds), f"distinct seeds ({', '.join(map(str, repeated))} repeated)")
    return Subset(values=tuple(seeds), match=match)


def _branches(value) -> Subset | None:
    if value is None:
        return None
    fractions, match = _subset("branches", value, "fractions")
    if not fractions:
        raise bad_value("branches.fractions", fractions, "a non-empty list of fractions in (0, 1]")
    fractions = _number_list("branches.fractions", fractions, integer=False)
    for f in fractions:
        if f > 1:
            raise bad_value("branches.fractions", f, "fractions of a run's horizon in (0, 1]")
    if len(set(fractions)) != len(fractions):
        raise bad_value("branches.fractions", list(fractions), "distinct fractions")
    return Subset(values=tuple(sorted(fractions)), match=match)


def _lr_grids(value, families) -> tuple:
    if value is None:
        return ()
    grids = tuple(_lr_grid(v, families) for v in (value if isinstance(value, list) else [value]))
    if not grids:
        raise bad_value("lr_grid", value, "a grid mapping or a non-empty list of them")
    return grids


def _lr_grid(value, families) -> LrGrid:
    value = _mapping("lr_grid", value)
    allowed = {"lrs", "sizes", "budget", "families"}
    if not set(value) <= allowed or not {"lrs", "sizes", "budget"} <= set(value):
        raise bad_value("lr_grid", value, "a mapping with keys lrs, sizes, budget (and optionally families)")
    lrs = tuple(sorted(_number_list("lr_grid.lrs", value["lrs"] or [], integer=False)))
    if len(set(lrs)) < 3:
        raise bad_value("lr_grid.lrs", list(lrs), "at least 3 distinct learning rates (a parabola needs 3)")
    sizes = _number_list("lr_grid.sizes", value["sizes"] or [], integer=True)
    if not sizes:
        raise bad_value("lr_grid.sizes", value["sizes"], "a non-empty list of target sizes")
    budget = value["budget"]
    kind, amount = ("flops", budget) if not isinstance(budget, dict) else (next(iter(budget), None), budget)
    if isinstance(budget, dict):
        if len(budget) != 1 or kind not in BUDGET_KINDS:
            raise bad_value("lr_grid.budget", budget, "a FLOP budget, or {flops: C} or {tokens: D}")
        amount = budget[kind]
    (amount,) = _number_list(f"lr_grid.budget", amount, integer=False)
    grid_families = value.get("families") or list(families)
    for family in grid_families:
        if family not in families:
            raise bad_value("lr_grid.families", family, f"one of the sweep's families: {', '.join(families)}")
    return LrGrid(lrs=lrs, sizes=sizes, budget=Budget(kind, amount), families=tuple(grid_families))


def load_spec(path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise bad_value("SPEC", str(path), "an existing sweep YAML file")
    return parse_spec(read_yaml(path), name=path.stem)


# ---------------------------------------------------------------------------------------- expansion


def warmup_steps(fraction: float, steps: int, b2: float | None) -> int:
    """``fraction`` of the run's steps, but at least 2 / (1 - b2) (Adam's rule for linear warmup: its
    second moment averages over ~1 / (1 - b2) steps; Ma & Yarats 2021) and at most half the run. A short
    run that reached its peak lr sooner spiked (experiments/results/cpu_scaling_kjv/loss_spikes.md)."""
    b2 = OptimConfig.b2 if b2 is None else b2
    floor = math.ceil(2.0 / (1.0 - b2)) if fraction > 0 and b2 < 1 else 0
    return max(int(round(fraction * steps)), min(floor, steps // 2))


def _with_steps(raw: dict, steps: int, spec: SweepSpec | None = None) -> dict:
    """The run's horizon, and what the spec scales with it (warmup, evaluation spacing)."""
    train, optim = {"steps": steps}, {}
    if spec is not None and spec.warmup_fraction is not None:
        optim["warmup_steps"] = warmup_steps(spec.warmup_fraction, steps, (raw.get("optim") or {}).get("b2"))
    if spec is not None and spec.evals_per_run:
        train["eval_every"] = max(1, steps // spec.evals_per_run)
    return deep_merge(raw, {"train": train, "optim": optim})


def plan_family(spec: SweepSpec, family: str, lr_rule=None) -> list[PlannedRun]:
    """The family's runs: the lr grid's (when the spec has one) and, unless the grid is still to run
    (``lr_rule`` None), the main ones: ladder x budgets x seeds, and their cooldown branches."""
    family_raw = deep_merge(RUN_DEFAULTS, spec.base, spec.family_overrides.get(family, {}),
                            {"model": {"family": family}})
    planner = _Planner(spec, family, family_raw)
    runs = []
    for grid in spec.lr_grids:
        if family in grid.families:
            for size in grid.sizes:
                for lr in grid.lrs:
                    runs.append(planner.run(size, grid.budget, deep_merge(planner.sized(size), {"optim": {"lr": lr}}),
                                            stage="lr_grid"))
    if spec.lr_grids and lr_rule is None:
        return runs
    for size in spec.sizes:
        for budget in spec.budgets:
            if size not in spec.ladder(budget, family):
                continue
            run_raw = planner.sized(size)
            for override in spec.run_overrides:
                if override.applies(family, size, budget):
                    run_raw = deep_merge(run_raw, override.set)
            if lr_rule is not None and family in lr_rule:
                run_raw = deep_merge(run_raw, {"optim": {"lr": lr_rule[family].lr(planner.n_params(run_raw))}})
            seeds = spec.seeds.values if spec.seeds and spec.seeds.applies(family, size, budget) else (None,)
            for seed in seeds:
                seeded = run_raw if seed is None else deep_merge(run_raw, {"train": {"seed": seed}})
                fractions = spec.branches.values if spec.branches and spec.branches.applies(family, size, budget) \
                    else ()
                runs += planner.with_branches(size, budget, seeded, fractions)
    return runs


@functools.lru_cache(maxsize=None)
def solve_shape(family: str, size: int, base_model, seq_len: int, vocab: int, rule: str = "search"):
    """``sizing.solve``, once per process for each question (it counts parameters of candidate shapes:
    not free, and `sweep design` and every expansion ask the same ones again)."""
    from lmu_jax import sizing

    return sizing.solve(family, size, base_cfg=base_model, seq_len=seq_len, vocab_size=vocab, rule=rule)


@functools.lru_cache(maxsize=None)
def count_params(model_cfg, seq_len: int) -> dict:
    """``flops.param_counts`` (it builds the model's shapes), once per model config; do not modify."""
    from lmu_jax.flops import param_counts

    return param_counts(model_cfg, seq_len)


class _Planner:
    """Sizes, FLOPs per token and parameter counts of one family's runs (each solved or counted once)."""

    def __init__(self, spec: SweepSpec, family: str, family_raw: dict):
        self.spec, self.family, self.family_raw = spec, family, family_raw
        # base + family overrides: a run config, loaded and validated as every run config is
        self.base_cfg = config_from_dict(_with_steps(family_raw, 1))
        if self.base_cfg.optim.schedule not in HORIZON_SCHEDULES:
            raise bad_value("optim.schedule", self.base_cfg.optim.schedule,
                            f"{' or '.join(HORIZON_SCHEDULES)}: a sweep's final losses are (N, D) points only "
                            "when the schedule ends at the run's horizon")
        self.vocab = self.base_cfg.resolved_model().vocab_size
        self.shapes: dict = {}

    def sized(self, size: int) -> dict:
        if size not in self.shapes:
            self.shapes[size] = solve_shape(self.family, size, self.base_cfg.model, self.base_cfg.data.seq_len,
                                            self.vocab, self.spec.sizing_rules.get(self.family, "search"))
        return deep_merge(self.family_raw, {"model": dataclasses.asdict(self.shapes[size])})

    def _probe(self, run_raw: dict):
        probe = config_from_dict(_with_steps(run_raw, 1))
        model_cfg = probe.resolved_model()
        return probe, model_cfg, count_params(model_cfg, probe.data.seq_len)

    def n_params(self, run_raw: dict) -> int:
        return self._probe(run_raw)[2]["non_embedding"]

    def run(self, size: int, budget: Budget, run_raw: dict, stage: str = "main") -> PlannedRun:
        from lmu_jax.flops import model_flops_per_token

        probe, model_cfg, counts = self._probe(run_raw)
        flops_per_token = model_flops_per_token(model_cfg, probe.data.seq_len,
                                                feeds_carry=feeds_carry(model_cfg, probe.data.order))
        tokens_per_step = probe.train.batch_size * probe.data.seq_len
        per_step = tokens_per_step * (flops_per_token if budget.kind == "flops" else 1.0)
        steps = round(budget.value / per_step)
        if steps < 1:
            field_name = "lr_grid.budget" if stage == "lr_grid" else f"budgets.{budget.kind}"
            raise bad_value(field_name, budget.value,
                            f"at least one step of {self.family} at size {size}, i.e. >= {per_step / 2:.4g} "
                            f"(one step = {tokens_per_step} tokens = {tokens_per_step * flops_per_token:.4g} "
                            "FLOPs)")
        cfg = config_from_dict(_with_steps(run_raw, steps, self.spec))
        return PlannedRun(run_id=run_id(cfg), family=self.family, size=size, budget=budget, config=cfg,
                          params=counts, flops_per_token=flops_per_token, tokens_per_step=tokens_per_step,
                          stage=stage)

    def with_branches(self, size: int, budget: Budget, run_raw: dict, fractions: tuple) -> list[PlannedRun]:
        """The run and its cooldown branches (module docstring); the parent keeps the branch points."""
        from lmu_jax.train.optim import cooldown_start

        parent = self.run(size, budget, run_raw)
        fractions = [f for f in fractions if round(f * parent.steps) < parent.steps]
        if not fractions:
            return [parent]
        cfg = parent.config
        if cfg.optim.schedule != "wsd":
            raise bad_value("branches", list(fractions), f"runs with optim.schedule wsd ({self.family} has "
                            f"{cfg.optim.schedule}): a cooldown branch continues a stable phase")
        branches, points = [], []
        for fraction in fractions:
            steps = round(fraction * parent.steps)
            start = cooldown_start(cfg.optim, steps)
            if start < max(cfg.optim.warmup_steps, 1):
                raise bad_value("branches.fractions", fraction,
                                f"fractions whose branch cools down after the warmup: {fraction} x {parent.steps} "
                                f"steps of {self.family} at size {size} cools down from step {start}, the warmup "
                                f"is {cfg.optim.warmup_steps} steps")
            points.append(start)
            evals = self.spec.evals_per_run
            branch_raw = deep_merge(cfg.to_dict(), {"train": {
                "steps": steps, "branch_from": f"{parent.run_id}/checkpoints/{start}",
                "eval_every": max(1, (steps - start) // evals) if evals else cfg.train.eval_every}})
            branch_cfg = config_from_dict(branch_raw)
            branches.append(dataclasses.replace(parent, run_id=run_id(branch_cfg), config=branch_cfg,
                                                branch_of=parent.run_id, fraction=fraction))
        parent_cfg = config_from_dict(deep_merge(cfg.to_dict(), {"checkpoint": {"at": sorted(set(points))}}))
        return [dataclasses.replace(parent, config=parent_cfg), *branches]


def expand(spec: SweepSpec, lr_rules: dict | None = None) -> list[PlannedRun]:
    """Every run of the spec, ordered by budget, then family, then size; duplicates (same id) once. The
    replicates (a seed after the first of ``seeds``) come after every first-seed run, so that a sweep
    cut short has all of its budgets before it has their noise.

    With an ``lr_grid``: its runs, and the main runs only once ``lr_rules`` ({family: ``lr.LrRule``},
    from the finished grid, ``lmu_jax.sweep.lr.rules_from_grid``) is given."""
    runs, seen = [], set()
    planned = [run for family in spec.families for run in plan_family(spec, family, lr_rules)]
    main = [r for r in planned if r.stage == "main"]
    checks = [(f"run_overrides[{i}].match", o) for i, o in enumerate(spec.run_overrides)]
    checks += [(f"{name}.match", subset) for name, subset in (("seeds", spec.seeds), ("branches", spec.branches))
               if subset is not None and subset.match]
    for path, rule in checks:
        if main and not any(rule.applies(r.family, r.size, r.budget) for r in main):
            raise bad_value(path, rule.match, "a match for at least one run of the sweep")
    budget_order = {b: i for i, b in enumerate(spec.budgets)}
    family_order = {f: i for i, f in enumerate(spec.families)}
    # the lr grid first; a branch right after its parent (it starts from the parent's checkpoint)
    replicate_seeds = spec.seeds.values[1:] if spec.seeds else ()
    planned.sort(key=lambda r: (r.stage != "lr_grid", r.seed in replicate_seeds, budget_order.get(r.budget, -1),
                                family_order[r.family],
                                r.size, r.lr if r.stage == "lr_grid" else 0, r.seed, bool(r.branch_of), r.fraction))
    for run in planned:
        if run.run_id not in seen:
            seen.add(run.run_id)
            runs.append(run)
    return runs
