"""Sweep methodology: seeds and the noise floor, the lr grid and its rule, cooldown branches in a spec,
and `sweep design`. Planning only (nothing trains here): the branch mechanics are tests/test_branches.py."""

import csv
import json
import math

import numpy as np
import pytest
import yaml

from helpers import cli_subprocess
from test_sweep import spec_dict

from lmu_jax.errors import UserError
from lmu_jax.report.report import build_report
from lmu_jax.sweep.commands import expand_in
from lmu_jax.sweep.design import design, optimal_size
from lmu_jax.sweep.lr import best_lr, fit_rule, read_rules
from lmu_jax.sweep.runner import SweepDir
from lmu_jax.sweep.spec import expand, load_spec, parse_spec

WSD = {"lr": 3.0e-3, "schedule": "wsd", "decay_fraction": 0.2}


def small(cache, **changes):
    return spec_dict(cache, **{"families": ["transformer", "lstm"], "sizes": [5_000], "budgets": {"flops": [4.0e9]},
                               **changes})


def test_seeds_expand_to_distinct_runs_for_the_matched_subset(kjv_cache):
    runs = expand(parse_spec(small(kjv_cache, sizes=[5_000, 10_000],
                                   seeds={"values": [0, 1, 2], "match": {"family": "lstm", "size": 5_000}})))
    seeded = [r for r in runs if r.family == "lstm" and r.size == 5_000]
    assert sorted(r.seed for r in seeded) == [0, 1, 2] and len({r.run_id for r in runs}) == len(runs) == 6
    assert all(r.config.train.seed == r.seed == r.summary()["seed"] for r in runs)
    assert len({r.steps for r in seeded}) == 1  # the same run but for its seed
    everywhere = expand(parse_spec(small(kjv_cache, seeds=[3, 4])))
    assert sorted((r.family, r.seed) for r in everywhere) == [("lstm", 3), ("lstm", 4), ("transformer", 3),
                                                              ("transformer", 4)]
    # the replicates after every budget's first seed: a sweep cut short has all its budgets first
    two_budgets = expand(parse_spec(small(kjv_cache, seeds=[3, 4], budgets={"flops": [4.0e9, 8.0e9]})))
    order = [(r.seed, r.budget.value) for r in two_budgets]
    assert order == [(3, 4e9)] * 2 + [(3, 8e9)] * 2 + [(4, 4e9)] * 2 + [(4, 8e9)] * 2


def test_a_budget_may_give_each_family_its_own_ladder(kjv_cache):
    runs = expand(parse_spec(small(kjv_cache, budgets={"flops": [4.0e9, 8.0e9]}, sizes={
        4.0e9: [5_000], 8.0e9: {"transformer": [5_000, 10_000], "lstm": [20_000]}})))
    planned = sorted((r.family, r.budget.value, r.size) for r in runs)
    assert planned == [("lstm", 4e9, 5_000), ("lstm", 8e9, 20_000), ("transformer", 4e9, 5_000),
                       ("transformer", 8e9, 5_000), ("transformer", 8e9, 10_000)]


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 1, 1]}, "seeds=[0, 1, 1] is invalid: distinct seeds (1 repeated)"),
    ({"seeds": [-1]}, "seeds=[-1] is invalid"),
    ({"seeds": {"values": [0, 1], "match": {"size": 7_000}}}, "seeds.match="),
    ({"seeds": {"values": [0, 1], "match": {"depth": 2}}}, "keys among family, size, budget"),
    ({"branches": [0.5, 1.5]}, "branches.fractions=1.5 is invalid: fractions of a run's horizon in (0, 1]"),
    ({"branches": [0.5]}, "runs with optim.schedule wsd"),
    ({"branches": [0.01], "base": {"optim": WSD}}, "branches.fractions=0.01 is invalid: fractions whose branch"),
    ({"lr_grid": {"lrs": [1e-3, 3e-3], "sizes": [5_000], "budget": 2e9}}, "at least 3 distinct learning rates"),
    ({"lr_grid": {"lrs": [1e-3, 3e-3, 1e-2], "sizes": [5_000]}}, "lr_grid="),
    ({"sizes": {2.0e9: [5_000]}}, "one ladder per budget"),
    ({"sizes": {4.0e9: {"lstm": [5_000]}}}, "sizes.4000000000.0=['lstm'] is invalid: one ladder per family"),
])
def test_bad_method_keys_are_one_line_user_errors(kjv_cache, change, message):
    raw = small(kjv_cache, **change)
    if "base" in change:
        raw["base"] = {**spec_dict(kjv_cache)["base"], **change["base"]}
    with pytest.raises(UserError) as err:
        expand(parse_spec(raw))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_duplicate_seeds_exit_2_from_the_cli(tmp_path, kjv_cache):
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(small(kjv_cache, seeds=[0, 0])))
    done = cli_subprocess(["sweep", "plan", str(path)], devices=1)
    assert done.returncode == 2 and done.stderr == "error: seeds=[0, 0] is invalid: distinct seeds (0 repeated)\n"


