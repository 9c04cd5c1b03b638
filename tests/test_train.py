"""The one trainer: learning on real text, shardings, resume, multi-process, determinism."""

import json
import math
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lmu_jax.config import config_from_dict
from lmu_jax.data.pipeline import unigram_entropy
from lmu_jax.train.checkpoint import Checkpointer
from lmu_jax.train.loop import Trainer

from helpers import cli_subprocess, subprocess_env, tiny_config, train_losses, write_config


def make_cfg(cache, **sections):
    return config_from_dict(tiny_config(cache, **sections))


def test_tiny_transformer_learns_kjv(tmp_path, kjv_cache):
    cfg = make_cfg(kjv_cache, model={"d_model": 64, "n_layers": 2, "n_heads": 4},
                   data={"seq_len": 64}, train={"steps": 150, "batch_size": 16, "eval_every": 75},
                   optim={"lr": 5e-3, "warmup_steps": 10}, checkpoint={"every": 50})
    trainer = Trainer(cfg, tmp_path / "run")
    result = trainer.train()
    run = tmp_path / "run"
    assert (run / "DONE").exists() and (run / "config.yaml").exists()
    evaluation = json.loads((run / "eval.json").read_text())
    assert len(evaluation["per_position_loss"]) == 64
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 150
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 151))
    for key in ("loss", "lr", "grad_norm", "tokens", "flops_model", "flops_6n", "step_time", "tokens_per_s", "mfu"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert train[0]["lr"] > 0
    unigram_nats = unigram_entropy(trainer.cache.tokens("train"), trainer.cache.vocab_size) * math.log(2)
    # the unigram entropy of KJV bytes is ~3.0 nats; a tiny model must be well below it
    assert result["loss"] < unigram_nats - 0.6, (result["loss"], unigram_nats)
    assert 0 < result["bits_per_byte"] < unigram_nats / math.log(2)
    # rerunning a finished run leaves it alone
    assert Trainer(cfg, run).train() == {"status": "done-before"}


SPECS = {  # mesh -> expected spec of (mlp up kernel [embed, mlp], embedding [vocab, embed])
    (8, 1, 1): ((None, None), (None, None)),
    (4, 2, 1): (("fsdp", None), (None, "fsdp")),
    (2, 2, 2): (("fsdp", "tensor"), ("tensor", "fsdp")),
}


def test_shardings_follow_rules_and_match_one_device(tmp_path, kjv_cache):
    base = dict(model={"d_model": 32, "n_heads": 2}, train={"steps": 3, "batch_size": 8},
                checkpoint={"every": 0})
    single = Trainer(make_cfg(kjv_cache, mesh={"data": 1}, **base), tmp_path / "one", devices=jax.devices()[:1])
    single.train()
    reference = [loss for _, loss in train_losses(tmp_path / "one")]
    for mesh, (mlp_spec, embed_spec) in SPECS.items():
        cfg = make_cfg(kjv_cache, mesh=dict(zip(("data", "fsdp", "tensor"), mesh)), **base)
        trainer = Trainer(cfg, tmp_path / f"mesh{mesh}")
        params = trainer.program.state_shardings["params"]
        assert tuple(params["block_0"]["mlp"]["up"]["Dense_0"]["kernel"].spec) == mlp_spec
        assert tuple(params["embed"]["embedding"].spec) == embed_spec
        assert tuple(trainer.program.batch_sharding.spec) == (("data", "fsdp"), None)
        # Adam moments are sharded like their parameters, not replicated
        adam = trainer.program.state_shardings["opt_state"][1][0]
        assert adam.mu["block_0"]["mlp"]["up"]["Dense_0"]["kernel"].spec == params["block_0"]["mlp"]["up"]["Dense_0"]["kernel"].spec
        trainer.train()
        losses = [loss for _, loss in train_losses(tmp_path / f"mesh{mesh}")]
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=str(mesh))
        final = trainer.final_state["params"]["block_0"]["mlp"]["up"]["Dense_0"]["kernel"]
        assert tuple(final.sharding.spec) == mlp_spec


