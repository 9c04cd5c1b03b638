"""Turn a sweep directory's finished runs into one tidy table (CSV) and per-position losses (JSON).

Columns of ``results.csv`` (one row per finished run):

    run_id, family, size (ladder target), N (non-embedding params), N_total, D (training tokens),
    C (training FLOPs, our convention: 3 x analytic forward per token, `lmu_jax.flops`), C_6N (6 N D,
    Kaplan's), budget_kind, budget, steps, seq_len, batch_size, schedule, train_loss, val_loss,
    bits_per_token, bits_per_byte, split_protocol, split_bits_per_byte, curve (path of metrics.jsonl), run_dir,
    seed (train.seed), lr (peak, optim.lr), branch_from (a cooldown branch: its parent's checkpoint),
    flops_per_s (median training step's model FLOPs per second: the throughput the run got, under
    whatever load the host had), microbatches (train.microbatches as the run resolved it)

A cooldown branch's row has ``budget_kind`` "branch" and ``budget`` its own C (the parent's prefix
and its cooldown): it is an (N, D) point of its own, not a member of its parent's budget. The runs of
a sweep's lr grid go to ``lr_grid.csv`` (same columns), not into results.csv: they are there to choose
the learning rate, not to be fitted.

``curve`` and ``run_dir`` are relative to the sweep directory (``runs/<id>/...``), so a collected
sweep copied elsewhere (experiments/results/, a bucket) still points at its own files.

``train_loss`` is the mean minibatch loss of the last ``TRAIN_LOSS_TAIL`` logged steps (one
minibatch is noisy); ``val_loss`` is the final evaluation (nats per token on the fixed validation
windows); ``split_bits_per_byte`` is the whole-split evaluation of eval.json (``split_protocol``: memory
streams or sliding windows, lmu_jax/train/evaluate.py). Every row is a horizon-matched run (the sweep refuses schedules that do not end at the run's
own horizon), so every row is a valid (N, D) point for fitting.

Run information comes from each run's own files (config.yaml, eval.json, metrics.jsonl); plan.json
adds the ladder target and budget when the sweep directory has one, so a directory of runs copied
from elsewhere still collects.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import yaml

from lmu_jax import storage
from lmu_jax.errors import UserError
from lmu_jax.sweep.runner import SweepDir, run_status

COLUMNS = ("run_id", "family", "size", "N", "N_total", "D", "C", "C_6N", "budget_kind", "budget", "steps",
           "seq_len", "batch_size", "schedule", "train_loss", "val_loss", "bits_per_token", "bits_per_byte",
           "split_protocol", "split_bits_per_byte", "curve", "run_dir", "seed", "lr", "branch_from",
           "flops_per_s", "microbatches")
TRAIN_LOSS_TAIL = 10


def read_metrics(path) -> list[dict]:
    records = []
    for line in storage.path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill; the trainer trims it on resume
    return records


def run_row(run_dir, planned: dict | None) -> dict:
    """The CSV row of one finished run directory (a sweep's ``runs/<id>``)."""
    name = f"runs/{run_dir.name}"
    evaluation = json.loads((run_dir / "eval.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    train = [r["loss"] for r in metrics if r.get("kind") == "train"]
    tail = train[-TRAIN_LOSS_TAIL:]
    # training throughput: the median step's model FLOPs per second (compilation and evaluation excluded)
    rates = [r["tokens_per_s"] * r["flops_model"] / r["tokens"] for r in metrics
             if r.get("kind") == "train" and r.get("tokens") and r.get("tokens_per_s")]
    params = evaluation["params"]
    tokens = int(evaluation["tokens"])
    planned = planned or {}
    return {
        "run_id": evaluation.get("run_id", run_dir.name),
        "family": evaluation["family"],
        "size": planned.get("size", ""),
        "N": int(params["non_embedding"]),
        "N_total": int(params["total"]),
        "D": tokens,
        "C": float(evaluation["flops_model"]),
        "C_6N": 6.0 * params["non_embedding"] * tokens,
        "budget_kind": planned.get("budget_kind", ""),
        "budget": planned.get("budget", ""),
        "steps": int(evaluation["step"]),
        "seq_len": config["data"]["seq_len"],
        "batch_size": config["train"]["batch_size"],
        "schedule": config["optim"]["schedule"],
        "train_loss": sum(tail) / len(tail) if tail else float("nan"),
        "val_loss": float(evaluation["loss"]),
        "bits_per_token": float(evaluation["bits_per_token"]),
        "bits_per_byte": float(evaluation["bits_per_byte"]),
        "split_protocol": evaluation.get("split_eval", {}).get("protocol", ""),
        "split_bits_per_byte": evaluation.get("split_eval", {}).get("bits_per_byte", ""),
        "curve": f"{name}/metrics.jsonl",
        "run_dir": name,
        "seed": config["train"].get("seed", 0),  # (the trainer writes every key; copied runs may not)
        "lr": config.get("optim", {}).get("lr", ""),
        "branch_from": config["train"].get("branch_from", ""),
        "flops_per_s": float(np.median(rates)) if rates else "",
        "microbatches": config["train"].get("microbatches", ""),
    }


def csv_text(rows) -> str:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def collect(sweep_dir) -> dict:
    """Rows of every finished run, their per-position losses, and the ids of unfinished runs.

    Writes ``results.csv`` and ``per_position.json`` into the sweep directory and returns
    ``{"rows": [...], "per_position": {...}, "missing": [run ids], "csv": path, "json": path, "sweep_dir": path}``.
    """
    sweep = SweepDir(sweep_dir)
    if not sweep.runs.is_dir():
        raise UserError(f"SWEEP_DIR={str(sweep.path)!r} is invalid: it has no runs/ directory "
                        "(run `lmu-jax sweep run SPEC` first)")
    planned = {p["run_id"]: p for p in sweep.read_plan()}
    run_ids = list(planned) + sorted(p.name for p in sweep.runs.iterdir() if p.is_dir() and p.name not in planned)
    rows, grid_rows, per_position, missing = [], [], {}, []
    for rid in run_ids:
        run_dir = sweep.run_dir(rid)
        if run_status(sweep, rid).state != "done" or not (run_dir / "eval.json").exists():
            missing.append(rid)
            continue
        row = run_row(run_dir, planned.get(rid))
        if planned.get(rid, {}).get("stage") == "lr_grid":
            grid_rows.append(row)
            continue
        rows.append(row)
        evaluation = json.loads((run_dir / "eval.json").read_text())
        per_position[row["run_id"]] = {"family": row["family"], "N": row["N"], "D": row["D"], "C": row["C"],
                             "val_loss": row["val_loss"], "per_position_loss": evaluation["per_position_loss"]}
    csv_path = sweep.path / "results.csv"
    storage.write_text(csv_path, csv_text(rows))
    if grid_rows:
        storage.write_text(sweep.path / "lr_grid.csv", csv_text(grid_rows))
    json_path = sweep.path / "per_position.json"
    storage.write_text(json_path, json.dumps(per_position, indent=1) + "\n")
    return {"rows": rows, "per_position": per_position, "missing": missing, "csv": csv_path, "json": json_path,
            "sweep_dir": sweep.path}