def test_branches_follow_their_parent_which_keeps_the_branch_points(kjv_cache):
    raw = small(kjv_cache, families=["transformer"], branches=[0.25, 0.5, 1.0])
    raw["base"] = {**raw["base"], "optim": WSD}
    parent, quarter, half = expand(parse_spec(raw))  # fraction 1 is the parent itself
    assert not parent.branch_of and quarter.branch_of == half.branch_of == parent.run_id
    for branch, fraction in ((quarter, 0.25), (half, 0.5)):
        steps = round(fraction * parent.steps)
        start = steps - round(0.2 * steps)
        assert branch.steps == steps and branch.config.train.branch_from == f"{parent.run_id}/checkpoints/{start}"
        assert start in parent.config.checkpoint.at
        assert branch.config.optim == parent.config.optim  # the parent's warmup, not one scaled to the branch
        summary = branch.summary()  # a point of its own: prefix + cooldown
        assert summary["budget_kind"] == "branch" and summary["flops"] == pytest.approx(steps * parent.flops / parent.steps)
    assert len(parent.config.checkpoint.at) == 2


def test_lr_parabola_recovers_a_known_optimum():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    loss = lambda lr, best: 2.0 + 0.3 * np.log(lr / best) ** 2  # noqa: E731
    for best in (4.2e-4, 1e-3, 7e-3):
        found = best_lr(lrs, [loss(lr, best) for lr in lrs])
        assert found.bracketed and found.lr == pytest.approx(best, rel=1e-6)
    diverged = [loss(lr, 1e-3) for lr in lrs[:-1]] + [float("nan")]  # a NaN loss is not a minimum
    assert best_lr(lrs, diverged).lr == pytest.approx(1e-3, rel=1e-6)
    edge = best_lr(lrs, [loss(lr, 1e-1) for lr in lrs])
    assert not edge.bracketed and edge.lr == 3e-2
    rule = fit_rule("x", [{"N": n, "best_lr": 0.5 * n ** -0.4} for n in (1e4, 4e4, 1.6e5)])
    assert rule.c == pytest.approx(0.5) and rule.gamma == pytest.approx(0.4)
    assert rule.lr(2e4) == float(f"{0.5 * 2e4 ** -0.4:.4g}")
    # optima that bend: the rule goes through each, log-linear between them, the nearest one beyond
    bent = fit_rule("x", [{"N": 1e4, "best_lr": 0.05}, {"N": 1e5, "best_lr": 0.005}, {"N": 4e5, "best_lr": 0.004}])
    assert [bent.lr(n) for n in (1e4, 1e5, 4e5)] == [0.05, 0.005, 0.004]
    assert bent.lr(math.sqrt(1e4 * 1e5)) == pytest.approx(math.sqrt(0.05 * 0.005), rel=1e-3)
    assert bent.lr(1e3) == 0.05 and bent.lr(2e6) == 0.004


