"""The loss-spike check (lmu_jax/report/stability.py): the detector on synthetic curves, and
`lmu-jax report` flagging a run whose training loss jumped, on run directories written here in the
trainer's format (nothing is trained).

The committed cpu_scaling_kjv curves spiked to 6-8 nats right after a warmup of a handful of steps;
the curves below have the same shape: a fall from ln 256, a plateau, a one-step jump, a recovery.
"""

import json
import math

import numpy as np
import pytest
import yaml

from lmu_jax.cli import main
from lmu_jax.report.report import build_report
from lmu_jax.report.stability import SPIKE_NATS, loss_spikes

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


def test_a_jump_is_one_spike_with_its_step_and_size():
    steps, loss = curve(spike_at=20, jump=4.0, length=3)
    loss[20] += 1.0  # the second step of the three is the worst
    [spike] = loss_spikes(steps, loss)
    before = loss[:19].min()
    assert spike["step"] == 20 and spike["peak_step"] == 21 and spike["steps"] == 3
    assert spike["before"] == pytest.approx(before)
    assert spike["jump"] == pytest.approx(loss[20] - before) and spike["jump"] > 4.0
    assert spike["loss"] == pytest.approx(loss[20])


def test_two_spikes_and_a_non_finite_loss():
    steps, loss = curve(spike_at=12, jump=2.0)
    loss[40] += 1.5
    loss[50] = np.nan  # a step skipped by train.nonfinite=skip logs its non-finite loss
    spikes = loss_spikes(steps * 5, loss)  # logged every 5 steps: steps are reported as logged
    assert [s["peak_step"] for s in spikes] == [60, 205, 255]
    assert spikes[1]["jump"] == pytest.approx(loss[40] - loss[:40].min())
    assert math.isinf(spikes[2]["jump"])
    assert loss_spikes([], []) == []


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
    write_run(tmp_path, "spiky", *curve(spike_at=9, jump=5.0, seed=2))
    assert main(["report", str(tmp_path), "--bootstrap", "2"]) == 0
    printed = capsys.readouterr().out
    assert "loss spikes (1;" in printed and "spiky step 9 (+" in printed and "steady" not in printed
    markdown = (tmp_path / "report" / "report.md").read_text()
    section = markdown.split("## Training stability")[1].split("\n## ")[0]
    assert "1 of 2 runs" in section and "| spiky | LMU |" in section and "steady" not in section
    assert "| 9 | 9 |" in section  # first and worst step


def test_report_says_when_no_run_spiked(tmp_path, capsys):
    write_run(tmp_path, "steady", *curve(seed=1))
    written = build_report(tmp_path, bootstrap=2)
    assert written["spikes"] == []
    section = written["markdown"].read_text().split("## Training stability")[1].split("\n## ")[0]
    assert "None of the 1 runs has one" in section and "|" not in section
    main(["report", str(tmp_path), "--bootstrap", "2"])
    assert "loss spikes" not in capsys.readouterr().out


def test_the_trainer_logs_a_spike_whatever_log_every_says(tmp_path, kjv_cache):
    """lr 0.3 without clipping or warmup: the tiny model's loss jumps from 5.1 to 6.8 nats at step 3 and
    stays above 6.1 at step 4. With a metrics line only every 100 steps, those two steps (and the last)
    are still logged, so the report's check sees a spike on a thinned curve."""
    from helpers import cli_subprocess, tiny_config, write_config

    cfg = tiny_config(kjv_cache, optim={"lr": 0.3, "warmup_steps": 0, "grad_clip": 0.0},
                      checkpoint={"every": 0}, log={"every": 100, "tensorboard": False, "progress": False})
    done = cli_subprocess(["train", "--config", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir",
                           str(tmp_path / "run")], devices=1)
    assert done.returncode == 0, done.stderr
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if r["kind"] == "train"]
    assert {3, 4} <= set(steps) and steps[-1] == 12 and len(steps) <= 4, steps
    train = [r for r in logged if r["kind"] == "train"]
    (spike,) = loss_spikes(steps, [r["loss"] for r in train], lowest_before=[r.get("lowest_before", math.nan)
                                                                            for r in train])
    assert spike["step"] == 3 and spike["jump"] > 1.0
