"""optax AdamW with global-norm clipping, and the learning-rate schedules.

Schedules (all reach their end exactly at ``steps``, so every run's final loss is a valid (N, D) point):
- ``cosine``: linear warmup, then cosine from the peak to ``min_lr_ratio`` × peak at the horizon;
- ``wsd``: warmup, stable at the peak, then a linear cooldown over the last ``decay_fraction`` of steps
  (``cooldown_start``);
- ``constant``: warmup, then the peak.
Warmup starts above zero: step 0 uses lr · 1/(warmup+1), never 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_schedule(optim_cfg, steps: int) -> optax.Schedule:
    peak, floor = optim_cfg.lr, optim_cfg.lr * optim_cfg.min_lr_ratio
    warmup = min(optim_cfg.warmup_steps, max(steps - 1, 0))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / (warmup + 1)
        after = jnp.maximum(step - warmup, 0.0)
        span = max(steps - warmup, 1)
        if optim_cfg.schedule == "cosine":
            progress = jnp.clip(after / span, 0.0, 1.0)
            main = floor + 0.5 * (peak - floor) * (1 + jnp.cos(jnp.pi * progress))
        elif optim_cfg.schedule == "wsd":
            start = cooldown_start(optim_cfg, steps)
            cooldown = steps - start
            frac = jnp.clip((step - start + 1) / cooldown, 0.0, 1.0)
            main = peak - (peak - floor) * frac
        else:
            main = jnp.asarray(peak, jnp.float32)
        return jnp.where(step < warmup, warm, main)

    return schedule


def cooldown_start(optim_cfg, steps: int) -> int:
    """The wsd schedule's first step below the peak: the last ``decay_fraction`` of ``steps`` (at least
    one step) cool down. Before it the schedule does not depend on ``steps``, which is what lets a
    cooldown branch continue a longer run's stable phase (``train.branch_from``)."""
    return steps - max(int(round(optim_cfg.decay_fraction * steps)), 1)


def _decay_mask(params):
    """Weight decay on matrices only; biases, norm scales and 1-D tables are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(make_schedule(optim_cfg, steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                        eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=_decay_mask)
    if optim_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
    return adamw