def test_lr_rule_from_the_grid_sets_every_main_runs_lr(tmp_path, kjv_cache):
    raw = small(kjv_cache, sizes=[5_000, 20_000], seeds=[0, 1],
                lr_grid=[{"lrs": [1e-3, 3e-3, 1e-2, 3e-2], "sizes": [5_000, 20_000], "budget": 2.0e9},
                         # a second grid: one family gets a larger size, with lrs around its own optimum
                         {"lrs": [1e-3, 3e-3, 1e-2], "sizes": [40_000], "budget": 2.0e9, "families": ["lstm"]}])
    spec = parse_spec(raw)
    sweep = SweepDir(tmp_path / "sweep")
    sweep.runs.mkdir(parents=True)
    grid = expand(spec)
    assert {r.stage for r in grid} == {"lr_grid"} and len(grid) == 2 * 2 * 4 + 3
    assert expand_in(spec, sweep.path) == grid  # the grid is not finished: no main runs yet
    c, gamma = {"transformer": (0.4, 0.5), "lstm": (2.0, 0.6)}, {}
    for run in grid:  # finished grid runs whose loss is lowest at c N^-gamma
        best = c[run.family][0] * run.n_params ** -c[run.family][1]
        run_dir = sweep.run_dir(run.run_id)
        run_dir.mkdir()
        if run.lr == 3e-2 and run.family == "transformer" and run.size == 20_000:  # diverged: a NaN loss
            (run_dir / "sweep.json").write_text(json.dumps({"state": "failed"}))
            continue
        (run_dir / "eval.json").write_text(json.dumps({"loss": 2.0 + 0.1 * math.log(run.lr / best) ** 2}))
        (run_dir / "DONE").write_text("{}")
    runs = expand_in(spec, sweep.path)
    main = [r for r in runs if r.stage == "main"]
    assert len(main) == 2 * 2 * 2 and runs[:len(grid)] == grid  # the grid first
    for run in main:
        wanted = c[run.family][0] * run.n_params ** -c[run.family][1]
        assert run.config.optim.lr == pytest.approx(wanted, rel=2e-3)
    rules = read_rules(sweep.path)
    assert rules["lstm"]["gamma"] == pytest.approx(0.6, abs=1e-6) and all(p["bracketed"] for p in rules["lstm"]["points"])
    assert [p["size"] for p in rules["lstm"]["points"]] == [5_000, 20_000, 40_000]
    assert [p["size"] for p in rules["transformer"]["points"]] == [5_000, 20_000]


def test_a_best_lr_at_the_grids_edge_plans_no_main_runs_and_says_what_to_add(tmp_path, kjv_cache):
    raw = small(kjv_cache, families=["transformer"], sizes=[5_000, 20_000],
                lr_grid={"lrs": [1e-3, 3e-3, 1e-2], "sizes": [5_000, 20_000], "budget": 2.0e9})
    spec = parse_spec(raw)
    sweep = SweepDir(tmp_path / "sweep")
    for run in expand(spec):  # the loss keeps falling to the grid's largest lr at 20k
        run_dir = sweep.run_dir(run.run_id)
        run_dir.mkdir(parents=True)
        best = 3e-3 if run.size == 5_000 else 0.1
        (run_dir / "eval.json").write_text(json.dumps({"loss": 2.0 + 0.1 * math.log(run.lr / best) ** 2}))
        (run_dir / "DONE").write_text("{}")
    with pytest.raises(UserError, match=r"lr_grid.lrs=\[0.001, 0.003, 0.01\] is invalid: the best lr lies at the "
                                        r"grid's edge \(transformer at N=[\d,]+: 0.01\), .* add larger lrs"):
        expand_in(spec, sweep.path)
    assert read_rules(sweep.path)["transformer"]["points"][1]["bracketed"] is False  # the grid is recorded


