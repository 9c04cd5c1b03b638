"""IsoFLOP analysis, identifiability and held-out rollout on tables with known answers.

Synthetic losses come from a Chinchilla law with known constants (C = 6 N D), so the compute-optimal
exponent a = beta / (alpha + beta) is known exactly; the committed CPU study is the case that must be
flagged (its L(N, D) fits run E to zero).
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lmu_jax import cli
from lmu_jax.errors import EXIT_USER_ERROR, UserError
from lmu_jax.report.prediction import prediction_sections
from lmu_jax.report.report import isoflop_rows
from lmu_jax.scaling import fit_chinchilla, fit_isoflop, fit_power_law, rollout
from lmu_jax.scaling.commands import read_table
from lmu_jax.scaling.laws import ChinchillaLaw

LAW = ChinchillaLaw(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
CPU_STUDY = Path(__file__).parents[1] / "experiments" / "results" / "cpu_scaling_kjv" / "results.csv"


@pytest.fixture(autouse=True)
def fit_command_registered(monkeypatch):
    if "lmu_jax.scaling.commands" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "lmu_jax.scaling.commands"])


def isoflop_runs(budgets, ladder=np.geomspace(1 / 8, 8, 7), noise=0.002, seed=0):
    """Runs of each budget at sizes ``ladder`` x the true N_opt, losses with log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n_opt = LAW.compute_optimal(C)[0]
        for n in n_opt * ladder:
            d = C / (6 * n)
            rows.append((n, d, C, LAW.loss(n, d) * np.exp(rng.normal(0, noise))))
    return [np.array(column) for column in zip(*rows)]


def test_isoflop_recovers_the_known_exponents_inside_their_intervals():
    N, D, C, loss = isoflop_runs(np.geomspace(1e18, 1e21, 6))
    fit = fit_isoflop(N, D, C, loss, bootstrap=100)
    assert fit.identified, fit.warnings
    assert all(b.bracketed for b in fit.budgets) and len(fit.budgets) == 6
    lo, hi = fit.ci["a"]
    assert lo <= LAW.a <= hi and hi - lo < 0.1
    lo, hi = fit.ci["b"]
    assert lo <= LAW.b <= hi
    for budget in fit.budgets:  # each optimum within 10 % of the closed form
        assert budget.N_opt == pytest.approx(LAW.compute_optimal(budget.C)[0], rel=0.1)


def test_three_bracketed_budgets_identify_the_exponents_and_two_do_not():
    """A study of 4 budgets over 30x (the CPU study's design) is enough; a line through 2 minima is not."""
    N, D, C, loss = isoflop_runs(np.geomspace(1e18, 3e19, 4))
    fit = fit_isoflop(N, D, C, loss, bootstrap=60)
    assert fit.identified, fit.warnings
    assert fit.ci["a"][0] <= LAW.a <= fit.ci["a"][1]
    N, D, C, loss = isoflop_runs([1e18, 1e19])
    fit = fit_isoflop(N, D, C, loss, bootstrap=20)
    assert not fit.identified
    assert any("cannot show that N_opt(C) is a power law" in w for w in fit.warnings)


def test_a_budget_whose_optimum_is_below_the_ladder_is_flagged_and_left_out():
    N, D, C, loss = isoflop_runs(np.geomspace(1e18, 1e21, 6))
    low = isoflop_runs([3e21], ladder=np.geomspace(2, 32, 5))  # every size above the optimum
    fit = fit_isoflop(*(np.concatenate([a, b]) for a, b in zip((N, D, C, loss), low)), bootstrap=20)
    flagged = [b for b in fit.budgets if not b.bracketed]
    assert len(flagged) == 1 and flagged[0].C == pytest.approx(3e21)
    assert flagged[0].flag.startswith("optimum below the ladder") and "add sizes down to ~" in flagged[0].flag
    without = fit_isoflop(N, D, C, loss, bootstrap=0)
    assert fit.a == pytest.approx(without.a)  # the flagged budget is not in the exponents


