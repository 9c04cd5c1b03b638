"""A pre-registered prediction against its outcome.

``lmu-jax fit results.csv --law isoflop --predict C --json <results>/prediction.json`` writes each
family's predicted N_opt, D_opt and L_opt at a FLOP budget C that has not been run, with intervals; the
file is committed before budget C is added to the spec, so git history shows that the prediction came
first. A later entry for the same family (a refit with more runs, also committed before C ran) carries a
``label`` that says what changed. Once C has run, the report puts the IsoFLOP minimum measured at C
(that budget's own parabola) beside each prediction and says whether it lies inside the predicted
interval. ``<results>`` is the
spec's ``results`` directory, relative to the directory the report is built from (the repository root).
"""

import json
import math
from pathlib import Path

PREDICTION_FILE = "prediction.json"
QUANTITIES = ("N_opt", "D_opt", "L_opt")


def read_predictions(spec: dict) -> list[dict]:
    """The prediction entries ({family, prediction: {C, N_opt: {value, lo, hi}, ...}}) of the spec's
    results directory, or [] when it has none."""
    path = Path(spec.get("results") or "") / PREDICTION_FILE
    if not spec.get("results") or not path.is_file():
        return []
    return [entry for entry in json.loads(path.read_text()) if entry.get("prediction")]


def _name(entry) -> str:
    return entry["family"] + (f" ({entry['label']})" if entry.get("label") else "")


def _measured(isoflop_entries, family, C):
    """The family's IsoFLOP budget at C (within 1 %: a budget's runs differ in C by the rounding of steps)."""
    for entry in isoflop_entries:
        if entry["family"] == family and entry["fit"] is not None:
            for budget in entry["fit"].budgets:
                if abs(budget.C / C - 1) < 0.01:
                    return budget
    return None


def prediction_rows(predictions, isoflop_entries) -> tuple[list[str], list[list[str]]]:
    header = ["family", "C", "quantity", "predicted", "interval", "measured", "measured interval", "inside"]
    rows = []
    for entry in predictions:
        prediction = entry["prediction"]
        C = prediction["C"]
        budget = _measured(isoflop_entries, entry["family"], C)
        for name in QUANTITIES:
            value, lo, hi = (prediction[name][k] for k in ("value", "lo", "hi"))
            interval = "–" if lo is None else f"[{lo:.4g}, {hi:.4g}]"
            if budget is None:
                outcome = ["not run yet", "", ""]
            elif not budget.bracketed:
                outcome = ["not bracketed: " + budget.flag, "", ""]
            else:
                got = getattr(budget, name)
                got_lo, got_hi = budget.ci.get(name, (math.nan, math.nan))
                inside = "–" if lo is None else ("yes" if lo <= got <= hi else "NO")
                outcome = [f"{got:.4g}", "" if not math.isfinite(got_lo) else f"[{got_lo:.4g}, {got_hi:.4g}]", inside]
            rows.append([_name(entry), f"{C:.3g}", name, f"{value:.4g}", interval, *outcome])
    return header, rows


def prediction_sections(spec: dict, isoflop_entries) -> list[tuple]:
    predictions = read_predictions(spec)
    if not predictions:
        return []
    # one budget's C differs a little between families (each is the mean of its own runs' C)
    fitted = sorted({f'{b["C"]:.3g}' for e in predictions for b in e["isoflop"]["budgets"]}, key=float)
    identified = {_name(e): e["prediction"]["identified"] for e in predictions}
    caveat = [f for f, ok in identified.items() if not ok]
    text = (f"Written into {spec['results']}/{PREDICTION_FILE} and committed before the budget was run (git log "
            f"shows the order): an IsoFLOP fit on the budgets {', '.join(fitted)} extrapolated "
            "N_opt = G·C^a, D_opt = G'·C^b and L_opt = K·C^-gamma, with bootstrap intervals. Measured: the held-out "
            "budget's own parabola minimum and its bootstrap interval. L_opt's power law has no irreducible loss, "
            "so it tends to run low when extrapolated (docs/scaling.md).")
    if caveat:
        text += f" Not identified when predicted, so an extrapolation of unfixed constants: {', '.join(caveat)}."
    return [("h2", "Pre-registered prediction"), ("p", text), ("table", prediction_rows(predictions, isoflop_entries))]
