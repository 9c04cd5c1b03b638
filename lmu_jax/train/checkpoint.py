"""Orbax checkpoints of the train state, verified on restore, restorable onto any mesh.

Layout: ``<run_dir>/checkpoints/<step>/{state,meta}``. ``meta`` (JSON) holds the step (which is the data
position), the run id, the data fingerprint, the config and a checksum of the state. A checkpoint that
fails to restore or whose checksum differs is reported and the next older one is tried: a corrupt
latest checkpoint costs the steps since the previous one, never the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("lmu_jax")


@jax.jit
def state_checksum(state) -> jax.Array:
    """An order-sensitive 32-bit checksum of every leaf's bits (detects flipped or swapped values)."""
    total = jnp.uint32(0)
    for index, leaf in enumerate(jax.tree.leaves(state)):
        bits = jax.lax.bitcast_convert_type(jnp.asarray(leaf, jnp.float32).reshape(-1), jnp.uint32)
        weights = jnp.arange(1, bits.size + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
        total = total * jnp.uint32(31) + jnp.uint32(index + 1) + jnp.sum(bits * weights, dtype=jnp.uint32)
    return total


class Checkpointer:
    def __init__(self, directory, ckpt_cfg):
        self.directory = Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.keep,
            keep_period=ckpt_cfg.keep_every or None,
            enable_async_checkpointing=ckpt_cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state, meta: dict) -> None:
        step = int(jax.device_get(state["step"]))
        meta = dict(meta, step=step, checksum=int(jax.device_get(state_checksum(state))))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state):
        """(state, meta) of the newest checkpoint that restores and verifies, or (None, None)."""
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                state, meta = restored["state"], restored["meta"]
                if int(jax.device_get(state_checksum(state))) != meta["checksum"]:
                    raise ValueError("checksum mismatch")
                return state, meta
            except Exception as err:  # corrupt, truncated or half-written: fall back to an older one
                log.warning("checkpoint %s in %s is unusable (%s: %s); trying the previous one",
                            step, self.directory, type(err).__name__, str(err).splitlines()[0][:200])
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: orbax restores onto them (any mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, np.dtype(x.dtype), sharding=s),
                        tree, shardings)
