"""A sweep spec (YAML) -> the list of runs it means, at matched training FLOPs.

A spec names model families, a ladder of target sizes (non-embedding parameters, each solved into a
shape per family by ``lmu_jax.sizing``) and budgets, plus a ``base`` RunConfig dict shared by every run::

    name: demo
    families: [transformer, lstm, lmu]
    sizes: [20000, 60000, 180000]          # target non-embedding parameters
    sizing_rules: {lmu: paper}             # optional, per family: search (default) | paper (d = sqrt(N/24))
    budgets:
      flops: [3.0e12]                      # training FLOPs per run (model_flops_per_token convention)
      tokens: []                           # and/or token budgets (FLOPs then differ across runs)
    warmup_fraction: 0.05                  # optional: optim.warmup_steps = this x the run's own steps
    evals_per_run: 4                       # optional: train.eval_every = the run's steps / this
    base:                                  # any RunConfig sections; model shape keys come from sizing, and
      data: {corpus: kjv, seq_len: 128}    # base.model holds only keys every family has (dtype, ...)
      optim: {lr: 3.0e-3, schedule: cosine}
      train: {batch_size: 16}
    family_overrides:                      # merged over base for one family (before sizing): its own
      lstm: {optim: {lr: 1.0e-2}}          # model keys (order, n_heads, ...) and anything else
    run_overrides:                         # merged last, onto the runs that match every given key
      - match: {family: lstm, size: 180000}  # keys: family, size, budget
        set: {train: {seed: 1}}
    throughput:                            # FLOP/s for the plan's time estimates (measured ones win)
      default: 2.0e10
      lstm: 5.0e9

A FLOP budget C gives each run ``steps = round(C / (flops_per_token * batch * seq_len))``, so the runs'
training FLOPs match up to the rounding of steps (within 0.5 / steps). The learning-rate schedule's
horizon is the run's own ``train.steps`` (cosine decays to it; WSD cools down at its end), so every
final loss is a valid (N, D) point (docs/scaling.md); a ``constant`` schedule is
refused for that reason. Run ids are ``lmu_jax.config.run_id`` of the resolved config.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lmu_jax.config import RunConfig, config_from_dict, read_yaml, run_id
from lmu_jax.errors import UserError, bad_value

SPEC_KEYS = ("name", "description", "families", "sizes", "sizing_rules", "budgets", "warmup_fraction",
             "evals_per_run", "base", "family_overrides", "run_overrides", "throughput")
SIZING_RULES = ("search", "paper")
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
        have = {"family": family, "size": size, "budget": budget.value}
        return all(have[key] == value for key, value in self.match.items())


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
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the spec as written


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
                "batch_size": self.config.train.batch_size, "schedule": self.config.optim.schedule}


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
    from lmu_jax.models import FAMILIES

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

    sizes = _number_list("sizes", raw.get("sizes") or [], integer=True)
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
        match = _mapping(f"run_overrides[{i}].match", entry["match"])
        for key in match:
            if key not in MATCH_KEYS:
                raise bad_value(f"run_overrides[{i}].match", key, f"keys among {', '.join(MATCH_KEYS)}")
        match = dict(match)  # numbers as the ladder and budgets hold them (YAML may give "1e12")
        if "size" in match:
            (match["size"],) = _number_list(f"run_overrides[{i}].match.size", match["size"], integer=True)
        if "budget" in match:
            (match["budget"],) = _number_list(f"run_overrides[{i}].match.budget", match["budget"], integer=False)
        run_overrides.append(RunOverride(match=match, set=_mapping(f"run_overrides[{i}].set", entry["set"])))

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

    return SweepSpec(name=str(raw.get("name") or name), families=tuple(families), sizes=sizes,
                     budgets=tuple(budgets), sizing_rules=sizing_rules, base=_mapping("base", raw.get("base")),
                     family_overrides=family_overrides, run_overrides=tuple(run_overrides),
                     warmup_fraction=warmup_fraction, evals_per_run=evals_per_run, throughput=throughput,
                     description=str(raw.get("description") or ""), raw=raw)


def load_spec(path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise bad_value("SPEC", str(path), "an existing sweep YAML file")
    return parse_spec(read_yaml(path), name=path.stem)


# ---------------------------------------------------------------------------------------- expansion


def tokenizer_vocab_size(raw_config: dict) -> int:
    """The vocabulary a run will have, without reading the corpus (as `lmu-jax flops` does)."""
    from lmu_jax.data.tokenizers import BYTE_VOCAB_SIZE

    data = raw_config.get("data") or {}
    model = raw_config.get("model") or {}
    if model.get("vocab_size"):
        return int(model["vocab_size"])
    if data.get("tokenizer", "byte") == "byte":
        return BYTE_VOCAB_SIZE
    return int(data.get("sp_vocab_size", 4096))


def _with_steps(raw: dict, steps: int, spec: SweepSpec | None = None) -> dict:
    """The run's horizon, and what the spec scales with it (warmup, evaluation spacing)."""
    train, optim = {"steps": steps}, {}
    if spec is not None and spec.warmup_fraction is not None:
        optim["warmup_steps"] = int(round(spec.warmup_fraction * steps))
    if spec is not None and spec.evals_per_run:
        train["eval_every"] = max(1, steps // spec.evals_per_run)
    return deep_merge(raw, {"train": train, "optim": optim})


def _family_base(spec: SweepSpec, family: str) -> dict:
    raw = deep_merge(RUN_DEFAULTS, spec.base, spec.family_overrides.get(family, {}), {"model": {"family": family}})
    schedule = (raw.get("optim") or {}).get("schedule", "cosine")
    if schedule not in HORIZON_SCHEDULES:
        raise bad_value("base.optim.schedule", schedule,
                        f"{' or '.join(HORIZON_SCHEDULES)}: a sweep's final losses are (N, D) points only "
                        "when the schedule ends at the run's horizon")
    return raw


def plan_family(spec: SweepSpec, family: str) -> list[PlannedRun]:
    from lmu_jax import sizing
    from lmu_jax.flops import model_flops_per_token, param_counts
    from lmu_jax.models import carries_state

    family_raw = _family_base(spec, family)
    base_cfg = config_from_dict(_with_steps(family_raw, 1))  # validates base + overrides early
    vocab = tokenizer_vocab_size(family_raw)
    counts: dict = {}  # model config -> param_counts (it builds the model's shapes: not free)
    runs = []
    for size in spec.sizes:
        shape = sizing.solve(family, size, base_cfg=base_cfg.model, seq_len=base_cfg.data.seq_len,
                             vocab_size=vocab, rule=spec.sizing_rules.get(family, "search"))
        sized_raw = deep_merge(family_raw, {"model": dataclasses.asdict(shape)})
        for budget in spec.budgets:
            run_raw = sized_raw
            for override in spec.run_overrides:
                if override.applies(family, size, budget):
                    run_raw = deep_merge(run_raw, override.set)
            probe = config_from_dict(_with_steps(run_raw, 1))
            model_cfg = probe.model.resolved(vocab, probe.data.seq_len)
            flops_per_token = model_flops_per_token(model_cfg, probe.data.seq_len,
                                                    carried=carries_state(model_cfg, probe.data.order))
            tokens_per_step = probe.train.batch_size * probe.data.seq_len
            per_step = tokens_per_step * (flops_per_token if budget.kind == "flops" else 1.0)
            steps = round(budget.value / per_step)
            if steps < 1:
                raise bad_value(f"budgets.{budget.kind}", budget.value,
                                f"at least one step of {family} at size {size}, i.e. >= {per_step / 2:.4g} "
                                f"(one step = {tokens_per_step} tokens = {tokens_per_step * flops_per_token:.4g} "
                                "FLOPs)")
            cfg = config_from_dict(_with_steps(run_raw, steps, spec))
            if (model_cfg, probe.data.seq_len) not in counts:
                counts[model_cfg, probe.data.seq_len] = param_counts(model_cfg, probe.data.seq_len)
            runs.append(PlannedRun(run_id=run_id(cfg), family=family, size=size, budget=budget, config=cfg,
                                   params=counts[model_cfg, probe.data.seq_len],
                                   flops_per_token=flops_per_token, tokens_per_step=tokens_per_step))
    return runs


def expand(spec: SweepSpec) -> list[PlannedRun]:
    """Every run of the spec, ordered by budget, then family, then size; duplicates (same id) once."""
    runs, seen = [], set()
    planned = [run for family in spec.families for run in plan_family(spec, family)]
    for i, override in enumerate(spec.run_overrides):
        if not any(override.applies(r.family, r.size, r.budget) for r in planned):
            raise bad_value(f"run_overrides[{i}].match", override.match, "a match for at least one run of the sweep")
    budget_order = {b: i for i, b in enumerate(spec.budgets)}
    family_order = {f: i for i, f in enumerate(spec.families)}
    planned.sort(key=lambda r: (budget_order[r.budget], family_order[r.family], r.size))
    for run in planned:
        if run.run_id not in seen:
            seen.add(run.run_id)
            runs.append(run)
    return runs
