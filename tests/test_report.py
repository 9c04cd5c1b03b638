"""The sweep report on synthetic runs with known scaling laws: fits, comparisons, figures, md + html.

The run directories are written here in the trainer's format (config.yaml, metrics.jsonl, eval.json,
DONE), from L(N, D) = E + A/N^alpha + B/D^beta with known constants, so the report's fits can be checked
against the truth and nothing has to be trained.
"""

import csv
import itertools
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from helpers import REPO

from lmu_jax.errors import UserError
from lmu_jax.report.report import build_report, data_efficiency_table, equal_flops_table
from lmu_jax.report.runs import load_results
from lmu_jax.sweep.collect import COLUMNS

TRUTH = {  # per family: E, A, alpha, B, beta; the "lmu" reaches a given loss with fewer tokens
    "transformer": (1.0, 20.0, 0.30, 40.0, 0.30),
    "lmu": (1.0, 19.0, 0.30, 33.0, 0.30),
}
SIZES = [20_000, 40_000, 80_000, 160_000]
BUDGETS = [("flops", 1e12), ("flops", 4e12), ("flops", 1.6e13), ("tokens", 4e6)]
SEQ_LEN, BATCH, LOG_POINTS, EVALS = 16, 64, 40, 8


def law(family, n, d):
    e, a, alpha, b, beta = TRUTH[family]
    return e + a / n**alpha + b / d**beta


