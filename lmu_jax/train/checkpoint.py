"""Orbax checkpoints of the train state: read back before anything older is deleted, verified on restore.

Layout: ``<run_dir>/checkpoints/<step>/{state,meta}``. ``meta`` (JSON) holds the step (which is the data
position), the run id, the data fingerprint, the config and ``state_hash``, a hash of every bit of the
state.

Retention is ours, not orbax's ``max_to_keep``: orbax picks the steps to delete when a save *starts* and
deletes them as soon as the new one is committed, so a commit holding wrong bytes (or, with keep=1, any
bad commit) would leave no good checkpoint. Here each new checkpoint is restored and its hash compared
("verified") before older ones are pruned, and pruning keeps the ``keep`` newest checkpoints up to the
newest verified one, so a verified checkpoint always survives. Disk use is ``keep`` + 1 checkpoints
while a new one awaits verification. Verifying costs one restore per checkpoint, done when the next one
is saved (or at the end), and briefly holds a second copy of the state in device memory.

The state is the trainer's ``{"step", "params", "opt_state", "carry"}``. A checkpoint written before the
state always held ``"carry"`` has none where the run's carry is empty: it restores with the empty carry
(the hash is the same, as an empty carry has no leaves).

Restore goes newest first; a checkpoint that fails to restore or whose hash differs is reported, and
the next older one is tried. Once an older one restores, the trainer sets the bad newer ones aside as
``<step>.unusable-<ms>`` (kept for inspection; orbax ignores the name) so the run can write those steps
again. When none restores, that is an error, not a fresh start.

A save that fails (disk full, storage gone, or a read-back that does not match) makes the next save
(or the final ``wait``, while the state is still in memory) synchronous and verified, tried
``SAVE_ATTEMPTS`` times; then ``CheckpointError`` (a ``UserError``: one line, exit code 2) names the
step, the cause and the last good checkpoint, which is left intact. A checkpoint whose read-back failed
stays where it is, unverified: it never counts towards ``keep``, and a resume checks it again (the
failure may have been the reader's, e.g. a peer process that died mid-verification).

Test hook: ``LMU_JAX_TEST_CKPT_DELAY_S=<seconds>`` makes every async write pause that long after its
files are written and before its commit (the rename of ``<step>.orbax-checkpoint-tmp``), so a test can
kill a run in the middle of a checkpoint write. ``_before_commit`` is also where in-process tests
inject write errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lmu_jax import distributed, storage
from lmu_jax.errors import UserError

log = logging.getLogger("lmu_jax")

SAVE_ATTEMPTS = 3
RETRY_DELAY_S = 2.0  # times the attempt number
DELAY_ENV = "LMU_JAX_TEST_CKPT_DELAY_S"


class CheckpointError(UserError):
    """A checkpoint could not be written and read back: the run stops, its last good checkpoint intact."""


def _fmix32(h):
    """MurmurHash3's finaliser: a bijection of uint32 in which every input bit moves every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(leaf) -> jax.Array:
    """The leaf's raw bits, one uint32 per element (2- and 1-byte types widened), in the leaf's shape."""
    x = jnp.asarray(leaf)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    word = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
    """Each element's row-major position (mod 2^32), built in the leaf's own shape: flattening a sharded
    leaf instead makes the SPMD partitioner reshard it, which costs seconds of compile per leaf."""
    index, stride = jnp.zeros(shape, jnp.uint32), 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return index


@jax.jit
def _leaf_hash(leaf, index) -> jax.Array:
    salt = _fmix32((index + 1) * jnp.uint32(0x9E3779B9))
    keys = _fmix32(_flat_index(leaf.shape) ^ salt)
    return jnp.sum(_fmix32(_bits(leaf) ^ keys), dtype=jnp.uint32)


def state_hash(state) -> int:
    """uint32 sum over all elements of fmix32(bits ^ key(leaf, position)).

    Changing any one value always changes the hash (fmix32 is a bijection, so the sum moves by a
    non-zero amount); moved, swapped or several changed values are caught with probability 1 - 2^-32.
    (A plain weighted sum of the bits misses e.g. a sign flip wherever the weight is even.)
    One small program per leaf shape and sharding, reused across leaves and saves: a single program
    over the whole state took seconds to compile, paid again by every process of every run."""
    partial = [_leaf_hash(leaf, jnp.uint32(index)) for index, leaf in enumerate(jax.tree.leaves(state))]
    return sum(int(h) for h in jax.device_get(partial)) % 2**32


def _before_commit() -> None:
    """Runs in orbax's write thread once a checkpoint's files are written, just before its commit."""
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)


def _first_line(err: BaseException) -> str:
    """The error's first line for a log line; tensorstore's errors end in a kilobyte-long spec of the
    array (dropped), after the cause (kept: a plain cut at 300 characters lost it)."""
    line = (str(err).strip().splitlines() or [""])[0]
    line = re.sub(r"\s*\[tensorstore_spec=.*$", "", line)
    return f"{type(err).__name__}: {line if len(line) <= 500 else line[:250] + ' … ' + line[-250:]}"


