"""CLI: `lmu-jax train`, `lmu-jax eval`, `lmu-jax flops`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from lmu_jax.errors import UserError


def _add_config_args(parser):
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=256 train.steps=100")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (resumes an existing --run-dir)")
    _add_config_args(p)
    p.add_argument("--run-dir", help="run directory (default: runs/<family>-<run id>)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="evaluate the latest checkpoint of a run directory")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="eval.* settings for this evaluation, e.g. eval.split=test "
                   "eval.seg_len=80 (the run's own are in its config.yaml)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("flops", help="FLOPs and parameter counts of a config (or --list families)")
    _add_config_args(p)
    p.add_argument("--list", action="store_true", help="list the registered families")
    p.set_defaults(func=cmd_flops)


def default_run_dir(cfg) -> Path:
    from lmu_jax.config import run_id

    return Path("runs") / f"{cfg.model.family}-{run_id(cfg)}"


def cmd_train(args) -> int:
    from lmu_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    return run_training(cfg, args.run_dir or default_run_dir(cfg))


def run_training(cfg, run_dir) -> int:
    """Train (or resume) one run in this process; the body of `lmu-jax train`."""
    from lmu_jax import distributed

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    distributed.initialize(cfg.distributed)
    from lmu_jax.train.loop import NonFiniteLoss, Trainer

    trainer = Trainer(cfg, run_dir)
    try:
        result = trainer.train()
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if result["status"] == "done" and distributed.is_main_process():
        print(f"done: {run_dir}  val loss {result['loss']:.4f}  bits/byte {result['bits_per_byte']:.4f}  "
              f"({result['step']} steps, {result['tokens']:,} tokens)")
    return 0


def cmd_eval(args) -> int:
    from lmu_jax import distributed
    from lmu_jax.config import config_from_dict, merge_overrides, read_yaml
    from lmu_jax.errors import bad_value

    from lmu_jax import storage

    config_path = storage.path(args.run_dir, "run_dir") / "config.yaml"
    if not config_path.exists():
        raise UserError(f"run_dir={args.run_dir!r} is invalid: no config.yaml there (not a run directory)")
    for text in args.overrides:
        if not text.startswith("eval."):
            raise bad_value("override", text, "eval.<key>=<value>: the run's other settings are fixed")
    cfg = config_from_dict(merge_overrides(read_yaml(config_path), args.overrides))
    distributed.initialize(cfg.distributed)
    from lmu_jax.train.checkpoint import Checkpointer
    from lmu_jax.train.evaluate import Evaluator
    from lmu_jax.train.loop import open_program
    from lmu_jax.train.rundir import RunDir

    run = RunDir(args.run_dir)
    program, cache = open_program(cfg, run=run)  # the run's program: its checkpoints restore onto it
    evaluator = Evaluator(program, cache)
    ckpt = Checkpointer(run.checkpoints, cfg.checkpoint)
    state, _ = ckpt.restore_latest(program.abstract_state)
    ckpt.close()
    if state is None:
        raise UserError(f"run_dir={args.run_dir!r} is invalid: it has no usable checkpoint")
    result = evaluator.windows(state["params"])
    result.update(split_eval=evaluator.split(state["params"]), step=int(state["step"]))
    if distributed.is_main_process():
        summary = {k: v for k, v in result.items() if k != "per_position_loss"}
        print(json.dumps(summary, indent=1))
    return 0


def flops_table(cfg) -> list[tuple[str, str]]:
    from lmu_jax.flops import kaplan_flops_per_token, model_flops_per_token, param_counts
    from lmu_jax.models import data_order, feeds_carry

    model_cfg = cfg.resolved_model()
    counts = param_counts(model_cfg, cfg.data.seq_len)
    feeds = feeds_carry(model_cfg, cfg.data.order)
    train_flops = model_flops_per_token(model_cfg, cfg.data.seq_len, feeds_carry=feeds)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    return [
        ("family", model_cfg.family),
        ("data order", data_order(model_cfg, cfg.data.order) + (" (state carried)" if feeds else "")),
        ("vocab_size", f"{model_cfg.vocab_size}"),
        ("params (total)", f"{counts['total']:,}"),
        ("params (non-embedding, N)", f"{counts['non_embedding']:,}"),
        ("seq_len", f"{cfg.data.seq_len}"),
        ("training FLOPs/token (3 x analytic forward)", f"{train_flops:.4g}"),
        ("Kaplan 6N FLOPs/token", f"{kaplan_flops_per_token(counts['non_embedding']):.4g}"),
        ("ratio analytic / 6N", f"{train_flops / max(kaplan_flops_per_token(counts['non_embedding']), 1):.3f}"),
        ("tokens (steps x batch x seq_len)", f"{tokens:,}"),
        ("training FLOPs (run)", f"{tokens * train_flops:.4g}"),
    ]


def cmd_flops(args) -> int:
    from lmu_jax.models import FAMILIES

    if args.list:
        for name, family in sorted(FAMILIES.items()):
            print(f"{name:16s} {family.description}")
        return 0
    from lmu_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    rows = flops_table(cfg)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
