"""The loss-spike check (lmu_jax/report/stability.py): the detector on synthetic curves, and
`lmu-jax report` flagging a run whose training loss jumped, on run directories written here in the
trainer's format (nothing is trained).

The committed cpu_scaling_kjv curves spiked to 6-8 nats right after a warmup of a handful of steps;
the curves below have the same shape: a fall from ln 256, a plateau, a jump, a recovery. A one-step
jump that other runs reading the same batches share is a hard batch (the stdlib study's), not a spike.
"""

import json
import math

import numpy as np
import pytest
import yaml

from lmu_jax.cli import main
from lmu_jax.report.report import build_report
from lmu_jax.report.stability import LEVEL_WINDOW, SPIKE_NATS, flagged, loss_spikes, run_spikes

SEQ_LEN, BATCH, STEPS = 16, 8, 60


def curve(spike_at=None, jump=0.0, length=1, seed=0):
    """A training curve: from ln 256 down to ~2.3 over 15 steps, then slowly lower, with ±0.05 nats of
    minibatch noise; ``jump`` nats added at steps spike_at .. spike_at + length - 1 (1-based)."""
    steps = np.arange(1, STEPS + 1)
    loss = 2.0 + (math.log(256) - 2.3) * np.exp(-(steps - 1) / 5.0) + 0.3 * np.exp(-steps / 40.0)
    loss = loss + np.random.default_rng(seed).uniform(-0.05, 0.05, STEPS)
    if spike_at is not None:
        loss[spike_at - 1:spike_at - 1 + length] += jump
    return steps, loss


def test_a_smooth_curve_has_no_spike():
    steps, loss = curve()
    assert loss[0] > 5.0 and loss[-1] < 2.4  # the warmup's fall is no spike
    assert loss_spikes(steps, loss) == []
    assert loss_spikes(*curve(spike_at=30, jump=0.8 * SPIKE_NATS)) == []  # under the threshold


def test_a_lasting_jump_is_one_instability_with_its_step_and_size():
    steps, loss = curve(spike_at=30, jump=4.0, length=3)
    loss[30] += 1.0  # the second step of the three is the worst
    [spike] = loss_spikes(steps, loss)
    level = np.median(loss[30 - LEVEL_WINDOW:30])  # the previous 20 steps, the spike's first step among them
    assert spike["step"] == 30 and spike["peak_step"] == 31 and spike["steps"] == 3 and spike["lasting"]
    assert spike["level"] == pytest.approx(level)
    assert spike["jump"] == pytest.approx(loss[30] - level) and spike["jump"] > 4.0
    assert spike["loss"] == pytest.approx(loss[30])


def test_one_step_jumps_a_thinned_log_and_a_non_finite_loss():
    steps, loss = curve(spike_at=12, jump=2.0)
    loss[40] += 1.5
    loss[50] = np.nan  # a step skipped by train.nonfinite=skip logs its non-finite loss
    spikes = loss_spikes(steps * 5, loss)  # logged every 5 steps: steps are reported as logged
    assert [(s["peak_step"], s["steps"], s["lasting"]) for s in spikes] == [(60, 1, False), (205, 1, False),
                                                                            (255, 1, True)]
    assert spikes[1]["jump"] == pytest.approx(loss[40] - np.median(loss[40 - LEVEL_WINDOW:40]))
    assert math.isinf(spikes[2]["jump"])
    # the trainer's levels, where it logged them, are the ones a step is measured against
    levels = loss - 0.5
    levels[19] = loss[19] - 1.5
    assert [(s["peak_step"], s["jump"]) for s in loss_spikes(steps, loss, levels)][0] == (20, pytest.approx(1.5))
    assert loss_spikes([], []) == []


def test_a_one_step_jump_shared_by_runs_of_one_data_order_is_a_hard_batch():
    class Run:
        family, N, budget_key = "lmu", 20_000, "flops=1e+12"

        def __init__(self, run_id, seed, spike_at, length=1):
            self.row = {"run_id": run_id, "seed": seed, "seq_len": SEQ_LEN, "batch_size": BATCH}
            self.steps, self.train_loss = curve(spike_at=spike_at, jump=2.0, length=length, seed=len(run_id))
            self.levels = None

    runs = [Run("a", 0, 40), Run("b", 0, 40), Run("c", 1, 40), Run("d", 0, 45, length=4)]
    spikes = {s["run_id"]: s for s in run_spikes(runs)}
    assert spikes["a"]["shared"] == spikes["b"]["shared"] == 1 and spikes["c"]["shared"] == 0
    assert {s["run_id"] for s in flagged(spikes.values())} == {"c", "d"}  # unshared, and lasting


