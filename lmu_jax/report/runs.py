"""What the report needs of each finished run: its CSV row, its training curve, its per-position loss."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import numpy as np

from lmu_jax.sweep.collect import collect, read_metrics


@dataclass(frozen=True)
class RunResult:
    row: dict  # the results.csv row (lmu_jax.sweep.collect.COLUMNS)
    tokens: np.ndarray  # training curve: cumulative tokens at each logged step
    flops: np.ndarray  # cumulative training FLOPs (our convention) at each logged step
    train_loss: np.ndarray  # minibatch loss at each logged step
    steps: np.ndarray  # the logged steps
    eval_tokens: np.ndarray  # validation evaluations during and at the end of training
    eval_loss: np.ndarray
    per_position_loss: np.ndarray  # final validation loss at each position of the window
    levels: np.ndarray | None = None  # the trainer's level at each logged step (NaN: none; stability.py)

    @property
    def family(self) -> str:
        return self.row["family"]

    @property
    def N(self) -> int:
        return int(self.row["N"])

    @property
    def D(self) -> int:
        return int(self.row["D"])

    @property
    def C(self) -> float:
        return float(self.row["C"])

    @property
    def eval_flops(self) -> np.ndarray:
        """Training FLOPs spent at each evaluation."""
        return self.eval_tokens * (self.C / self.D)

    @property
    def val_loss(self) -> float:
        return float(self.row["val_loss"])

    @property
    def budget_key(self) -> str:
        """Runs of one budget were planned to have the same cost; group them by it."""
        if self.row["budget_kind"]:
            return f"{self.row['budget_kind']}={float(self.row['budget']):.3g}"
        return f"C~{self.C:.2g}"  # a run directory without plan.json: its own FLOPs, 2 digits


def budgets_in_order(runs) -> list[str]:
    """The distinct budget keys of some runs: FLOP budgets first, each kind by increasing value."""
    order = {r.budget_key: (r.row["budget_kind"] != "flops", float(r.row["budget"] or r.C)) for r in runs}
    return sorted(order, key=order.get)


TEXT_COLUMNS = {"run_id", "family", "budget_kind", "schedule", "split_protocol", "curve", "run_dir", "branch_from"}


def _cell(text: str):
    """A results.csv cell as the number collect wrote (int, else float), or the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def read_collected(sweep_dir) -> dict:
    """A collected sweep without its run directories (results committed to experiments/results/):
    rows from results.csv, per-position losses from per_position.json when present, no curves."""
    text = (sweep_dir / "results.csv").read_text()
    rows = [{key: value if key in TEXT_COLUMNS else _cell(value) for key, value in row.items()}
            for row in csv.DictReader(io.StringIO(text))]
    per_position = {}
    if (sweep_dir / "per_position.json").exists():
        per_position = json.loads((sweep_dir / "per_position.json").read_text())
    return {"rows": rows, "per_position": per_position, "missing": [], "sweep_dir": sweep_dir, "curves": False}


def load_results(sweep_dir) -> tuple[list[RunResult], dict]:
    """Collect the sweep (writing results.csv / per_position.json) and load every finished run's curves.

    A directory with results.csv but no runs/ (a collected sweep committed without its runs) is read
    as it is: each run's validation curve is its final evaluation only, and ``collected["curves"]``
    is False so the report leaves out what needs the curves.
    """
    if not (sweep_dir / "runs").is_dir() and (sweep_dir / "results.csv").exists():
        collected = read_collected(sweep_dir)
        empty = np.array([], dtype=float)
        results = [RunResult(row=row, tokens=empty, flops=empty, train_loss=empty, steps=empty,
                             eval_tokens=np.array([row["D"]], dtype=float),
                             eval_loss=np.array([row["val_loss"]], dtype=float),
                             per_position_loss=np.array(collected["per_position"].get(row["run_id"], {}).get(
                                 "per_position_loss", []), dtype=float))
                   for row in collected["rows"]]
        return results, collected
    collected = collect(sweep_dir) | {"curves": True}
    results = []
    for row in collected["rows"]:
        records = read_metrics(collected["sweep_dir"] / row["curve"])
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        tokens_per_step = row["D"] / max(row["steps"], 1)
        results.append(RunResult(
            row=row,
            tokens=np.array([r["tokens"] for r in train], dtype=float),
            flops=np.array([r["flops_model"] for r in train], dtype=float),
            train_loss=np.array([r["loss"] for r in train], dtype=float),
            steps=np.array([r["step"] for r in train], dtype=int),
            levels=np.array([r.get("level", np.nan) for r in train], dtype=float),
            eval_tokens=np.array([r["step"] * tokens_per_step for r in evals], dtype=float),
            eval_loss=np.array([r["loss"] for r in evals], dtype=float),
            per_position_loss=np.array(collected["per_position"][row["run_id"]]["per_position_loss"], dtype=float),
        ))
    return results, collected
