"""The trainer with a carry (Transformer-XL memory on ordered streams): per-row resets in the train
step, causality across segments on the trainer's path, FLOPs as computed, the memory evaluation against
one long pass, a stopped and resumed run bitwise equal to an uninterrupted one, training by phases
(train.init_from), and a checkpoint from before the train state always held a carry resuming bitwise.
NaN skipping with a carry: tests/reliability/test_faults_numeric.py."""

import json
import math
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmu_jax.config import OptimConfig, config_from_dict
from lmu_jax.data.pipeline import StreamBatcher, word_count
from lmu_jax.errors import UserError
from lmu_jax.flops import model_flops_per_token
from lmu_jax.models import data_order, feeds_carry, reset_rows
from lmu_jax.models.transformer_xl import TransformerXL, TransformerXLConfig, initial_carry
from lmu_jax.sizing import solve
from lmu_jax.sweep.spec import parse_spec, plan_family
from lmu_jax.train import loop
from lmu_jax.train.checkpoint import Checkpointer, state_hash
from lmu_jax.train.loop import Trainer, _checkpoint_source
from lmu_jax.train.optim import make_optimizer
from lmu_jax.train.step import token_losses, train_step

from helpers import persistent_compile_cache, tiny_config, train_losses

VOCAB, SEG = 31, 6


def tiny_txl(**keys):
    cfg = TransformerXLConfig(**{"d_model": 16, "n_layers": 2, "n_head": 2, "d_inner": 32, "dropout": 0.0,
                                 **keys}).resolved(VOCAB, SEG)
    model = TransformerXL(cfg)
    return cfg, model, nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEG), jnp.int32), {})["params"])


def test_the_train_step_resets_only_the_rows_whose_stream_starts():
    cfg, model, params = tiny_txl(mem_len=2 * SEG)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 2, SEG + 1), 0, VOCAB)
    _, memory = model.apply({"params": params}, tokens[0, :, :-1], initial_carry(cfg, 2))
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), steps=4)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params), "carry": memory}
    step = jax.jit(lambda s, b, starts: train_step(s, b, starts, apply_fn=model.apply, optimizer=optimizer,
                                                   microbatches=2, seed=0, skip_nonfinite=False))
    new, _ = step(state, tokens[1], jnp.array([True, False]))  # one row per microbatch
    fresh = model.apply({"params": params}, tokens[1, :, :-1], initial_carry(cfg, 2))[1]
    continued = model.apply({"params": params}, tokens[1, :, :-1], memory)[1]
    np.testing.assert_allclose(new["carry"]["mems"][0], fresh["mems"][0], rtol=1e-5, atol=1e-7)  # reset, then this segment
    np.testing.assert_allclose(new["carry"]["mems"][1], continued["mems"][1], rtol=1e-5, atol=1e-7)  # memory carried on
    assert int(new["carry"]["valid"][0, 0]) == SEG and int(new["carry"]["valid"][1, 0]) == 2 * SEG


def test_causal_across_segments_on_the_trainers_path():
    """Ordered streams + the step's losses with the carry (reset where streams start): the loss of
    a target depends on the earlier segments of its stream, never on later tokens."""
    cfg, model, params = tiny_txl(mem_len=2 * SEG)
    text = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (4 * 3 * SEG + 1,), 0, VOCAB))

    def stream_0_losses(tokens):  # 4 streams of 3 segments; stream 0 is tokens[:3 * SEG + 1], read by row 0
        batcher, carry, out = StreamBatcher(tokens, SEG, 4), initial_carry(cfg, 4), []
        for step in range(3):
            carry = reset_rows(carry, jnp.asarray(batcher.starts(step)))
            loss, carry = token_losses(model.apply, params, jnp.asarray(batcher.local_batch(step, 0, 1)), carry,
                                       train=False)
            out.append(np.asarray(loss[0]))
        return np.concatenate(out)  # loss i predicts tokens[i + 1] from tokens[:i + 1]

    before = stream_0_losses(text)
    t = SEG + 2  # segment 1, position 2
    later = text.copy()
    later[t + 1:] = (later[t + 1:] + 7) % VOCAB
    after = stream_0_losses(later)
    np.testing.assert_array_equal(after[:t], before[:t])
    assert np.abs(after[t:] - before[t:]).max() > 1e-4
    earlier = text.copy()
    earlier[1] = (earlier[1] + 3) % VOCAB  # in segment 0: seen by segment 1 through the memory only
    assert np.abs(stream_0_losses(earlier)[SEG:2 * SEG] - before[SEG:2 * SEG]).max() > 1e-5


