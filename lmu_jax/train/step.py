"""Pure train and eval steps. The trainer jits them with explicit shardings and donated state.

The train state is a plain dict pytree ``{"step", "params", "opt_state"}``; the step's randomness is
``fold_in(seed_key, step)``, so nothing random needs storing and a resumed run is bitwise identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_losses(apply_fn, params, windows, *, train: bool, rng=None):
    """Per-token cross-entropy (nats) of windows[:, 1:] given windows[:, :-1]; float32."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    rngs = {"dropout": rng, "skip": rng} if rng is not None else None
    logits = apply_fn({"params": params}, inputs, train=train, rngs=rngs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def train_step(state, batch, *, apply_fn, optimizer, microbatches: int, seed: int, skip_nonfinite: bool):
    """One optimizer step on the global batch (accumulated over `microbatches` parts)."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])

    def loss_fn(params, windows, key):
        return token_losses(apply_fn, params, windows, train=True, rng=key).mean()

    grad_fn = jax.value_and_grad(loss_fn)
    if microbatches == 1:
        loss, grads = grad_fn(state["params"], batch, rng)
    else:
        # Part j takes rows j, j+m, j+2m, ...: each device's contiguous block of rows feeds every part
        # equally, so the split keeps the batch sharding (a (m, B/m) split would all-gather the batch).
        # The gradients are still all-reduced once per part, inside the scan, as GSPMD places them.
        parts = batch.reshape(batch.shape[0] // microbatches, microbatches, *batch.shape[1:]).swapaxes(0, 1)

        def accumulate(carry, xs):
            index, windows = xs
            loss, grads = grad_fn(state["params"], windows, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), parts))
        loss, grads = jax.tree.map(lambda x: x / microbatches, (loss, grads))

    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:  # keep the old parameters and optimizer state where this step blew up
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state["params"], state["opt_state"]))
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def eval_step(params, windows, weights, *, apply_fn):
    """Summed loss per position over the rows with weight 1 (padding rows have weight 0)."""
    losses = token_losses(apply_fn, params, windows, train=False)
    return (losses * weights[:, None]).sum(axis=0), weights.sum()