def test_the_committed_cpu_study_brackets_no_optimum():
    rows = list(csv.DictReader(open(CPU_STUDY)))
    for family in ("lmu", "transformer"):
        mine = [r for r in rows if r["family"] == family]
        N, D, C, loss = (np.array([float(r[k]) for r in mine]) for k in ("N", "D", "C", "val_loss"))
        fit = fit_isoflop(N, D, C, loss, bootstrap=0)
        assert not fit.identified and np.isnan(fit.a)
        assert all(b.flag.startswith("optimum below the ladder") for b in fit.budgets)


def test_the_committed_cpu_study_l_of_n_d_fits_are_not_identified():
    rows = list(csv.DictReader(open(CPU_STUDY)))
    for family in ("lmu", "lstm"):
        mine = [r for r in rows if r["family"] == family]
        N, D, loss = (np.array([float(r[k]) for r in mine]) for k in ("N", "D", "val_loss"))
        fit = fit_chinchilla(N, D, loss, max_starts=150)
        assert not fit.identified
        assert any("ran to zero" in w for w in fit.warnings)
        assert any("fewer than 3 points per constant" in w for w in fit.warnings)


def test_well_posed_synthetic_fits_are_identified():
    rng = np.random.default_rng(0)
    N, D = (grid.ravel() for grid in np.meshgrid(np.geomspace(1e6, 1e8, 5), np.geomspace(1e8, 1e10, 5)))
    loss = LAW.loss(N, D) * np.exp(rng.normal(0, 0.005, N.size))
    fit = fit_chinchilla(N, D, loss, bootstrap=30, max_starts=100)
    assert fit.identified and fit.warnings == []
    x = np.geomspace(1e4, 1e6, 12)
    power = fit_power_law(x, (1.5 + 30 * x**-0.3) * np.exp(rng.normal(0, 0.003, x.size)), bootstrap=30)
    assert power.identified, power.warnings


def test_the_chinchilla_replication_is_identified():
    """Epoch's 240 runs: B's standard error is 60 % of B, but the law is fixed where the data are."""
    table = read_table(str(Path(__file__).parent / "data" / "chinchilla_epoch_fig4.csv"))
    keep = np.argsort(table["loss"], kind="stable")[:-5]  # Epoch dropped the 5 highest losses
    fit = fit_chinchilla(table["N"][keep], table["D"][keep], table["loss"][keep], bootstrap=20, max_starts=200)
    assert fit.identified, fit.warnings


def test_rollout_predictions_fall_inside_their_intervals_at_about_the_nominal_rate():
    """4 noisy replicates at each of 8 sizes; the 4 runs of the largest size are predicted, 4 times over."""
    sigma, inside, widths = 0.01, [], []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        N = np.repeat(np.geomspace(1e5, 1e7, 8), 4)
        loss = (1.5 + 60 * N**-0.3) * np.exp(rng.normal(0, sigma, N.size))
        result = rollout("kaplan-n", N, N, N, loss, holdout="top-size", bootstrap=30, seed=seed)
        assert result.measured.size == 4 and result.fit.n_points == 28
        inside += list(result.inside)
        widths += list(np.log(result.hi / result.lo))
    assert np.mean(inside) >= 0.8  # nominal 0.95 over 16 predictions
    assert np.mean(widths) < 8 * sigma  # and not by being vacuously wide


def test_rollout_refuses_a_holdout_that_leaves_too_few_points():
    N, D, C, loss = isoflop_runs([1e18], ladder=np.geomspace(1 / 4, 4, 5))
    with pytest.raises(UserError, match="at least 2 distinct budgets"):
        rollout("chinchilla", N, D, C, loss, holdout="top-budget")
    with pytest.raises(UserError, match="leaves 4 point"):
        rollout("chinchilla", N, D, C, loss, holdout="top-size")


def write_table(path, N, D, C, loss):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run_id", "family", "N", "D", "C", "val_loss", "seed"])
        for i, row in enumerate(zip(N, D, C, loss)):
            writer.writerow([f"r{i}", "lmu", *row, 0])
    return str(path)