def test_flops_count_what_each_data_order_computes():
    """Carried: every segment computes mem_len memory rows; shuffled (stateless): none. The trainer, the
    `flops` table and sweep plans use the same count."""
    cfg = solve("transformer_xl", 200_000, seq_len=128).resolved(258, 128)
    carried, stateless = (model_flops_per_token(cfg, 128, feeds_carry=c) for c in (True, False))
    assert 1.3 < carried / stateless < 1.45, carried / stateless  # what the stateless trainer was charged
    assert data_order(cfg, "auto") == "streams" and feeds_carry(cfg, "auto") and not feeds_carry(cfg, "shuffled")
    for order, expected in (("streams", carried), ("shuffled", stateless)):
        spec = parse_spec({"families": ["transformer_xl"], "sizes": [200_000], "budgets": {"flops": [1e12]},
                           "base": {"data": {"seq_len": 128, "order": order}}})
        (run,) = plan_family(spec, "transformer_xl")
        assert run.flops_per_token == pytest.approx(expected)


def test_memory_evaluation_equals_one_long_pass(tmp_path, kjv_cache):
    """With an evaluation memory as long as each stream, the segmented, memory-carrying evaluation of
    the split = one pass over each whole stream with the empty carry (same_length off); every target once."""
    streams, per_stream, seg_len = 8, 24, 5  # 5 segments per stream, the last one partial
    raw = tiny_config(kjv_cache, eval={"streams": streams, "seg_len": seg_len, "max_tokens": streams * per_stream,
                                       "word_level": True})
    raw["model"] = {"family": "transformer_xl", "d_model": 16, "n_layers": 2, "n_head": 2, "dropout": 0.0,
                    "eval_mem_len": per_stream}
    trainer = Trainer(config_from_dict(raw), tmp_path / "run")
    params = trainer.program.init_state()["params"]
    result = trainer.evaluator.split(params)
    assert result["protocol"] == "memory" and result["targets"] == streams * per_stream
    assert (result["memory_length"], result["clamp_len"], result["same_length"]) == (per_stream, 0, False)
    tokens = np.asarray(trainer.cache.tokens("validation")[:streams * per_stream + 1])
    rows = np.stack([tokens[b * per_stream:(b + 1) * per_stream + 1] for b in range(streams)])
    one_pass, _ = token_losses(trainer.program.model.apply, jax.device_get(params), jnp.asarray(rows), {}, train=False)
    assert result["loss"] == pytest.approx(float(np.mean(np.asarray(one_pass, np.float64))), rel=2e-6)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-9)  # bytes = tokens
    words = word_count(bytes(tokens[1:].astype(np.uint8)))  # KJV bytes, no document separator this early
    assert result["words"] == words and 20 < words < 60
    assert result["word_perplexity"] == pytest.approx(math.exp(result["loss"] * result["targets"] / words))


@pytest.fixture(scope="module")
def phase1(tmp_path_factory, kjv_cache, compile_cache):
    """SCH-TXL phase 1 (skips with their memory ages and cross-head permutations on every step), on ordered
    streams, 8 steps, checkpoints at 4 and 8: (raw config, its trainer after training)."""
    raw = tiny_config(kjv_cache, train={"steps": 8}, checkpoint={"every": 4, "keep": 2})
    raw["model"] = {"family": "sch_txl", "d_model": 16, "n_layers": 3, "n_head": 2, "d_inner": 32, "dropout": 0.1,
                    "skip_prob_scale": 1.0, "ch_prob": 0.5}
    with persistent_compile_cache(compile_cache):  # the trainers of the tests below compile from it
        trainer = Trainer(config_from_dict(raw), tmp_path_factory.mktemp("phase1") / "run")
        assert trainer.program.feeds_carry and set(trainer.program.abstract_state["carry"]) == {"mems", "valid", "age"}
        trainer.train()
        yield raw, trainer