def write_seeded_run(sweep, family, seed, loss, n=20_000, steps=100, tokens_per_step=64):
    """A finished run directory in the trainer's format (config.yaml, metrics.jsonl, eval.json, DONE)."""
    run_id = f"{family[:3]}-s{seed}"
    run_dir = sweep / "runs" / run_id
    run_dir.mkdir(parents=True)
    config = {"model": {"family": family}, "data": {"seq_len": 16, "corpus": "kjv"},
              "train": {"batch_size": 4, "steps": steps, "seed": seed}, "optim": {"schedule": "cosine", "lr": 3e-3}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"kind": "train", "step": s, "loss": loss + 1.0 / s, "tokens": s * tokens_per_step,
                "flops_model": s * tokens_per_step * 6 * n} for s in range(1, steps + 1)]
    records += [{"kind": "eval", "step": s, "loss": loss + 0.5 * (1 - s / steps) + 1e-9 * s} for s in (25, 50, 75, 100)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "eval.json").write_text(json.dumps({
        "loss": loss, "bits_per_token": loss / math.log(2), "bits_per_byte": loss / math.log(2),
        "per_position_loss": [loss] * 16, "step": steps, "tokens": steps * tokens_per_step,
        "params": {"total": n + 100, "non_embedding": n, "embedding": 100}, "flops_per_token": 6.0 * n,
        "flops_model": steps * tokens_per_step * 6.0 * n, "family": family, "run_id": run_id}))
    (run_dir / "DONE").write_text("{}")
    return {"run_id": run_id, "family": family, "size": n, "budget_kind": "flops", "budget": 7.68e8, "N": n,
            "steps": steps, "seed": seed}


def test_collect_keeps_seeds_and_the_report_states_the_noise_floor(tmp_path):
    sweep = tmp_path / "sweep"
    losses = {"transformer": [2.00, 2.02, 1.98], "lstm": [2.01, 2.03, 1.99], "lmu": [1.80, 1.81, 1.79]}
    plan = [write_seeded_run(sweep, family, seed, loss) for family, values in losses.items()
            for seed, loss in enumerate(values)]
    (sweep / "plan.json").write_text(json.dumps({"name": "seeds", "runs": plan}))
    (sweep / "spec.yaml").write_text(yaml.safe_dump({"name": "seeds", "families": list(losses)}))
    report = build_report(sweep, bootstrap=5)
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["family"], int(r["seed"])) for r in rows) == sorted((f, s) for f in losses for s in range(3))
    floor = math.sqrt(np.mean([np.var(v, ddof=1) for v in losses.values()]))  # equal group sizes: mean variance
    text = report["markdown"].read_text()
    assert f"Noise floor: {floor:.4f} nats per token" in text and "3 (budget, family, size) groups" in text
    assert "2.0000 ± 0.0200" in text  # the transformer's mean ± std
    assert "per family (pooled over its own groups): Transformer 0.0200; LSTM 0.0200; LMU 0.0100" in text
    lines = {tuple(cell.strip() for cell in line.split("|")[3:5]): line for line in text.splitlines()
             if line.count("|") == 9}
    assert "within noise" in lines["Transformer", "LSTM"] and "σ" in lines["Transformer", "LMU"].split("|")[-2]


def test_each_family_has_its_own_noise_floor_and_one_without_seeds_borrows_the_pooled_one():
    from lmu_jax.report.noise import family_floors
    from lmu_jax.scaling.compare import difference_with_noise

    stats = [{"family": "lmu", "seeds": [0, 1], "std": 0.05}, {"family": "lmu", "seeds": [0, 1], "std": 0.03},
             {"family": "transformer", "seeds": [0, 1, 2], "std": 0.01}, {"family": "lstm", "seeds": [0], "std": math.nan}]
    floors = family_floors(stats)
    assert floors["lmu"] == pytest.approx(math.sqrt((0.05 ** 2 + 0.03 ** 2) / 2)) and floors["transformer"] == 0.01
    assert floors["lstm"] == floors[None] == pytest.approx(math.sqrt((0.05 ** 2 + 0.03 ** 2 + 2 * 0.01 ** 2) / 4))
    # one seed each: each borrows its own family's floor
    assert difference_with_noise([1.0], [1.1], floors["lmu"], floors["transformer"]).sigma == pytest.approx(
        math.hypot(floors["lmu"], 0.01))


