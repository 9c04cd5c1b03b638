"""Pure train and eval steps. The trainer jits them with explicit shardings and donated state.

The train state is a plain dict pytree ``{"step", "params", "opt_state"}``, plus ``"carry"`` when the run
feeds a family's carried state (Transformer-XL memory, QRNN cells; batch-leading leaves, sharded like the
batch, checkpointed with the rest). The step's randomness is ``fold_in(seed_key, step)``, so nothing
random needs storing and a resumed run is bitwise identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lmu_jax.models import reset_rows


def token_losses(apply_fn, params, windows, *, train: bool, rng=None, carry=None):
    """Per-token cross-entropy (nats) of windows[:, 1:] given windows[:, :-1]; float32. With ``carry`` (a
    family's carried state) the model takes and returns it: (losses, new carry)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    rngs = {"dropout": rng, "skip": rng} if rng is not None else None
    if carry is None:
        logits = apply_fn({"params": params}, inputs, train=train, rngs=rngs)
    else:
        logits, new_carry = apply_fn({"params": params}, inputs, carry, train=train, rngs=rngs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    losses = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return losses if carry is None else (losses, new_carry)


def train_step(state, batch, starts=None, *, apply_fn, optimizer, microbatches: int, seed: int,
               skip_nonfinite: bool, schedule=None):
    """One optimizer step on the global batch (accumulated over `microbatches` parts). With a carried
    state, ``starts`` (batch,) bool marks the rows whose stream starts here: their state is reset first.
    With the optimizer's learning-rate ``schedule``, the metrics include this step's ``lr``: computed
    here, the logged rate costs the host no device call of its own (one would wait behind the next
    step, already queued, and leave the device idle while the loop prepares the step after it)."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    carry = reset_rows(state["carry"], starts) if "carry" in state else None

    def loss_fn(params, windows, carry, key):
        if carry is None:
            return token_losses(apply_fn, params, windows, train=True, rng=key).mean(), None
        losses, carry = token_losses(apply_fn, params, windows, train=True, rng=key, carry=carry)
        return losses.mean(), carry

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss, new_carry), grads = grad_fn(state["params"], batch, carry, rng)
    else:
        # Part j takes rows j, j+m, j+2m, ... of the batch and of the carried state: each device's
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
    if skip_nonfinite:  # keep the old parameters, optimizer and carried state where this step blew up
        params, opt_state, new_carry = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                    (params, opt_state, new_carry),
                                                    (state["params"], state["opt_state"], carry))
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if carry is not None:
        new_state["carry"] = new_carry
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    if schedule is not None:
        metrics["lr"] = schedule(state["step"])
    return new_state, metrics


def eval_step(params, windows, mask, carry=None, *, apply_fn):
    """Loss summed over the rows at each position where ``mask`` (batch, seq_len) is True, the count of
    those rows there, and the next carried state (None without one)."""
    if carry is None:
        losses = token_losses(apply_fn, params, windows, train=False)
    else:
        losses, carry = token_losses(apply_fn, params, windows, train=False, carry=carry)
    return jnp.where(mask, losses, 0.0).sum(axis=0), mask.sum(axis=0), carry
