"""``lmu-jax fit`` through ``lmu_jax.cli.main``: the Chinchilla file, a tidy sweep table, bad input."""

import csv
import json

from pathlib import Path

import numpy as np
import pytest

from lmu_jax import cli
from lmu_jax.errors import EXIT_USER_ERROR
from lmu_jax.scaling.laws import ChinchillaLaw

CHINCHILLA_CSV = str(Path(__file__).parent / "data" / "chinchilla_epoch_fig4.csv")


@pytest.fixture(autouse=True)
def fit_command_registered(monkeypatch):
    """The lead's cli.py lists the area modules; make sure ours is among them for these tests."""
    if "lmu_jax.scaling.commands" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "lmu_jax.scaling.commands"])


@pytest.fixture(scope="module")
def sweep_table(tmp_path_factory):
    """A tidy table with two families from known laws (C = 6 N D), exact losses."""
    laws = {
        "lmu": ChinchillaLaw(E=1.6, A=300.0, B=900.0, alpha=0.32, beta=0.30),
        "transformer": ChinchillaLaw(E=1.7, A=400.0, B=1200.0, alpha=0.33, beta=0.29),
    }
    path = tmp_path_factory.mktemp("sweep") / "runs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["family", "N", "D", "C", "val_loss", "seed"])
        for family, law in laws.items():
            for N in np.geomspace(1e7, 1e9, 6):
                for D in N * np.array([2.0, 8.0, 32.0, 128.0]):
                    writer.writerow([family, N, D, 6 * N * D, law.loss(N, D), 0])
    return path, laws


def test_fit_chinchilla_file_reproduces_the_point_fit(tmp_path, capsys):
    out = tmp_path / "fit.json"
    argv = ["fit", CHINCHILLA_CSV, "--law", "chinchilla", "--drop-highest", "5", "--starts", "100"]
    assert cli.main(argv + ["--bootstrap", "20", "--seed", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "240 points" in printed and "5 highest-loss dropped" in printed and "converged" in printed
    [result] = json.loads(out.read_text())
    assert result["points"] == 240 and result["rows"] == 245 and result["converged"]
    assert result["constants"]["E"] == pytest.approx(1.8172, abs=0.005)
    assert result["constants"]["alpha"] == pytest.approx(0.3473, abs=0.005)
    assert result["constants"]["B"] == pytest.approx(2143.9, rel=0.05)
    assert 0.005 < result["stderr"]["alpha"] < 0.03
    assert result["ci"]["beta"][0] < result["constants"]["beta"] < result["ci"]["beta"][1]


def test_fit_each_family_of_a_sweep_table(sweep_table, tmp_path, capsys):
    path, laws = sweep_table
    out = tmp_path / "fit.json"
    assert cli.main(["fit", str(path), "--law", "chinchilla", "--starts", "50", "--json", str(out)]) == 0
    results = {r["family"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"lmu", "transformer"}
    for family, law in laws.items():
        constants = results[family]["constants"]
        assert constants["alpha"] == pytest.approx(law.alpha, rel=1e-4)
        assert constants["B"] == pytest.approx(law.B, rel=1e-3)
        assert results[family]["stderr"]["alpha"] is None  # no bootstrap: null, not NaN
    assert "lmu: chinchilla on 24 points" in capsys.readouterr().out


@pytest.mark.parametrize(
    "law, points, which",
    [
        ("kaplan-n", 6, "lowest loss per distinct N"),
        ("kaplan-d", 24, "lowest loss per distinct D"),
        ("frontier", None, "lower envelope of (C, loss)"),
    ],
)
def test_power_law_fits_use_the_documented_points(sweep_table, tmp_path, law, points, which):
    path, _ = sweep_table
    out = tmp_path / "fit.json"
    assert cli.main(["fit", str(path), "--law", law, "--family", "transformer", "--json", str(out)]) == 0
    [result] = json.loads(out.read_text())
    assert result["family"] == "transformer" and result["points_used"] == which
    assert result["points"] == points if points else 3 <= result["points"] < 24
    assert result["converged"] and set(result["constants"]) == {"E", "A", "alpha"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["fit", "/no/such.csv", "--law", "chinchilla"], "TABLE='/no/such.csv' is invalid"),
        (["fit", CHINCHILLA_CSV, "--law", "hoffmann"], "--law='hoffmann' is invalid: one of chinchilla, kaplan-n"),
        (["fit", CHINCHILLA_CSV, "--law", "kaplan-n", "--family", "gpt"], "--family='gpt' is invalid: one of all"),
        (["fit", CHINCHILLA_CSV, "--law", "chinchilla", "--drop-highest", "241"], "family 'all': points=4"),
        (["fit", CHINCHILLA_CSV, "--law", "chinchilla", "--starts", "0"], "--starts=0 is invalid"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, expected, capsys):
    assert cli.main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_missing_columns_are_named(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("family,params,val_loss\nlmu,1e6,4.0\n")
    assert cli.main(["fit", str(path), "--law", "kaplan-n"]) == EXIT_USER_ERROR
    assert "columns=['family', 'params', 'val_loss'] is invalid: needs val_loss" in capsys.readouterr().err


def test_non_numeric_cell_names_its_line(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("N,D,val_loss\n1e6,1e8,4.0\n2e6,oops,3.9\n")
    assert cli.main(["fit", str(path), "--law", "chinchilla"]) == EXIT_USER_ERROR
    assert "D (line 3)='oops' is invalid" in capsys.readouterr().err