def test_checkpoint_from_one_mesh_restores_on_another(tmp_path, kjv_cache):
    first = Trainer(make_cfg(kjv_cache, mesh={"data": 4, "fsdp": 2}, train={"steps": 4}), tmp_path / "run")
    first.train()
    second = Trainer(make_cfg(kjv_cache, mesh={"data": 8, "fsdp": 1}, train={"steps": 4}), tmp_path / "run")
    ckpt = Checkpointer(second.run.checkpoints.absolute(), second.cfg.checkpoint)
    state, meta = ckpt.restore_latest(second.program.abstract_state)
    ckpt.close()
    assert meta["step"] == 4 and int(state["step"]) == 4
    for a, b in zip(jax.tree.leaves(first.final_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = state["params"]["block_0"]["mlp"]["up"]["Dense_0"]["kernel"]
    assert leaf.sharding.mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}


def test_same_seed_gives_bitwise_identical_losses(tmp_path, kjv_cache):
    cfg = make_cfg(kjv_cache, train={"steps": 6})
    Trainer(cfg, tmp_path / "a").train()
    Trainer(cfg, tmp_path / "b").train()
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    other = make_cfg(kjv_cache, train={"steps": 6, "seed": 1})
    Trainer(other, tmp_path / "c").train()
    assert train_losses(tmp_path / "c") != train_losses(tmp_path / "a")


def _final_params(run_dir, cfg):
    trainer = Trainer(cfg, run_dir)
    ckpt = Checkpointer(trainer.run.checkpoints.absolute(), cfg.checkpoint)
    state, _ = ckpt.restore_latest(trainer.program.abstract_state)
    ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _wait_for_checkpoint(run_dir, proc, minimum_step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()] \
            if (run_dir / "checkpoints").exists() else []
        if steps and max(steps) >= minimum_step:
            return max(steps)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise TimeoutError("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, kjv_cache):
    raw = tiny_config(kjv_cache, train={"steps": 40}, checkpoint={"every": 5, "keep": 3})
    config = write_config(tmp_path / "c.yaml", raw)
    ok = cli_subprocess(["train", "--config", str(config), "--run-dir", str(tmp_path / "straight")])
    assert ok.returncode == 0, ok.stderr
    env_cmd = [sys.executable, "-m", "lmu_jax.cli", "train", "--config", str(config), "--run-dir",
               str(tmp_path / "killed")]
    env = subprocess_env()
    proc = subprocess.Popen(env_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(tmp_path / "killed", proc, 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "DONE").exists()
    resumed = cli_subprocess(["train", "--config", str(config), "--run-dir", str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "straight")
    cfg = config_from_dict(raw)
    for a, b in zip(_final_params(tmp_path / "straight", cfg), _final_params(tmp_path / "killed", cfg)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_before_the_first_step_ends_the_process_at_once(tmp_path, kjv_cache):
    """Until the first step there is nothing to save: a SIGTERM keeps its default action and ends the
    process at once, even inside a long call (here a restore that would take two minutes)."""
    config = write_config(tmp_path / "c.yaml", tiny_config(kjv_cache))
    marker = tmp_path / "restoring"
    script = ("import sys, time\n"
              "from lmu_jax.cli import main\n"
              "from lmu_jax.train.checkpoint import Checkpointer\n"
              "def slow_restore(*args, **kwargs):\n"
              f"    open({str(marker)!r}, 'w').close()\n"
              "    time.sleep(120)\n"
              "Checkpointer.restore_latest = slow_restore\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "train", "--config", str(config), "--run-dir",
                             str(tmp_path / "run")], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not marker.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGTERM
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, kjv_cache):
    config = write_config(tmp_path / "c.yaml", tiny_config(kjv_cache, train={"steps": 400},
                                                           checkpoint={"every": 0}))
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "lmu_jax.cli", "train", "--config", str(config), "--run-dir",
                             str(tmp_path / "run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in out
    steps = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 400

