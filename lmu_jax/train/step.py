"""Pure train and eval steps. The trainer jits them with explicit shardings and donated state.

The train state is a plain dict pytree ``{"step", "params", "opt_state", "carry"}``. The carry is what the
run feeds from one window of a stream to the next (``lmu_jax.models.initial_carry``): Transformer-XL
memory, QRNN cells (batch-leading leaves, sharded like the batch, checkpointed with the rest), or the
empty carry ``{}`` of a run without one. The step's randomness is ``fold_in(seed_key, step)``, so
nothing random needs storing and a resumed run is bitwise identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lmu_jax.models import reset_rows


def token_losses(apply_fn, params, windows, carry, *, train: bool, rng=None):
    """(per-token cross-entropy (nats, float32) of windows[:, 1:] given windows[:, :-1] and ``carry``, the
    next carry)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    rngs = {"dropout": rng, "skip": rng} if rng is not None else None
    logits, carry = apply_fn({"params": params}, inputs, carry, train=train, rngs=rngs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], carry


def train_step(state, batch, starts=None, *, apply_fn, optimizer, microbatches: int, seed: int,
               skip_nonfinite: bool, schedule=None):
    """One optimizer step on the global batch (accumulated over `microbatches` parts). ``starts`` (batch,)
    bool marks the rows whose stream starts here: their carry is reset first (a run with the empty carry
    reads no streams and passes none). With the optimizer's learning-rate ``schedule``, the metrics
    include this step's ``lr``: computed here, the logged rate costs the host no device call of its own
    (one would wait behind the next step, already queued, and leave the device idle while the loop
    prepares the step after it)."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    carry = reset_rows(state["carry"], starts)

    def loss_fn(params, windows, carry, key):
        losses, carry = token_losses(apply_fn, params, windows, carry, train=True, rng=key)
        return losses.mean(), carry

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss, new_carry), grads = grad_fn(state["params"], batch, carry, rng)
    else:
        # Part j takes rows j, j+m, j+2m, ... of the batch and of the carry: each device's
        # contiguous block of rows feeds every part equally, so the split keeps the batch sharding (a
        # (m, B/m) split would all-gather the batch). The gradients are still all-reduced once per
        # part, inside the scan, where GSPMD places them.
        def split(x):
            return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

        def unsplit(x):
            return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])

        def accumulate(total, xs):
            index, windows, carry_part = xs
            (loss, carry_part), grads = grad_fn(state["params"], windows, carry_part, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, total, (loss, grads)), carry_part

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), new_carry = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), split(batch),
                                                                    jax.tree.map(split, carry)))
        loss, grads = jax.tree.map(lambda x: x / microbatches, (loss, grads))
        new_carry = jax.tree.map(unsplit, new_carry)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # keep the old parameters, optimizer state and carry where this step blew up
        params, opt_state, new_carry = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                    (params, opt_state, new_carry),
                                                    (state["params"], state["opt_state"], carry))
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "carry": new_carry}
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    if schedule is not None:
        metrics["lr"] = schedule(state["step"])
    return new_state, metrics


def eval_step(params, windows, mask, carry, *, apply_fn):
    """Loss summed over the rows at each position where ``mask`` (batch, seq_len) is True, the count of
    those rows there, and the next carry."""
    losses, carry = token_losses(apply_fn, params, windows, carry, train=False)
    return jnp.where(mask, losses, 0.0).sum(axis=0), mask.sum(axis=0), carry
