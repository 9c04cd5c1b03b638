"""Sweeps: spec validation, matched FLOPs, stable run ids, and running with a crash, status and retry."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers import cli_subprocess, subprocess_env

from lmu_jax.config import config_from_dict, read_yaml, resolve_auto, run_id
from lmu_jax.errors import UserError
from lmu_jax.sweep.collect import COLUMNS
from lmu_jax.sweep.runner import last_step
from lmu_jax.sweep.spec import expand, parse_spec, warmup_steps


def spec_dict(cache_dir, **changes) -> dict:
    spec = {
        "name": "t",
        "families": ["transformer", "lstm", "lmu"],
        "sizes": [5_000, 10_000, 20_000],
        "budgets": {"flops": [2.0e9, 8.0e9]},
        "warmup_fraction": 0.1,
        "evals_per_run": 2,
        "base": {
            "data": {"corpus": "kjv", "seq_len": 16, "max_bytes": 100_000, "val_windows": 4,
                     "cache_dir": str(cache_dir)},
            "optim": {"lr": 3.0e-3, "schedule": "cosine"},
            "train": {"batch_size": 4},
            "checkpoint": {"every": 50, "keep": 1},
        },
    }
    spec.update(changes)
    return spec


def test_runs_at_a_budget_have_matched_flops(kjv_cache):
    spec = parse_spec(spec_dict(kjv_cache))
    runs = expand(spec)
    assert len(runs) == 3 * 3 * 2
    for budget in spec.budgets:
        at_budget = [r for r in runs if r.budget == budget]
        flops = [r.flops for r in at_budget]
        assert max(flops) / min(flops) - 1 <= 0.02, [(r.family, r.size, r.steps, r.flops) for r in at_budget]
        assert all(abs(f / budget.value - 1) <= 0.02 for f in flops)
        assert len({r.family for r in at_budget}) == 3 and len({r.size for r in at_budget}) == 3
    for r in runs:
        cfg = r.config
        assert r.tokens == cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len  # D
        assert abs(r.n_params / r.size - 1) <= 0.05  # sizing hit the ladder
        # the schedule's horizon is the run's own length; warmup and evaluations scale with it
        assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps == warmup_steps(0.1, cfg.train.steps, None)
        assert cfg.train.eval_every == max(1, cfg.train.steps // 2)
        assert r.run_id == run_id(cfg)
    # families see different token counts at equal FLOPs (their FLOPs per token differ)
    assert len({r.tokens for r in runs if r.budget == spec.budgets[0]}) > 1


def test_warmup_is_a_fraction_of_the_run_but_at_least_adams_horizon_and_at_most_half():
    """2 / (1 - b2) steps (40 at b2 = 0.95): shorter warmups made short runs spike
    (experiments/results/cpu_scaling_kjv/loss_spikes.md)."""
    assert [warmup_steps(0.1, steps, 0.95) for steps in (60, 136, 400, 850)] == [30, 40, 40, 85]
    assert warmup_steps(0.1, 136, 0.99) == 68 and warmup_steps(0.0, 136, 0.95) == 0


def test_token_budget_matches_tokens_not_flops(kjv_cache):
    runs = expand(parse_spec(spec_dict(kjv_cache, budgets={"tokens": [16_000]}, families=["transformer", "lmu"])))
    assert {r.tokens for r in runs} == {16_000}
    assert len({round(r.flops) for r in runs}) == len(runs)


@pytest.mark.parametrize("change, message", [
    ({"families": ["transformer", "gru"]}, "families='gru' is invalid"),
    ({"families": []}, "families=[] is invalid"),
    ({"sizes": []}, "sizes=[] is invalid: a non-empty ladder"),
    ({"budgets": {"flops": [1.0e3]}}, "budgets.flops=1000.0 is invalid: at least one step of transformer"),
    ({"budgets": {}}, "at least one budget"),
    ({"budgets": {"seconds": [10]}}, "budgets='seconds' is invalid"),
    ({"grid": 1}, "grid is not a known sweep spec key"),
    ({"family_overrides": {"qrnn": {}}}, "one of the sweep's families"),
    ({"run_overrides": [{"match": {"depth": 2}, "set": {}}]}, "keys among family, size, budget"),
    ({"run_overrides": [{"match": {"size": 7_000}, "set": {}}]}, "a match for at least one run"),
    ({"base": {"optim": {"schedule": "constant"}}}, "schedule ends at the run's horizon"),
    ({"base": {"train": {"batch_size": 0}}}, "train.batch_size=0 is invalid"),
    # base + family overrides are a run config: the run config's own one-line errors
    ({"family_overrides": {"lstm": {"optim": {"schedule": "step"}}}},
     "optim.schedule='step' is invalid: cosine, wsd or constant"),
    ({"family_overrides": {"transformer": {"model": {"n_heads": 3}}}}, "model.n_heads=3 is invalid: a positive divisor"),
])
def test_bad_specs_are_one_line_user_errors(kjv_cache, change, message):
    with pytest.raises(UserError) as err:
        expand(parse_spec(spec_dict(kjv_cache, **change)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_spec_exit_2_and_plan_ids_stable(tmp_path, kjv_cache):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_dict(kjv_cache, budgets={"flops": [10.0]})))
    done = cli_subprocess(["sweep", "plan", str(bad)], devices=1)
    assert done.returncode == 2 and done.stderr.startswith("error: budgets.flops=10.0 is invalid")
    assert done.stderr.count("\n") == 1

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec_dict(kjv_cache, sizes=[5_000, 10_000])))
    first = cli_subprocess(["sweep", "plan", str(good), "--format", "ids"], devices=1)
    second = cli_subprocess(["sweep", "plan", str(good), "--format", "ids"], devices=1)
    assert first.returncode == 0, first.stderr
    ids = first.stdout.split()
    assert len(ids) == 3 * 2 * 2 == len(set(ids)) and second.stdout == first.stdout
    assert ids == [r.run_id for r in expand(parse_spec(read_yaml(good)))]  # same ids in-process
    table = cli_subprocess(["sweep", "plan", str(good), "--sweep-dir", str(tmp_path / "sw")], devices=1)
    header = table.stdout.splitlines()[0].split()
    assert header[:4] == ["run_id", "family", "N", "N_total"] and "est.time" in header
    assert all(run in table.stdout for run in ids) and "12 runs" in table.stdout


@pytest.mark.slow
def test_sweep_run_survives_a_crash_and_retries_only_it(tmp_path, kjv_cache):
    """Three runs, one of which crashes at run time (its corpus does not exist): the others finish,
    status names the failure and its error, a rerun retries only that one; then collect."""
    crash = {"match": {"size": 20_000}, "set": {"data": {"corpus": "files:/nonexistent/*.txt"}}}
    spec_path = tmp_path / "crash.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(kjv_cache, families=["transformer"], budgets={"flops": [4.0e8]},
                                                  run_overrides=[crash])))
    sweep_dir = tmp_path / "sweep"
    args = [str(spec_path), "--sweep-dir", str(sweep_dir)]
    runs = expand(parse_spec(read_yaml(spec_path)))
    crashing = next(r.run_id for r in runs if r.size == 20_000)

    first = cli_subprocess(["sweep", "run", *args], devices=1, timeout=600)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "2/3 runs done" in first.stdout and "run 3/3" in first.stderr

    status = cli_subprocess(["sweep", "status", *args], devices=1)
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[:-1]}
    assert "failed" in lines[crashing] and "a glob matching at least one file" in lines[crashing]
    assert all(" done " in lines[r.run_id] for r in runs if r.run_id != crashing)
    assert status.stdout.splitlines()[-1].startswith("2 done, 1 failed")
    record = json.loads((sweep_dir / "runs" / crashing / "sweep.json").read_text())
    assert record["state"] == "failed" and record["returncode"] == 2 and record["log_tail"]

    logs = {r.run_id: (sweep_dir / "runs" / r.run_id / "train.log").read_text() for r in runs}
    second = cli_subprocess(["sweep", "run", *args, "--no-progress"], devices=1, timeout=600)
    assert second.returncode == 1
    assert second.stderr.count("done before; skipped") == 2 and second.stderr.count("FAILED") == 1
    for r in runs:  # finished runs were not touched; the failed one was tried again
        after = (sweep_dir / "runs" / r.run_id / "train.log").read_text()
        assert (after == logs[r.run_id]) == (r.run_id != crashing)
    assert json.loads((sweep_dir / "runs" / crashing / "sweep.json").read_text())["attempts"] == 2

    only = cli_subprocess(["sweep", "run", *args, "--only", runs[0].run_id, "--no-progress"], devices=1)
    assert only.returncode == 0 and "1/1 runs done" in only.stdout and "skipped" in only.stderr

    collected = cli_subprocess(["sweep", "collect", *args], devices=1)
    assert collected.returncode == 0 and "2 finished runs" in collected.stdout and "1 not finished" in collected.stdout
    with open(sweep_dir / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS and len(rows) == 2
    planned = {r.run_id: r for r in runs}
    for row in rows:
        run = planned[row["run_id"]]
        assert int(row["N"]) == run.n_params and int(row["D"]) == run.tokens
        assert float(row["C"]) == pytest.approx(run.flops) and abs(float(row["C"]) / 4.0e8 - 1) <= 0.02
        assert float(row["C_6N"]) == pytest.approx(6 * run.n_params * run.tokens)
        assert 0 < float(row["val_loss"]) < 6 and 0 < float(row["bits_per_byte"]) < 9
        evaluation = json.loads((sweep_dir / "runs" / row["run_id"] / "eval.json").read_text())
        assert evaluation["run_id"] == row["run_id"]  # the trainer computes the same id
        # the config the trainer recorded is the one the sweep resolved, its auto speed settings made concrete
        recorded = config_from_dict(yaml.safe_load((sweep_dir / "runs" / row["run_id"] / "config.yaml").read_text()))
        assert recorded == resolve_auto(run.config, "cpu") and run_id(run.config) == row["run_id"]
    per_position = json.loads((sweep_dir / "per_position.json").read_text())
    assert set(per_position) == {row["run_id"] for row in rows}
    assert all(len(v["per_position_loss"]) == 16 for v in per_position.values())


@pytest.mark.slow
def test_sigterm_to_the_runner_checkpoints_the_run_and_a_rerun_resumes(tmp_path, kjv_cache):
    spec_path = tmp_path / "long.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(kjv_cache, families=["transformer"], sizes=[5_000],
                                                  budgets={"flops": [1.5e9]})))
    sweep_dir = tmp_path / "sweep"
    (run,) = expand(parse_spec(read_yaml(spec_path)))
    args = ["sweep", "run", str(spec_path), "--sweep-dir", str(sweep_dir), "--no-progress"]
    env = subprocess_env(1)
    runner = subprocess.Popen([sys.executable, "-m", "lmu_jax.cli", *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    run_dir = sweep_dir / "runs" / run.run_id
    deadline = time.time() + 300
    while last_step(run_dir) < 10 and runner.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert runner.poll() is None, "the run finished before it could be interrupted"
    runner.send_signal(signal.SIGTERM)
    _, stderr = runner.communicate(timeout=120)
    assert runner.returncode == 130 and "run the same command again to resume" in stderr
    record = json.loads((run_dir / "sweep.json").read_text())
    assert record["state"] == "stopped" and "interrupted" in record["error"]
    assert "SIGTERM: saved a checkpoint" in (run_dir / "train.log").read_text()
    stopped_at = last_step(run_dir)
    assert 10 <= stopped_at < run.steps

    again = cli_subprocess(args, devices=1, timeout=600)
    assert again.returncode == 0, again.stderr
    log = (run_dir / "train.log").read_text()
    assert f"resuming {run_dir} from step" in log and (run_dir / "DONE").exists()
    assert json.loads((run_dir / "sweep.json").read_text())["attempts"] == 2


@pytest.mark.slow
def test_sweep_runs_a_cooldown_branch_after_its_parent_and_collects_it(tmp_path, kjv_cache):
    """A wsd run and its branch at half the horizon through `sweep run`: the branch starts from its
    sibling parent's checkpoint at its own cooldown start and is collected as an (N, D) point of its own."""
    raw = spec_dict(kjv_cache, families=["transformer"], sizes=[5_000], budgets={"flops": [4.0e8]},
                    branches=[0.5, 1])
    raw["base"]["optim"] = {"lr": 3.0e-3, "schedule": "wsd"}
    spec_path = tmp_path / "branches.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    parent, branch = expand(parse_spec(raw))
    sweep_dir = tmp_path / "sweep"
    done = cli_subprocess(["sweep", "run", str(spec_path), "--sweep-dir", str(sweep_dir), "--no-progress"],
                          devices=1, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    start = int(branch.config.train.branch_from.rsplit("/", 1)[1])
    assert (sweep_dir / "runs" / parent.run_id / "checkpoints" / str(start)).is_dir()  # kept for the branch
    log = (sweep_dir / "runs" / branch.run_id / "train.log").read_text()
    assert f"branching from {sweep_dir / 'runs' / parent.run_id} at step {start}" in log
    metrics = [json.loads(line) for line in (sweep_dir / "runs" / branch.run_id / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["kind"] == "train"][0] == start + 1
    assert cli_subprocess(["sweep", "collect", str(spec_path), "--sweep-dir", str(sweep_dir)], devices=1).returncode == 0
    with open(sweep_dir / "results.csv") as f:
        rows = {row["branch_from"]: row for row in csv.DictReader(f)}
    assert rows[""]["budget_kind"] == "flops" and rows[branch.config.train.branch_from]["budget_kind"] == "branch"
    point = rows[branch.config.train.branch_from]
    assert branch.steps == round(parent.steps / 2) and int(point["D"]) == branch.tokens  # prefix + cooldown
    assert float(point["C"]) == pytest.approx(branch.flops)
