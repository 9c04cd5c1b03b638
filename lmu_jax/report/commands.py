"""CLI: `lmu-jax report SWEEP_DIR`."""

from __future__ import annotations

from lmu_jax import storage
from lmu_jax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="fits, comparisons and figures of a sweep: report.md + report.html")
    p.add_argument("sweep_dir", help="a sweep directory (runs/sweeps/<name>, runs/demo, ...)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the fits' standard errors")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from lmu_jax.report.report import build_report

    if not storage.path(args.sweep_dir, "SWEEP_DIR").is_dir():
        raise UserError(f"SWEEP_DIR={args.sweep_dir!r} is invalid: no such directory")
    written = build_report(args.sweep_dir, bootstrap=args.bootstrap)
    print(f"report: {written['html']}  (markdown: {written['markdown']})")
    if written["spikes"]:
        from lmu_jax.report.stability import spike_text

        print(f"loss spikes ({len(written['spikes'])}: instabilities and unshared one-step jumps; report section "
              "'Training stability'): " + ", ".join(spike_text(spike) for spike in written["spikes"]))
    return 0
