"""The `lmu-jax` command line: one argparse tree, each area registers its own subcommands.

Every area module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommand(s) and sets ``func`` (``args -> exit code``). A ``UserError`` anywhere becomes one line on
stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmu_jax.errors import EXIT_USER_ERROR, UserError
from lmu_jax.platforms import leave_out_absent_tpu

COMMAND_MODULES = [
    "lmu_jax.train.commands",  # train, eval, flops
    "lmu_jax.train.compile",  # compile (ahead of time, for a target topology)
    "lmu_jax.data.commands",  # data prepare|tokenizer|info
    "lmu_jax.scaling.commands",  # fit
    "lmu_jax.sweep.commands",  # sweep plan|run|status|collect
    "lmu_jax.report.commands",  # report
    "lmu_jax.sweep.demo",  # demo
    "lmu_jax.bench",  # bench (measuring code in benchmarks/)
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments through UserError (one line, exit 2)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lmu-jax", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    leave_out_absent_tpu()  # before any command module imports JAX
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