def test_runs_far_from_the_minimum_are_outside_the_parabola_and_the_interval_stays_local():
    """A profile is a parabola only near its minimum: two runs 16x and 32x above the optimum, where the
    loss climbs far faster than the parabola through the near runs, are kept but not fitted, and the
    optimum and its interval are those of the near runs."""
    C = np.array([1e19])
    N, D, Cs, loss = isoflop_runs(C, ladder=np.geomspace(1 / 4, 4, 5), noise=0.003, seed=3)
    near = fit_isoflop(N, D, Cs, loss, bootstrap=200)
    n_opt = LAW.compute_optimal(C[0])[0]
    far_N = n_opt * np.array([16.0, 32.0])
    far_loss = LAW.loss(far_N, C[0] / (6 * far_N)) + np.array([0.4, 0.9])
    both = fit_isoflop(np.r_[N, far_N], np.r_[D, C[0] / (6 * far_N)], np.r_[Cs, C[0], C[0]], np.r_[loss, far_loss],
                       bootstrap=200)
    (budget,) = both.budgets
    assert budget.fitted.tolist() == [True] * 5 + [False] * 2
    assert budget.N_opt == pytest.approx(near.budgets[0].N_opt, rel=1e-9)
    lo, hi = budget.ci["N_opt"]
    assert lo <= n_opt <= hi and hi / lo < 3  # a residual bootstrap: the sizes stay, the scatter is redrawn


