"""`lmu-jax demo --quick`: the main job end to end, small (9 tiny runs, collect, fits, figures, report)."""

import csv
import json
import math
from pathlib import Path

import pytest

from helpers import cli_subprocess

from lmu_jax.sweep.demo import DEMO, FAMILIES, demo_spec
from lmu_jax.sweep.spec import expand, parse_spec


def test_demo_spec_is_three_families_by_three_sizes_at_matched_flops():
    spec = parse_spec(demo_spec("kjv"))
    runs = expand(spec)
    assert [r.family for r in runs] == [f for f in FAMILIES for _ in range(3)]
    assert sorted({r.size for r in runs}) == DEMO["sizes"]
    flops = [r.flops for r in runs]
    assert max(flops) / min(flops) - 1 <= 0.02
    assert all(r.config.data.tokenizer == "byte" and r.config.data.corpus == "kjv" for r in runs)


@pytest.mark.slow
def test_quick_demo_end_to_end_then_resumes(tmp_path, kjv_cache):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--out", str(out), "--cache-dir", str(kjv_cache)]
    done = cli_subprocess(args, devices=1, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report_line = [line for line in done.stdout.splitlines() if line.startswith("report: ")]
    assert report_line and Path(report_line[0].split(": ", 1)[1]).name == "report.html"
    assert "run 9/9" in done.stderr  # the progress display names which run of how many

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["family"] for r in rows} == set(FAMILIES)
    # every family learned through `lmu-jax train` on kjv: its validation loss fell well below where
    # it started (uniform over 258 byte ids, ln 258 = 5.55 nats)
    for row in rows:
        assert float(row["val_loss"]) < math.log(258) - 1.0, row
    report = out / "report"
    for stem in ("loss_vs_tokens", "loss_vs_flops", "loss_vs_params", "per_position"):
        assert (report / f"{stem}.png").stat().st_size > 10_000 and (report / f"{stem}.svg").stat().st_size > 10_000
        svg = (report / f"{stem}.svg").read_text()
        assert all(name in svg for name in ("Transformer", "LSTM", "LMU")), stem
    markdown = (report / "report.md").read_text()
    assert "Loss at equal FLOPs" in markdown and "Data efficiency" in markdown
    assert len(json.loads((out / "per_position.json").read_text())) == 9

    again = cli_subprocess(args + ["--no-progress"], devices=1, timeout=300)
    assert again.returncode == 0 and again.stderr.count("done before; skipped") == 9
