"""The report's loss-spike check: runs whose training loss jumped far above where it had already been.

A spike is a logged step whose minibatch training loss exceeds the lowest loss logged before it (the
running minimum) by more than ``SPIKE_NATS``, or whose loss is not finite. One nat is a batch whose
perplexity is e times the best the run has already reached: minibatch noise of a 16 x 256-token batch of
KJV moves the loss by ~0.1 nats, so there such a jump is a divergence. On the stdlib sources at 8 x 256
tokens, single hard batches reach 1.0-1.5 nats above the running minimum for one step and are flagged
too (experiments/results/cpu_scaling_pystdlib/README.md, "Loss spikes"). Consecutive flagged
steps form one spike, reported by its worst step. The check reads the whole curve, warmup included (a
loss still falling from its initial value never rises above its running minimum), but only the logged
steps: with ``log.every`` > 1 the trainer still logs every step above its running minimum by
``SPIKE_NATS``, with that minimum (``lowest_before``), so no spike goes unseen.
"""

from __future__ import annotations

import math

import numpy as np

from lmu_jax.metrics import SPIKE_NATS
from lmu_jax.report import plots


def loss_spikes(steps, losses, threshold: float = SPIKE_NATS, lowest_before=None) -> list[dict]:
    """The spikes of one training curve (logged steps, their losses), each as ``step`` (its first
    flagged step), ``peak_step``, ``loss`` (at the peak), ``before`` (the running minimum before the
    spike), ``jump`` (loss - before; inf for a non-finite loss) and ``steps`` (logged steps above the
    threshold). ``lowest_before``: the trainer's own running minimum at each step (NaN where it did not
    record one), which the logged steps alone may not show when the log is thinned."""
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=float)
    if not losses.size:
        return []
    finite = np.isfinite(losses)
    before = np.concatenate([[np.inf], np.minimum.accumulate(np.where(finite, losses, np.inf))[:-1]])
    if lowest_before is not None:
        before = np.fmin(before, np.asarray(lowest_before, dtype=float))  # NaN: not recorded
    jump = np.where(finite, losses - before, np.inf)
    flagged = jump > threshold
    spikes, i = [], 0
    while i < len(losses):
        if not flagged[i]:
            i += 1
            continue
        end = i
        while end + 1 < len(losses) and flagged[end + 1]:
            end += 1
        peak = i + int(np.argmax(jump[i:end + 1]))
        spikes.append({"step": int(steps[i]), "peak_step": int(steps[peak]), "loss": float(losses[peak]),
                       "before": float(before[peak]), "jump": float(jump[peak]), "steps": end - i + 1})
        i = end + 1
    return spikes


def run_spikes(results) -> list[dict]:
    """Every spike of every run, with the run's id, family, N and budget."""
    return [{"run_id": r.row["run_id"], "family": r.family, "N": r.N, "budget": r.budget_key, **spike}
            for r in results for spike in loss_spikes(r.steps, r.train_loss, lowest_before=r.lowest_before)]


def spike_text(spike) -> str:
    jump = f"+{spike['jump']:.2f} nats" if math.isfinite(spike["jump"]) else "non-finite"
    return f"{spike['run_id']} step {spike['peak_step']} ({jump})"


def stability_sections(results, curves: bool) -> list[tuple]:
    """The report's "Training stability" section: the definition, then the spikes found or that none were."""
    s = [("h2", "Training stability")]
    rule = (f"A loss spike is a logged training step whose minibatch loss lies more than {SPIKE_NATS} nats above "
            "the lowest loss the run had logged before it (minibatch noise moves it by ~0.1 nats on KJV), or is not "
            "finite; consecutive such steps are one spike, given by its worst step "
            "(lmu_jax.report.stability). The trainer logs every such step whatever log.every says, with the "
            "lowest loss before it, so a thinned log still shows it.")
    if not curves:
        return s + [("p", rule + " Not checked here: this directory holds no training curves.")]
    spikes = run_spikes(results)
    if not spikes:
        return s + [("p", rule + f" None of the {len(results)} runs has one.")]
    header = ["run", "family", "N", "budget", "first step", "worst step", "loss there", "running minimum before",
              "jump (nats)", "steps above"]
    rows = [[p["run_id"], plots.label(p["family"]), f"{p['N']:,}", p["budget"], str(p["step"]), str(p["peak_step"]),
             f"{p['loss']:.3f}", f"{p['before']:.3f}", f"{p['jump']:.2f}" if math.isfinite(p["jump"]) else "non-finite",
             str(p["steps"])] for p in spikes]
    runs = len({p["run_id"] for p in spikes})
    return s + [("p", rule + f" {runs} of {len(results)} runs have one or more:"), ("table", (header, rows))]