def _alive(state) -> bool:
    """False once the trainer has donated the state's buffers to the next step."""
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


class Checkpointer:
    def __init__(self, directory, ckpt_cfg, read_only: bool = False):
        """``read_only``: another run's checkpoints (``train.init_from``), restored but never changed."""
        self.directory = storage.absolute(storage.path(directory, "checkpoint directory"))
        self.keep, self.keep_every, self.keep_at = ckpt_cfg.keep, ckpt_cfg.keep_every, set(ckpt_cfg.at)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours (module docstring): orbax deletes nothing
            enable_async_checkpointing=ckpt_cfg.async_save,
            cleanup_tmp_directories=not read_only,  # a write killed mid-way leaves <step>.orbax-checkpoint-tmp
            create=not read_only,
            read_only=read_only,
        )
        if ckpt_cfg.async_save:  # orbax refuses async options (the test hook) on a synchronous manager
            options = dataclasses.replace(
                options, async_options=ocp.AsyncOptions(post_finalization_callback=lambda: _before_commit()))
        # handlers named up front, so that a checkpoint's layout can be read before restoring it (``_restore``)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self.verified: set[int] = set()
        self.unverified: set[int] = set()  # read back wrong (or not at all) by this process
        self._pending = None  # (meta, abstract, state) of the async save in flight, not yet verified
        self._failed = None  # the same for a save whose write or read-back failed
        self._last_error = ""

    @property
    def last_good(self) -> int | None:
        """The newest checkpoint known to restore to exactly the state that was saved."""
        return max(self.verified, default=None)

    def last_good_text(self) -> str:
        if self.last_good is None:
            return "the last good checkpoint is none"
        return f"the last good checkpoint is step {self.last_good} in {self.directory}, intact"

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- saving -------------------------------------------------------------------------------------

    def save(self, state, meta: dict) -> None:
        """Start writing ``state`` (async); the previous save is verified first and only then pruned."""
        self.settle()
        step = int(jax.device_get(state["step"]))
        meta = dict(meta, step=step, state_hash=state_hash(state))
        abstract = abstract_like(state, jax.tree.map(lambda x: x.sharding, state))
        if self._failed is not None:  # storage just failed: write this one through before going on
            self._failed = None
            return self._save_until_verified(state, meta, abstract)
        try:
            self._write(step, state, meta)
        except Exception as err:  # e.g. the tmp directory could not be made
            log.warning("checkpoint %d: writing failed (%s); retrying", step, _first_line(err))
            return self._save_until_verified(state, meta, abstract)
        self._pending = (meta, abstract, state)

    def settle(self) -> None:
        """Finish the save in flight: wait for it, read it back, then prune. Never raises; a failure is
        remembered and makes the next ``save`` or ``wait`` write synchronously."""
        if self._pending is None:
            return
        meta, abstract, state = self._pending
        self._pending = None
        try:
            self.manager.wait_until_finished()
            self._restore(meta["step"], abstract, expected_hash=meta["state_hash"])
        except Exception as err:  # left on disk: a failed read-back may be the reader's fault (a peer
            # process died, say); it stays unverified, so nothing older is pruned for it, and a
            # resume checks it again like any other
            self._last_error = _first_line(err)
            log.warning("checkpoint %d in %s was not written correctly (%s); the last good one is %s",
                        meta["step"], self.directory, self._last_error, self.last_good)
            self._failed = (meta, abstract, state)
            self.unverified.add(meta["step"])
            return
        self._accept(meta["step"])

    def wait(self) -> None:
        """Make the last save durable and verified (before exiting); CheckpointError if impossible."""
        self.settle()
        if self._failed is None:
            return
        meta, abstract, state = self._failed
        self._failed = None
        if not _alive(state):
            raise CheckpointError(f"checkpoint of step {meta['step']} in {self.directory} failed "
                                  f"({self._last_error}) and its state is gone; {self.last_good_text()}")
        self._save_until_verified(state, meta, abstract)

    def close(self) -> None:
        """Wait for writes and release orbax's threads; reports, never raises (it runs in ``finally``)."""
        self.settle()
        try:
            self.manager.close()
        except Exception as err:
            log.warning("closing the checkpoints in %s: %s", self.directory, _first_line(err))

    def _write(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def _save_until_verified(self, state, meta: dict, abstract) -> None:
        step = meta["step"]
        for attempt in range(1, SAVE_ATTEMPTS + 1):
            try:
                self._set_aside(step)  # what a failed attempt left under this step
                self._write(step, state, meta)
                self.manager.wait_until_finished()
                self._restore(step, abstract, expected_hash=meta["state_hash"])
                self._accept(step)
                return
            except Exception as err:
                self._last_error = _first_line(err)
                log.warning("checkpoint %d: attempt %d of %d failed (%s)", step, attempt, SAVE_ATTEMPTS,
                            self._last_error)
                if attempt < SAVE_ATTEMPTS:
                    time.sleep(RETRY_DELAY_S * attempt)
        raise CheckpointError(f"checkpoint of step {step} could not be written to {self.directory} "
                              f"({self._last_error}) in {SAVE_ATTEMPTS} attempts; {self.last_good_text()}; "
                              "fix the storage (free space?) and run the same command again to resume")

    def _accept(self, step: int) -> None:
        """``step`` verified: prune to the ``keep`` newest up to the newest verified (+ every keep_every and
        the ``at`` steps); one that failed its read-back does not count towards ``keep``."""
        self.verified.add(step)
        self.unverified.discard(step)
        newest = self.last_good
        steps = self.steps()
        settled = [s for s in steps if s <= newest and s not in self.unverified]
        keep = set(settled[-self.keep:]) | {s for s in steps if s > newest}
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        keep |= self.keep_at & set(steps)
        for s in steps:
            if s not in keep:
                self.manager.delete(s)
                self.verified.discard(s)
                self.unverified.discard(s)

    # -- restoring ----------------------------------------------------------------------------------

    def _restore(self, step: int, abstract_state, expected_hash: int | None = None):
        """(state, meta) of ``step``; raises unless it restores on every process and its hash matches."""
        restored, error = None, None
        try:
            without_carry = _saved_without_empty_carry(self.manager.item_metadata(step)["state"], abstract_state)
            target = {k: v for k, v in abstract_state.items() if k != "carry"} if without_carry else abstract_state
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as err:  # corrupt, truncated or half-written
            error = err
        # every process must take the same branch: the hash below is a collective computation
        if not distributed.all_processes(error is None):
            raise error or RuntimeError("the checkpoint failed to restore on another process")
        state, meta = restored["state"], restored["meta"]
        if without_carry:
            state = dict(state, carry=abstract_state["carry"])  # the empty carry: no leaves, nothing to read
        got, stored = state_hash(state), meta.get("state_hash")  # none stored: unverifiable, refused
        if got != stored or (expected_hash is not None and stored != expected_hash):
            raise ValueError(f"state hash {got} does not match {stored} stored with step {step}")
        return state, meta

    def restore(self, step: int, abstract_state):
        """(state, meta) of ``step``; raises unless it restores and its hash matches."""
        return self._restore(step, abstract_state)

    def restore_latest(self, abstract_state, *, set_aside_unusable: bool = False):
        """(state, meta) of the newest checkpoint that restores and verifies; (None, None) when there
        are none. When checkpoints exist but none restores, CheckpointError: they may as well be from
        another version of the code, and silently starting over would throw the run away.

        With ``set_aside_unusable`` (the trainer), the unusable ones newer than the one restored are
        moved out of the way, so the run can write those steps again."""
        if set_aside_unusable:
            self._drop_interrupted_writes()
        unusable = []
        for step in reversed(self.steps()):
            try:
                state, meta = self._restore(step, abstract_state)
            except Exception as err:
                log.warning("checkpoint %s in %s is unusable (%s); trying the previous one", step,
                            self.directory, _first_line(err))
                unusable.append((step, _first_line(err)))
                continue
            if set_aside_unusable:
                for bad, _ in unusable:
                    self._set_aside(bad)
            self.verified.add(step)
            return state, meta
        if unusable:
            raise CheckpointError(f"none of the {len(unusable)} checkpoints in {self.directory} restores "
                                  f"(step {unusable[0][0]}: {unusable[0][1]}); if they are corrupt or from "
                                  "another version of the code, move them away to start the run over")
        return None, None

    def _drop_interrupted_writes(self) -> None:
        """On an object store orbax writes ``<step>/`` in place and marks it committed last (its
        ``commit_success.txt``); a ``<step>/`` without the mark is an interrupted write, never a
        checkpoint (like a local ``.orbax-checkpoint-tmp``): removed, so that step can be written again."""
        if not storage.is_remote(self.directory):
            return
        if jax.process_index() == 0 and self.directory.exists():
            committed = set(self.steps())
            for partial in self.directory.iterdir():
                if partial.name.isdigit() and int(partial.name) not in committed:
                    partial.rmtree()
        distributed.barrier("checkpoint-drop-interrupted")
        self.manager.reload()

    def _set_aside(self, step: int) -> None:
        """Move a bad ``<step>`` out of orbax's view; drop half-written ``<step>.orbax-checkpoint-tmp``."""
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                with contextlib.suppress(OSError):  # an interrupted write is never a checkpoint
                    partial.rmtree()
            final = self.directory / str(step)
            if final.exists():
                final.rename(self.directory / f"{step}.unusable-{int(time.time() * 1000)}")
        distributed.barrier(f"checkpoint-set-aside-{step}")
        self.manager.reload()
        self.verified.discard(step)


def _saved_without_empty_carry(saved, abstract_state) -> bool:
    """Whether the checkpoint whose state's tree metadata is ``saved`` lacks the ``"carry"`` that
    ``abstract_state`` holds empty (written before the train state always held one; module docstring)."""
    return ("carry" in abstract_state and not jax.tree.leaves(abstract_state["carry"])
            and "carry" not in saved)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: orbax restores onto them (any mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, np.dtype(x.dtype), sharding=s),
                        tree, shardings)