def write_run(sweep, family, n, kind, budget):
    """One finished run directory in the trainer's format; 6N FLOPs per token."""
    flops_per_token = 6.0 * n
    tokens_per_step = SEQ_LEN * BATCH
    steps = round((budget / flops_per_token if kind == "flops" else budget) / tokens_per_step)
    tokens = steps * tokens_per_step
    run_id = f"{family[:3]}{n}-{kind}{budget:.0e}"
    run_dir = sweep / "runs" / run_id
    run_dir.mkdir(parents=True)
    config = {"model": {"family": family}, "data": {"seq_len": SEQ_LEN, "corpus": "kjv"},
              "train": {"batch_size": BATCH, "steps": steps}, "optim": {"schedule": "cosine"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []  # logged sparsely (like log.every), evaluations evenly
    logged = {int(s) for s in np.geomspace(1, steps, LOG_POINTS).round()}
    evaluated = {round(steps * (i + 1) / EVALS) for i in range(EVALS)}
    for step in sorted(set(logged) | evaluated):
        t = step * tokens_per_step
        lines.append({"kind": "train", "step": step, "loss": law(family, n, t) + 0.01, "tokens": t,
                      "flops_model": t * flops_per_token})
        if step in evaluated:
            lines.append({"kind": "eval", "step": step, "loss": law(family, n, t)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    loss = law(family, n, tokens)
    evaluation = {"loss": loss, "bits_per_token": loss / math.log(2), "bits_per_byte": loss / math.log(2),
                  "per_position_loss": [loss * (1 + 1 / (p + 1)) for p in range(SEQ_LEN)],
                  "step": steps, "tokens": tokens, "params": {"total": n + 1000, "non_embedding": n, "embedding": 1000},
                  "flops_per_token": flops_per_token, "flops_model": tokens * flops_per_token, "family": family,
                  "run_id": run_id}
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    (run_dir / "DONE").write_text("{}")
    return {"run_id": run_id, "family": family, "size": n, "budget_kind": kind, "budget": budget, "N": n,
            "N_total": n + 1000, "steps": steps, "tokens": tokens, "flops": tokens * flops_per_token}


@pytest.fixture(scope="module")
def synthetic_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("synthetic_sweep")
    plan = [write_run(sweep, family, n, kind, budget) for kind, budget in BUDGETS for family in TRUTH for n in SIZES]
    (sweep / "plan.json").write_text(json.dumps({"name": "synthetic", "runs": plan}))
    (sweep / "spec.yaml").write_text(yaml.safe_dump({"name": "synthetic", "families": list(TRUTH),
                                                     "base": {"data": {"corpus": "kjv"}}}))
    return sweep


@pytest.fixture(scope="module")
def report(synthetic_sweep):
    # a small grid of starts (e, a, b, alpha, beta) keeps this quick; the fitter's own tests use the full one
    grid = np.array(list(itertools.product([-1.0, 0.5], [2.0, 5.0], [2.0, 5.0], [0.5], [0.5])))
    return build_report(synthetic_sweep, bootstrap=10, chinchilla_grid=grid)


def test_report_writes_md_html_and_figures(synthetic_sweep, report):
    out = synthetic_sweep / "report"
    for stem in ("loss_vs_tokens", "loss_vs_flops", "loss_vs_params", "per_position"):
        for ext in ("png", "svg"):
            path = out / f"{stem}.{ext}"
            assert path.stat().st_size > 10_000, path
        svg = (out / f"{stem}.svg").read_text()
        for family_label in ("Transformer", "LMU"):  # every figure draws both families (legend text)
            assert family_label in svg, (stem, family_label)
        assert svg.count("<path") > 20
    params_svg = (out / "loss_vs_params.svg").read_text()
    assert "LSTM (Kaplan" in params_svg and "LMU + global attention (paper fit)" in params_svg
    assert "not comparable in level" in params_svg

    markdown = report["markdown"].read_text()
    assert "3 × analytic forward" in markdown  # the FLOP convention is stated
    assert "| L(N) | transformer | 4 |" in markdown and "| L(N, D) | lmu | 16 |" in markdown
    assert "| L(C) frontier, E = 0 | lmu |" in markdown or "| L(C) frontier | lmu |" in markdown
    assert "± " in markdown  # bootstrap standard errors
    assert "runs used" in markdown and "tra20000-tokens4e+06" in markdown  # which points each fit used

    page = report["html"].read_text()
    assert page.startswith("<!doctype html>") and "<style>" in page
    assert "<table>" in page and "<img" in page
    # self-contained apart from the image files next to it
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert not ref.startswith(("http", "/")) and (out / ref).exists(), ref


def test_fits_recover_the_synthetic_laws(report):
    fits = report["fits"]
    assert {e["family"] for e in fits["L(N, D)"]} == {"transformer", "lmu"}
    for entry in fits["L(N, D)"]:
        fit = entry["fit"]
        e, a, alpha, b, beta = TRUTH[entry["family"]]
        assert fit.converged
        assert fit.alpha == pytest.approx(alpha, abs=0.03) and fit.beta == pytest.approx(beta, abs=0.03)
        assert fit.E == pytest.approx(e, rel=0.1)
    # L(N) only at the token budget (a FLOP budget gives an isoFLOP profile): one per family, 4 sizes
    assert [(e["family"], e["scope"], len(e["run_ids"])) for e in fits["L(N)"]] == \
        [("transformer", "tokens=4e+06", 4), ("lmu", "tokens=4e+06", 4)]
    for entry in fits["L(N)"]:  # at fixed D: E_eff = E + B / D^beta, and the N exponent
        e, a, alpha, b, beta = TRUTH[entry["family"]]
        assert entry["fit"].alpha == pytest.approx(alpha, abs=0.01)
        assert entry["fit"].E == pytest.approx(e + b / 4e6**beta, rel=0.01)
    # the frontier: the best run of each FLOP budget plus the token-budget runs that beat cheaper ones
    for entry in fits["L(C)"]:
        assert len(entry["run_ids"]) >= 3 and entry["fit"] is not None


def test_comparisons_equal_flops_and_data_efficiency(synthetic_sweep):
    results, _ = load_results(synthetic_sweep)
    table = equal_flops_table(results)
    best = [row for row in table if row["size"] == "best"]
    assert len(best) == len(BUDGETS)
    for row in best:  # the lmu's law is lower everywhere: it wins at equal FLOPs
        assert row["loss"]["lmu"] < row["loss"]["transformer"]
    efficiency = data_efficiency_table(results)
    lmu_over_transformer = [r for r in efficiency if r["x"] == "lmu" and r["y"] == "transformer"]
    assert len(lmu_over_transformer) == len(SIZES) * len(BUDGETS)
    e, a, alpha, b, beta = TRUTH["lmu"]
    for row in lmu_over_transformer:
        # truth: the lmu reaches the transformer's final loss L_T at D with b / D^beta = L_T - e - a / N^alpha
        d_true = (b / (row["target"] - e - a / row["N_x"] ** alpha)) ** (1 / beta)
        if math.isfinite(row["tokens_x"]):
            assert row["tokens_x"] == pytest.approx(d_true, rel=0.05)
            assert row["ratio"] > 1
        else:  # reached before the lmu's first evaluation
            assert "already below" in row["reason"]
    assert sum(math.isfinite(r["tokens_x"]) for r in lmu_over_transformer) >= len(lmu_over_transformer) // 2


def test_collect_csv_columns(synthetic_sweep):
    load_results(synthetic_sweep)
    with open(synthetic_sweep / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert len(rows) == len(SIZES) * len(BUDGETS) * len(TRUTH)
    assert {r["budget_kind"] for r in rows} == {"flops", "tokens"}
    row = rows[0]
    assert float(row["C"]) == pytest.approx(6.0 * int(row["N"]) * int(row["D"]))
    assert float(row["C_6N"]) == pytest.approx(float(row["C"]))
    per_position = json.loads((synthetic_sweep / "per_position.json").read_text())
    assert len(per_position) == len(rows)
    assert all(len(v["per_position_loss"]) == SEQ_LEN for v in per_position.values())


def test_report_of_empty_or_missing_dir_is_one_line_error(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="no finished runs"):
        build_report(tmp_path)
    done = subprocess.run([sys.executable, "-m", "lmu_jax.cli", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no such directory" in done.stderr
    np.testing.assert_equal(done.stdout, "")


def test_fits_carry_identification_and_unidentified_laws_are_not_drawn(synthetic_sweep, report):
    fits, markdown = report["fits"], report["markdown"].read_text()
    assert "| identified |" in markdown
    for entry in fits["L(N)"]:  # 4 sizes for 3 constants: too few points per constant
        assert not entry["fit"].identified
        assert any("fewer than 3 points per constant" in w for w in entry["fit"].warnings)
    svg = (synthetic_sweep / "report" / "loss_vs_params.svg").read_text()
    assert "not identified, so not drawn" in svg and "L(N), tokens=4e+06:" not in svg
    assert "Not identified, so not drawn as laws" in markdown


def test_report_has_isoflop_and_rollout_sections(synthetic_sweep, report):
    fits, markdown = report["fits"], report["markdown"].read_text()
    assert "## IsoFLOP analysis (Chinchilla Approach 2)" in markdown and "## Held-out prediction (rollout)" in markdown
    assert [e["family"] for e in fits["isoflop"]] == ["transformer", "lmu"]
    for entry in fits["isoflop"]:  # three FLOP budgets of 4 sizes each, the token budget is no profile
        assert len(entry["fit"].budgets) == 3
    assert {(e["family"], e["scope"]) for e in fits["rollout"]} == {
        (f, h) for f in TRUTH for h in ("top-budget", "top-size")}
    for entry in fits["rollout"]:  # exact losses from the law: the predictions are close
        assert entry["fit"] is not None and np.all(np.abs(entry["fit"].error) < 0.05)
    assert (synthetic_sweep / "report" / "isoflop.png").stat().st_size > 10_000


def test_report_of_collected_results_without_run_directories(synthetic_sweep, tmp_path):
    """experiments/results/ keeps results.csv and per_position.json, not the runs: the report still runs."""
    for name in ("results.csv", "per_position.json", "spec.yaml"):
        (tmp_path / name).write_text((synthetic_sweep / name).read_text())
    grid = np.array(list(itertools.product([-1.0, 0.5], [2.0, 5.0], [2.0, 5.0], [0.5], [0.5])))
    written = build_report(tmp_path, bootstrap=4, chinchilla_grid=grid)
    markdown = written["markdown"].read_text()
    assert "without the runs' directories" in markdown and "## Data efficiency" not in markdown
    assert "loss_vs_tokens" not in written["figures"] and not (tmp_path / "report" / "loss_vs_tokens.png").exists()
    assert "per_position" in written["figures"] and "## IsoFLOP analysis" in markdown
    assert (tmp_path / "results.csv").read_text() == (synthetic_sweep / "results.csv").read_text()  # not rewritten


def test_the_lmu_papers_claims_are_checked_and_stated(report):
    """The synthetic LMU has the lower law at every size: claims 1 and 2 hold (one seed: noise unknown);
    the 16-token window is too short for the per-position claim; no LMU + attention: claim 4 not tested."""
    markdown = report["markdown"].read_text()
    section = markdown[markdown.index("## The LMU paper's claims at this scale"):]
    claim1 = section[section.index("### 1."):section.index("### 2.")]
    assert claim1.count("holds (noise unknown: one seed, no floor)") == 3  # the three FLOP budgets
    assert "does not hold" not in claim1
    claim2 = section[section.index("### 2."):section.index("### 3.")]
    assert "holds at every size" in claim2
    assert "Not tested: the LMU or the transformer has no per-position loss over a window longer" in section
    assert "Not tested: the sweep has no LMU + attention runs." in section


def test_per_position_flattening_is_judged_against_the_transformers_gain():
    from types import SimpleNamespace

    from lmu_jax.report.claims import context_gain, flattening, position_rows

    positions = np.arange(256)
    transformer = 2.0 + 1.0 / np.sqrt(positions + 1)  # keeps gaining from context
    lmu = 2.0 + np.where(positions < 100, 1.0 / np.sqrt(positions + 1), 0.1)  # flat after 100 tokens
    assert context_gain(lmu) < 0.5 * context_gain(transformer)
    assert flattening(context_gain(lmu), context_gain(transformer)).startswith("holds")
    assert flattening(context_gain(transformer), context_gain(transformer)).startswith("does not hold")
    harder_tail = positions / 2000  # late positions of the few validation windows hold harder text
    assert flattening(context_gain(lmu + harder_tail), context_gain(transformer + harder_tail)).startswith(
        "is not testable")

    def run(family, per_position, loss):
        return SimpleNamespace(family=family, per_position_loss=per_position, val_loss=loss, N=1000,
                               row={"budget_kind": "flops", "budget": 1e12})

    rows, gains = position_rows([run("lmu", lmu, 2.1), run("transformer", transformer, 2.1),
                                 run("lmu", lmu + 1, 3.1)], ["transformer", "lmu"])
    assert [r[0] for r in rows] == ["Transformer", "LMU"]
    assert gains["lmu"] == pytest.approx(context_gain(lmu))