def write_run(sweep, run_id, steps, loss):
    """A finished run directory as the trainer writes it: config.yaml, metrics.jsonl, eval.json, DONE."""
    run_dir = sweep / "runs" / run_id
    run_dir.mkdir(parents=True)
    n, tokens_per_step = 20_000, SEQ_LEN * BATCH
    config = {"model": {"family": "lmu"}, "data": {"seq_len": SEQ_LEN, "corpus": "kjv"},
              "train": {"batch_size": BATCH, "steps": STEPS}, "optim": {"schedule": "cosine"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"kind": "train", "step": int(s), "loss": float(x), "tokens": int(s) * tokens_per_step,
                "flops_model": int(s) * tokens_per_step * 6.0 * n} for s, x in zip(steps, loss)]
    records.append({"kind": "eval", "step": STEPS, "loss": float(loss[-1])})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokens = STEPS * tokens_per_step
    final = float(loss[-1])
    (run_dir / "eval.json").write_text(json.dumps({
        "loss": final, "bits_per_token": final / math.log(2), "bits_per_byte": final / math.log(2),
        "per_position_loss": [final] * SEQ_LEN, "step": STEPS, "tokens": tokens,
        "params": {"total": n + 1000, "non_embedding": n, "embedding": 1000}, "flops_per_token": 6.0 * n,
        "flops_model": tokens * 6.0 * n, "family": "lmu", "run_id": run_id}))
    (run_dir / "DONE").write_text("{}")


def test_report_flags_the_spiking_run_only(tmp_path, capsys):
    write_run(tmp_path, "steady", *curve(seed=1))
    write_run(tmp_path, "spiky", *curve(spike_at=9, jump=5.0, length=2, seed=2))
    for run in ("hard1", "hard2"):  # one batch, read by both at step 40, 2 nats harder than the others
        write_run(tmp_path, run, *curve(spike_at=40, jump=2.0, seed=len(run)))
    assert main(["report", str(tmp_path), "--bootstrap", "2"]) == 0
    printed = capsys.readouterr().out
    assert "loss spikes (1:" in printed and "spiky step 9 (+" in printed and "2 steps)" in printed
    assert "steady" not in printed and "hard" not in printed
    markdown = (tmp_path / "report" / "report.md").read_text()
    section = markdown.split("## Training stability")[1].split("\n## ")[0]
    assert "1 of 4 runs" in section and "| spiky | LMU |" in section and "| 9 | 9 |" in section  # first, worst
    assert "| 2 | yes |" in section and "steady" not in section and "| hard" not in section
    assert "Hard batches: 2 one-step excursions in 2 runs" in section and "40 (2 runs)" in section


def test_report_says_when_no_run_spiked(tmp_path, capsys):
    write_run(tmp_path, "steady", *curve(seed=1))
    written = build_report(tmp_path, bootstrap=2)
    assert written["spikes"] == []
    section = written["markdown"].read_text().split("## Training stability")[1].split("\n## ")[0]
    assert "None of the 1 runs has an instability" in section and "|" not in section
    main(["report", str(tmp_path), "--bootstrap", "2"])
    assert "loss spikes" not in capsys.readouterr().out


def test_the_trainer_logs_a_spike_whatever_log_every_says(tmp_path, kjv_cache):
    """lr 0.3 without clipping or warmup: the tiny model's loss jumps from 5.1 to 6.8 nats at step 3. With a
    metrics line only every 100 steps, that step (and the last) is still logged, with the level it jumped
    from, so the report's check sees the spike on a thinned curve."""
    from helpers import cli_subprocess, tiny_config, write_config

    cfg = tiny_config(kjv_cache, optim={"lr": 0.3, "warmup_steps": 0, "grad_clip": 0.0},
                      checkpoint={"every": 0}, log={"every": 100, "tensorboard": False, "progress": False})
    done = cli_subprocess(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir",
                           str(tmp_path / "run")], devices=1)
    assert done.returncode == 0, done.stderr
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if r["kind"] == "train"]
    assert 3 in steps and steps[-1] == 12 and len(steps) <= 4, steps
    train = [r for r in logged if r["kind"] == "train"]
    spikes = loss_spikes(steps, [r["loss"] for r in train], [r.get("level", math.nan) for r in train])
    assert spikes[0]["step"] == 3 and spikes[0]["jump"] > 1.0 and spikes[0]["level"] == train[0]["level"]
