"""CLI: `lmu-jax bench [--quick] [--families a,b] [--out DIR]`, the performance benchmark.

The measuring code lives in ``benchmarks/suite.py`` (ceiling, train steps through the Trainer, the whole
loop, sequence-length scaling, sharding overhead) and ``benchmarks/lmu_memory.py`` (the LMU memory
kernels); this module parses and checks the arguments and writes the results.
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
    p.add_argument("--no-lmu-memory", action="store_true", help="skip the LMU memory-kernel grid")
    p.set_defaults(func=cmd_bench)


def parse_families(text: str) -> tuple[str, ...]:
    from benchmarks.suite import FAMILIES

    families = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in families if name not in FAMILIES]
    if not families or unknown:
        raise bad_value("--families", text, f"a comma-separated list of {', '.join(FAMILIES)}")
    return families


def cmd_bench(args) -> int:
    families = parse_families(args.families)  # before anything slow starts
    from benchmarks import suite

    results = suite.run(args.quick, families, lmu_memory_grid=not args.no_lmu_memory)
    for path in suite.write_results(results, args.out):  # the LMU kernel table is a section of them
        print(f"wrote {path}")
    return 0