def test_a_carry_resumes_bitwise(phase1, tmp_path, monkeypatch):
    """Stopped (SIGTERM's in-process stand-in) after step 3 and resumed: bitwise the uninterrupted run, the
    memory and its ages restored from step 3's checkpoint."""
    raw, straight = phase1
    monkeypatch.setattr(loop.Preemption, "__call__", lambda self, step: step == 3)
    assert Trainer(config_from_dict(raw), tmp_path / "run").train()["status"] == "preempted"
    monkeypatch.undo()
    resumed = Trainer(config_from_dict(raw), tmp_path / "run")
    ckpt = Checkpointer(resumed.run.checkpoints.absolute(), resumed.cfg.checkpoint)
    state, meta = ckpt.restore_latest(resumed.program.abstract_state)
    ckpt.close()
    assert meta["step"] == 3 and np.asarray(state["carry"]["valid"]).max() > 0  # step 3's memory, not a fresh one
    assert resumed.train()["status"] == "done"
    assert train_losses(tmp_path / "run") == train_losses(straight.run.path)
    for a, b in zip(jax.tree.leaves(resumed.final_state), jax.tree.leaves(straight.final_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_phase_two_starts_from_phase_one(phase1, tmp_path):
    """SCH-TXL by phases: phase 2 (no skips) starts from phase 1's parameters (its newest checkpoint, or
    the one named), with its own fresh optimizer, step and memory."""
    raw, phase1 = phase1
    source = phase1.run.path

    def phase2(init_from, run_dir, **model):
        return Trainer(config_from_dict({**raw, "model": {**raw["model"], "skip_prob_scale": 0.0, **model},
                                         "train": {**raw["train"], "init_from": str(init_from)}}), run_dir)

    with pytest.raises(UserError, match="train.init_from"):  # through train(): refused before anything compiles
        phase2(tmp_path / "nowhere", tmp_path / "bad").train()
    with pytest.raises(UserError, match="parameter shapes"):
        phase2(source, tmp_path / "other", d_model=32).train()
    assert not (tmp_path / "bad").exists() and not (tmp_path / "other").exists()
    assert _checkpoint_source(str(source / "checkpoints" / "4")) == (source, 4)
    latest = phase2(source, tmp_path / "phase2")
    start = latest.fresh_state()
    assert int(start["step"]) == 0 and "age" not in start["carry"]  # phase 2's own fresh state
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(start["opt_state"]) if np.ndim(x))
    for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(phase1.final_state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_written_without_a_carry_resumes_bitwise(tmp_path, kjv_cache):
    """A stateless family's checkpoint in the layout from before every train state held a carry
    ({"step", "params", "opt_state"}), written with orbax as lmu_jax/train/checkpoint.py wrote it, restores
    with the empty carry, and the run resumed from it is bitwise the uninterrupted one."""
    cfg = config_from_dict(tiny_config(kjv_cache, train={"steps": 8}))
    straight = Trainer(cfg, tmp_path / "straight")
    straight.train()
    ckpt = Checkpointer(straight.run.checkpoints.absolute(), cfg.checkpoint, read_only=True)
    state, meta = ckpt.restore(4, straight.program.abstract_state)
    ckpt.close()
    assert state["carry"] == {}
    old = {key: value for key, value in state.items() if key != "carry"}
    assert state_hash(old) == meta["state_hash"]  # the empty carry has no leaves to hash
    run = tmp_path / "old_layout"
    shutil.copytree(straight.run.path, run, ignore=shutil.ignore_patterns("checkpoints", "DONE", "eval.json"))
    manager = ocp.CheckpointManager(run / "checkpoints", item_names=("state", "meta"))
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(old), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    resumed = Trainer(cfg, run)
    assert resumed.train()["status"] == "done" and resumed.final_state["carry"] == {}
    assert train_losses(run) == train_losses(straight.run.path)
    for a, b in zip(jax.tree.leaves(resumed.final_state), jax.tree.leaves(straight.final_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    evaluation = lambda path: json.loads((path / "eval.json").read_text())["loss"]  # noqa: E731
    assert evaluation(run) == evaluation(straight.run.path)