def test_design_brackets_each_budgets_optimum_and_writes_a_spec(tmp_path, kjv_cache):
    base = {k: v for k, v in spec_dict(kjv_cache)["base"].items() if k != "checkpoint"}
    raw, rows = design(["transformer", "lstm"], 3e10, 1.2e11, hours=1.0, base=base, flops_per_s=5e9,
                       train_tokens=10_000_000)
    assert raw["budgets"]["flops"] == [3e10, 1.2e11]  # ~4x apart
    for budget, sizes in raw["sizes"].items():
        n_opt = optimal_size(budget)
        assert len(sizes) == 5 and sizes[0] < n_opt / 3 and sizes[-1] > 3 * n_opt
        assert sizes[1] < n_opt < sizes[3] and all(1.4 < b / a < 2.9 for a, b in zip(sizes, sizes[1:]))
    assert sum(r["est_s"] for r in rows) <= 3600 and {r["rate_source"] for r in rows} == {"spec"}
    path = tmp_path / "designed.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert [r.run_id for r in expand(load_spec(path))] == [r["run_id"] for r in rows] and len(rows) == 2 * 2 * 5
    prior = design(["transformer"], 3e10, 3e10, hours=1.0, base=base, flops_per_s=5e9, train_tokens=10_000_000,
                   prior=(2.0, 0.35))[0]
    assert prior["sizes"][3e10][2] == pytest.approx(2.0 * 3e10 ** 0.35, rel=0.1)  # centred on the prior fit
    shorter = design(["transformer", "lstm"], 3e10, 1.2e11, hours=0.05, base=base, flops_per_s=5e9,
                     train_tokens=10_000_000)[0]
    assert shorter["budgets"]["flops"] == [3e10]  # the larger budget did not fit in the time


@pytest.mark.parametrize("kwargs, message", [
    ({"train_tokens": 100_000}, "epochs of the corpus's 100,000 training tokens (at most 4); it needs >= "),
    ({"hours": 0.001}, "--hours=0.001 is invalid: the smallest design"),
    ({"flops_per_s": None}, "a measured FLOP/s for the time estimate"),
])
def test_design_refuses(kjv_cache, kwargs, message):
    base = {k: v for k, v in spec_dict(kjv_cache)["base"].items() if k != "checkpoint"}
    args = {"hours": 1.0, "base": base, "flops_per_s": 5e9, "train_tokens": 10_000_000, **kwargs}
    with pytest.raises(UserError) as err:
        design(["transformer"], 3e10, 3e10, **args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_design_cli_bad_input_exit_2(tmp_path, kjv_cache):
    args = ["sweep", "design", "--families", "transformer", "--hours", "1", "--flops-per-s", "1e9",
            "--out", str(tmp_path / "x.yaml")]
    done = cli_subprocess([*args, "--flops", "1e9"], devices=1)
    assert done.returncode == 2 and done.stderr.startswith("error: --flops='1e9' is invalid: 2 positive numbers")
    base = tmp_path / "base.yaml"  # the 100 kB corpus slice: ~90 k training tokens
    base.write_text(yaml.safe_dump({"data": spec_dict(kjv_cache)["base"]["data"]}))
    done = cli_subprocess([*args, "--flops", "3e10:3e10", "--base", str(base)], devices=1)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "epochs of the corpus's" in done.stderr and "tokens of data: a bigger corpus" in done.stderr
    assert not (tmp_path / "x.yaml").exists()