def test_fit_isoflop_command_prints_optima_exponents_and_writes_json(tmp_path, capsys):
    table = write_table(tmp_path / "iso.csv", *isoflop_runs(np.geomspace(1e18, 1e21, 6)))
    out = tmp_path / "iso.json"
    assert cli.main(["fit", table, "--law", "isoflop", "--bootstrap", "20", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "N_opt = " in printed and "(Chinchilla: a ≈ 0.50)" in printed and "identified" in printed
    result = json.loads(out.read_text())[0]
    assert result["isoflop"]["a"] == pytest.approx(LAW.a, abs=0.03)
    assert len(result["isoflop"]["budgets"]) == 6


def test_a_prediction_for_an_unrun_budget_holds_the_truth_and_the_cli_writes_it(tmp_path, capsys):
    """The study's pre-registration: fitted on three budgets, predict the fourth (3.2x beyond) before it
    is run. The true N_opt and D_opt (power laws of C) lie inside their intervals; L_opt = K C^-gamma has
    no irreducible loss, so beyond the data it runs low of a law that flattens: here by ~1.5 %."""
    budgets = np.geomspace(1e18, 3.2e19, 4)
    N, D, C, loss = isoflop_runs(budgets[:3], ladder=np.geomspace(1 / 4, 4, 5), noise=0.003)
    fit = fit_isoflop(N, D, C, loss, bootstrap=100)
    assert fit.identified, fit.warnings
    predicted = fit.predict(budgets[3])
    n_true, d_true = LAW.compute_optimal(budgets[3])
    truth = {"N_opt": n_true, "D_opt": d_true, "L_opt": LAW.loss(n_true, d_true)}
    for name in ("N_opt", "D_opt"):
        value, lo, hi = predicted[name]
        assert lo <= truth[name] <= hi and lo < value < hi, (name, value, lo, hi, truth[name])
    value, lo, hi = predicted["L_opt"]
    assert lo < value < hi < truth["L_opt"] and value == pytest.approx(truth["L_opt"], rel=0.03)

    table = write_table(tmp_path / "three.csv", N, D, C, loss)
    out = tmp_path / "prediction.json"
    assert cli.main(["fit", table, "--law", "isoflop", "--bootstrap", "40", "--predict", f"{budgets[3]:g}",
                     "--json", str(out)]) == 0
    assert "prediction at C = 3.2e+19: N_opt = " in capsys.readouterr().out
    written = json.loads(out.read_text())[0]["prediction"]
    assert written["C"] == pytest.approx(budgets[3]) and written["identified"] is True
    assert written["N_opt"]["lo"] < written["N_opt"]["value"] < written["N_opt"]["hi"]
    assert cli.main(["fit", table, "--law", "chinchilla", "--predict", "1e20"]) == EXIT_USER_ERROR
    assert "--predict=1e+20 is invalid" in capsys.readouterr().err

    # the report reads it from the spec's results directory and, once the budget has run, sets that
    # budget's own IsoFLOP minimum beside each prediction
    spec, family = {"results": str(tmp_path)}, json.loads(out.read_text())[0]["family"]
    (section,) = [payload for kind, payload in prediction_sections(spec, [{"family": family, "fit": fit}])
                  if kind == "table"]
    assert [row[5] for row in section[1]] == ["not run yet"] * 3
    run = fit_isoflop(*isoflop_runs(budgets, ladder=np.geomspace(1 / 4, 4, 5), noise=0.0), bootstrap=20)
    (section,) = [payload for kind, payload in prediction_sections(spec, [{"family": family, "fit": run}])
                  if kind == "table"]
    outcome = {row[2]: row for row in section[1]}
    assert outcome["N_opt"][-1] == outcome["D_opt"][-1] == "yes"
    assert float(outcome["N_opt"][5]) == pytest.approx(n_true, rel=0.02)
    # the report's IsoFLOP table: tokens per parameter at each optimum
    header, rows = isoflop_rows({"isoflop": [{"family": family, "fit": fit}]})
    assert [row[header.index("tokens per parameter")] for row in rows] == [
        f"{b.D_opt / b.N_opt:.0f}" for b in fit.budgets] and all(b.bracketed for b in fit.budgets)
    # a labelled refit of the same family is a second set of rows, named by its label
    entries = json.loads(out.read_text())
    out.write_text(json.dumps(entries + [{**entries[0], "label": "refit"}]))
    (section,) = [payload for kind, payload in prediction_sections(spec, [{"family": family, "fit": run}])
                  if kind == "table"]
    assert [row[0] for row in section[1]] == [family] * 3 + [f"{family} (refit)"] * 3
    assert prediction_sections({"results": str(tmp_path / "none")}, []) == []


def test_fit_holdout_command_prints_predictions(tmp_path, capsys):
    rng = np.random.default_rng(1)
    N = np.repeat(np.geomspace(1e5, 1e7, 6), 2)
    loss = (1.5 + 60 * N**-0.3) * np.exp(rng.normal(0, 0.01, N.size))
    table = write_table(tmp_path / "n.csv", N, 20 * N, 120 * N**2, loss)
    assert cli.main(["fit", table, "--law", "chinchilla", "--holdout", "top-size", "--bootstrap", "4",
                     "--starts", "20"]) == 0  # 10 points for 5 constants: fits, and says it is not identified
    printed = capsys.readouterr().out
    assert "held out 2" in printed and "inside their 95 % intervals" in printed and "identified: NO" in printed


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--law", "isoflop"], "sizes per budget=1 is invalid: isoflop needs a FLOP budget with at least 3"),
        (["--law", "chinchilla", "--holdout", "top-size"], "leaves 2 point(s) to fit the 5 constants"),
        (["--law", "chinchilla", "--holdout", "top-flops"], "--holdout='top-flops' is invalid: one of top-budget"),
        (["--law", "isoflop", "--holdout", "top-size"], "works with --law chinchilla"),
        (["--law", "chinchilla", "--holdout", "top-size", "--bootstrap", "0"], "--bootstrap=0 is invalid"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, extra, expected):
    N = np.array([1e6, 2e6, 1e6, 2e6])  # four budgets, one size each
    C = np.array([1e15, 1e16, 1e17, 1e18])
    table = write_table(tmp_path / "one.csv", N, C / (6 * N), C, [3.0, 2.9, 2.8, 2.7])
    assert cli.main(["fit", table, *extra]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
