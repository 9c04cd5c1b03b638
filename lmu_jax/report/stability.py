"""The report's loss-spike check: runs whose training loss jumped far above its recent level, and stayed.

An excursion is a run of consecutive training steps whose minibatch loss lies more than ``SPIKE_NATS``
above the level of the curve before it (the median of the previous ``LEVEL_WINDOW`` steps' losses), or
is not finite; it is reported by its worst step. An excursion is an *instability* when it is not finite
or lasts two steps or more: the update that followed the jump did not bring the loss back, so the jump
was in the model, not only in its batch. A one-step excursion is a batch much harder than the run's
recent ones: on the stdlib sources at 8 x 256 bytes, one batch of unusual source reads 0.6-1.5 nats
above its neighbours, at the same step in every run that reads the batches in the same order
(experiments/results/cpu_scaling_pystdlib/README.md, "Loss spikes"). ``run_spikes`` says of each
one-step excursion how many other runs with the same data order (seed, batch size, window length) have
one at the same step: shared ones are the batch's; the rest are listed with the instabilities.

The check reads only the logged steps, and that is enough: whatever ``log.every`` says, the trainer logs
every excursion, and each logged step's level (``level``), so a step that is not logged was not one.
Curves written before the trainer logged levels give each logged step the median of the previous
``LEVEL_WINDOW`` logged losses instead.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from lmu_jax.metrics import LEVEL_WINDOW, SPIKE_NATS
from lmu_jax.report import plots


def loss_spikes(steps, losses, levels=None, threshold: float = SPIKE_NATS) -> list[dict]:
    """The excursions of one training curve (logged steps, their losses, and the trainer's ``level`` at
    each: NaN at the first step, all NaN in a curve from before the trainer logged levels), each as
    ``step`` (its first step), ``peak_step``, ``loss`` (at the peak), ``level`` (the curve's level
    before the peak), ``jump`` (loss - level; inf for a non-finite loss), ``steps`` (consecutive
    training steps above the threshold) and ``lasting`` (an instability: non-finite, or two steps or
    more)."""
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=float)
    level = np.full(losses.shape, np.nan) if levels is None else np.array(levels, dtype=float)
    if np.isnan(level).all():  # a curve from before the trainer logged levels: its logged steps' median
        finite_before = []
        for i, loss in enumerate(losses):
            if finite_before:
                level[i] = np.median(finite_before[-LEVEL_WINDOW:])
            if np.isfinite(loss):
                finite_before.append(loss)
    jump = np.where(np.isfinite(losses), losses - level, np.inf)
    flagged = np.nan_to_num(jump, nan=-np.inf) > threshold
    excursions, i = [], 0
    while i < len(losses):
        if not flagged[i]:
            i += 1
            continue
        end = i
        while end + 1 < len(losses) and flagged[end + 1] and steps[end + 1] == steps[end] + 1:
            end += 1
        peak = i + int(np.argmax(jump[i:end + 1]))
        length = int(steps[end] - steps[i]) + 1
        excursions.append({"step": int(steps[i]), "peak_step": int(steps[peak]), "loss": float(losses[peak]),
                           "level": float(level[peak]), "jump": float(jump[peak]), "steps": length,
                           "lasting": length >= 2 or not math.isfinite(jump[peak])})
        i = end + 1
    return excursions


def run_spikes(results) -> list[dict]:
    """Every excursion of every run, with the run's id, family, N and budget, and ``shared``: how many
    other runs with the same data order have an excursion at the same step."""
    found = []
    for r in results:
        order = (r.row.get("seed"), r.row.get("seq_len"), r.row.get("batch_size"))
        found += [{"run_id": r.row["run_id"], "family": r.family, "N": r.N, "budget": r.budget_key, "order": order,
                   **spike} for spike in loss_spikes(r.steps, r.train_loss, r.levels)]
    at = Counter((s["order"], s["peak_step"]) for s in found)
    return [{**s, "shared": at[(s["order"], s["peak_step"])] - 1} for s in found]


def flagged(spikes) -> list[dict]:
    """The excursions a reader must look at: instabilities, and one-step jumps no other run shares."""
    return [s for s in spikes if s["lasting"] or not s["shared"]]


def spike_text(spike) -> str:
    jump = f"+{spike['jump']:.2f} nats" if math.isfinite(spike["jump"]) else "non-finite"
    return f"{spike['run_id']} step {spike['peak_step']} ({jump}, {spike['steps']} step{'s' * (spike['steps'] > 1)})"


def stability_sections(results, curves: bool) -> list[tuple]:
    """The report's "Training stability" section: the definition, the flagged excursions, and a count
    of the shared one-step ones."""
    s = [("h2", "Training stability")]
    rule = (f"An excursion is a run of consecutive training steps whose minibatch loss lies more than {SPIKE_NATS} "
            f"nats above the median of the run's previous {LEVEL_WINDOW} logged losses, or is not finite. It is an "
            "instability when it is not finite or lasts two steps or more. A one-step excursion that other runs "
            "reading the same batches in the same order (seed, batch size, window) share at the same step is a hard "
            "batch, not the run's doing (lmu_jax.report.stability). The trainer logs every step that could be one, "
            "whatever log.every says.")
    if not curves:
        return s + [("p", rule + " Not checked here: this directory holds no training curves.")]
    spikes = run_spikes(results)
    shown, batches = flagged(spikes), [p for p in spikes if not p["lasting"] and p["shared"]]
    if shown:
        header = ["run", "family", "N", "budget", "first step", "worst step", "loss there", "level before",
                  "jump (nats)", "steps", "instability"]
        rows = [[p["run_id"], plots.label(p["family"]), f"{p['N']:,}", p["budget"], str(p["step"]),
                 str(p["peak_step"]), f"{p['loss']:.3f}", f"{p['level']:.3f}",
                 f"{p['jump']:.2f}" if math.isfinite(p["jump"]) else "non-finite", str(p["steps"]),
                 "yes" if p["lasting"] else "no (one step, not shared)"] for p in shown]
        runs = len({p["run_id"] for p in shown})
        s += [("p", rule + f" {runs} of {len(results)} runs have one that is an instability or not shared:"),
              ("table", (header, rows))]
    else:
        s += [("p", rule + f" None of the {len(results)} runs has an instability or an unshared one-step jump.")]
    if batches:
        steps = Counter(p["peak_step"] for p in batches).most_common(6)
        s += [("p", f"Hard batches: {len(batches)} one-step excursions in {len({p['run_id'] for p in batches})} runs "
                    "fall at steps that other runs with the same data order share (largest jump "
                    f"{max(p['jump'] for p in batches):.2f} nats); the most shared steps: "
                    + ", ".join(f"{step} ({n} runs)" for step, n in steps) + ".")]
    return s
