"""CLI: `lmu-jax bench [--quick] [--families a,b] [--sections a,b] [--peers [--peers-compile]] [--out DIR]`: the
performance benchmark.

The measuring code lives in ``benchmarks/suite.py`` (ceiling, train steps through the Trainer, the whole
loop, sequence-length scaling, sharding overhead), ``benchmarks/peers.py`` (the PyTorch peers) and
``benchmarks/lmu_memory.py`` (the LMU memory kernels); this module parses and checks the arguments and
writes the results.
"""

from __future__ import annotations

from pathlib import Path

from lmu_jax.errors import bad_value

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure the hardware ceiling, every family's train-step MFU, "
                              "sequence-length scaling, LMU kernels and sharding overhead")
    p.add_argument("--quick", action="store_true", help="tiny grid (~2 minutes on 2 cores): a smoke test")
    p.add_argument("--families", default="transformer,lstm,lmu,lmu_attn",
                   help="comma-separated families to benchmark (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory for <platform>.json and <platform>.md (default: %(default)s)")
    p.add_argument("--sections", default=None,
                   help="comma-separated sections to run besides the ceiling: train, loop, scaling, sharding, "
                   "lmu_memory (default: these, the whole run) and peers; a partial run writes "
                   "<platform>_<sections>.json so it never replaces a whole one")
    p.add_argument("--peers", action="store_true",
                   help="the PyTorch peers of the transformer and the LSTM (the `peers` extra), timed against ours "
                   "at batch 16 x 256 tokens: the same as --sections peers, or added to the --sections given")
    p.add_argument("--peers-compile", action="store_true",
                   help="the peers also run torch.compile'd (its compile took ~2 minutes per model on 2 loaded cores)")
    p.set_defaults(func=cmd_bench)


def parse_names(flag: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``a,b`` -> ('a', 'b'), each one of `allowed` (in the order given); else a UserError naming the flag."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or any(name not in allowed for name in names):
        raise bad_value(flag, text, f"a comma-separated list of {', '.join(allowed)}")
    return names


def cmd_bench(args) -> int:
    from benchmarks import suite

    families = parse_names("--families", args.families, suite.FAMILIES)  # before anything slow starts
    if args.sections is None:
        sections = () if args.peers else suite.SECTIONS
    else:
        sections = parse_names("--sections", args.sections, suite.SECTIONS + suite.OPTIONAL_SECTIONS)
    if args.peers and "peers" not in sections:
        sections += ("peers",)
    if args.peers_compile and "peers" not in sections:
        raise bad_value("--peers-compile", True, "used with --peers or --sections ...,peers")
    results = suite.run(args.quick, families, sections, peers_compile=args.peers_compile)
    for path in suite.write_results(results, args.out):  # the LMU kernel table is a section of them
        print(f"wrote {path}")
    return 0
