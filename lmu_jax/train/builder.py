"""A run's program: its config and mesh -> the model, the train state's shapes and shardings, and the
jitted init, train and eval steps.

Pure: it reads no data, makes no run directory and places nothing on a device (shapes come from
``jax.eval_shape``; a jitted function runs only when called). The Trainer, ``lmu-jax eval``,
``lmu-jax compile``, the memory check and the benchmark all build their step here, so each of them
compiles the program a run trains with.
"""

from __future__ import annotations

import os
from functools import cached_property, partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lmu_jax.config import RunConfig, resolve_auto
from lmu_jax.errors import bad_value
from lmu_jax.flops import model_flops_per_token, param_counts
from lmu_jax.models import build_model, feeds_carry, initial_carry
from lmu_jax.ops.memory import compiling_for
from lmu_jax.sharding import (batch_sharding, check_sufficiently_sharded, data_parallel_size, param_shardings,
                              replicated)
from lmu_jax.train.checkpoint import abstract_like
from lmu_jax.train.optim import make_optimizer, make_schedule
from lmu_jax.train.step import eval_step, train_step

# Test hook, never part of a config: "<step>[:grad][:inf]" makes the loss and gradients of that step
# (1-based, as logged) NaN, or with ":grad" only its gradients, or with ":inf" Inf instead of NaN.
NONFINITE_ENV = "LMU_JAX_TEST_NONFINITE_STEP"


def check_batch(mesh: Mesh, rows: int, field: str = "train.batch_size", microbatches: int = 1) -> None:
    """A batch of ``rows`` sequences (config field ``field``) must split evenly over the mesh's
    data-parallel axes and over the processes (each builds its own rows), and so must each of its
    ``microbatches`` parts over the data-parallel axes."""
    dp, processes = data_parallel_size(mesh), jax.process_count()
    if rows % dp:
        raise bad_value(field, rows, f"a multiple of the data-parallel size {dp} (mesh.data x mesh.fsdp)")
    if (rows // microbatches) % dp:
        raise bad_value("train.microbatches", microbatches,
                        f"a value leaving microbatches of a multiple of {dp} sequences")
    if rows % processes:
        raise bad_value(field, rows, f"a multiple of the process count {processes}")


def rows_sharded(fn, mesh: Mesh):
    """(shapes, shardings) of the batch-leading pytree ``fn()`` makes, its rows over the data-parallel
    axes like the batch's: a carry."""
    shapes = jax.eval_shape(fn)
    return shapes, jax.tree.map(lambda x: batch_sharding(mesh, ndim=x.ndim), shapes)


class StateLayout:
    """A run's train state: shapes (``abstract``, with shardings), ``shardings``, ``optimizer``, and
    ``init_state`` (to jit with ``out_shardings=shardings``). Its ``"carry"`` is the run's
    (``lmu_jax.models.initial_carry``) for the global batch, rows sharded like it; empty for a run that
    carries none."""

    def __init__(self, cfg: RunConfig, mesh: Mesh):
        model_cfg = cfg.resolved_model()
        model = build_model(model_cfg)
        dummy = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, {}))["params"]
        p_shardings = param_shardings(boxed, mesh)
        p_shapes = nn.meta.unbox(boxed)
        self.optimizer = optimizer = make_optimizer(cfg.optim, cfg.train.steps)
        opt_shapes = jax.eval_shape(optimizer.init, p_shapes)
        o_shardings = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, p_shardings,
                                            transform_non_params=lambda _: replicated(mesh))
        fresh_carry = partial(initial_carry, model_cfg, cfg.data.order, cfg.train.batch_size)
        carry_shapes, carry_shardings = rows_sharded(fresh_carry, mesh)
        self.shardings = {"step": replicated(mesh), "params": p_shardings, "opt_state": o_shardings,
                          "carry": carry_shardings}
        self.abstract = abstract_like({"step": jax.ShapeDtypeStruct((), jnp.int32), "params": p_shapes,
                                       "opt_state": opt_shapes, "carry": carry_shapes}, self.shardings)
        seed = cfg.train.seed

        def init_state():
            params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), dummy, {}))["params"]
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
                    "carry": fresh_carry()}

        self.init_state = init_state


class Program:
    """The model, state layout and jitted steps of ``cfg`` on ``mesh``.

    ``cfg`` is taken with its ``auto`` speed settings made concrete for the mesh's platform
    (``resolve_auto``; the result is ``program.cfg``). The train step is ``train_step`` with everything
    but its arrays bound, jitted with explicit shardings and the state donated, so the jitted step takes
    only ``(state, batch[, starts])``; ``lower_train_step`` lowers that same jitted function for abstract
    inputs, so a compile ahead of time (the memory check, ``lmu-jax compile``) is the one the first step
    reuses."""

    def __init__(self, cfg: RunConfig, mesh: Mesh):
        self.mesh = mesh
        self.platform = mesh.devices.flat[0].platform
        self.cfg = cfg = resolve_auto(cfg, self.platform, data_parallel_size(mesh))
        check_batch(mesh, cfg.train.batch_size, microbatches=cfg.train.microbatches)
        self.seq_len = cfg.data.seq_len
        self.model_cfg = cfg.resolved_model()
        self.model = build_model(self.model_cfg)
        self.feeds_carry = feeds_carry(self.model_cfg, cfg.data.order)
        self.flops_per_token = model_flops_per_token(self.model_cfg, self.seq_len, feeds_carry=self.feeds_carry)
        self.tokens_per_step = cfg.train.batch_size * self.seq_len

        layout = StateLayout(cfg, mesh)
        check_sufficiently_sharded(layout.abstract["params"], layout.shardings["params"], mesh,
                                   cfg.mesh.sharding_tolerance)
        self.optimizer, self.state_shardings, self.abstract_state = layout.optimizer, layout.shardings, layout.abstract
        self.schedule = make_schedule(cfg.optim, cfg.train.steps)  # the optimizer's learning rate by step
        self.batch_sharding = batch_sharding(mesh)
        self.weight_sharding = batch_sharding(mesh, ndim=1)  # per-row flags: the rows whose stream starts
        self.init_state = jax.jit(layout.init_state, out_shardings=self.state_shardings)
        step = partial(_with_test_fault(train_step), apply_fn=self.model.apply, optimizer=self.optimizer,
                       microbatches=cfg.train.microbatches, seed=cfg.train.seed,
                       skip_nonfinite=cfg.train.nonfinite == "skip", schedule=self.schedule)
        inputs = (self.batch_sharding, self.weight_sharding) if self.feeds_carry else (self.batch_sharding,)
        self.train_step = jax.jit(step, in_shardings=(self.state_shardings, *inputs),
                                  out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=0)

    @cached_property
    def counts(self) -> dict:
        """Parameter counts: total, non_embedding, embedding (``flops.param_counts``)."""
        return param_counts(self.model_cfg, self.seq_len)

    def step_input_shapes(self) -> tuple:
        """The train step's arguments after the state, as shapes with shardings: the global batch of
        ``seq_len + 1`` token windows, and where the run carries state the rows whose stream starts."""
        rows = self.cfg.train.batch_size
        batch = jax.ShapeDtypeStruct((rows, self.seq_len + 1), jnp.int32, sharding=self.batch_sharding)
        if not self.feeds_carry:
            return (batch,)
        return batch, jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=self.weight_sharding)

    def lower_train_step(self):
        """The jitted train step lowered for abstract inputs, traced for the mesh's platform (kernels
        picked by platform are the target's, not this host's)."""
        with compiling_for(self.platform):
            return self.train_step.lower(self.abstract_state, *self.step_input_shapes())

    def eval_step(self, carry_sharding):
        """The jitted eval step (``step.eval_step``) on parameters sharded like the train state's, for a
        carry sharded as ``carry_sharding`` (``eval_carry``'s, or ``{}`` for the empty carry)."""
        return jax.jit(partial(eval_step, apply_fn=self.model.apply), donate_argnums=3,
                       in_shardings=(self.state_shardings["params"], self.batch_sharding, self.batch_sharding,
                                     carry_sharding),
                       out_shardings=(None, None, carry_sharding))

    def eval_carry(self, rows: int):
        """(jitted function making the evaluation's carry of ``rows`` fresh streams, its sharding): the
        family's evaluation carry (e.g. Transformer-XL's ``eval_mem_len``) where the run carries state,
        else the empty carry."""
        fresh = partial(initial_carry, self.model_cfg, self.cfg.data.order, rows, evaluation=True)
        _, sharding = rows_sharded(fresh, self.mesh)
        return jax.jit(fresh, out_shardings=sharding), sharding


def _with_test_fault(step_fn):
    """``step_fn`` itself, or, under ``LMU_JAX_TEST_NONFINITE_STEP``, one whose chosen step blows up."""
    spec = os.environ.get(NONFINITE_ENV, "")
    if not spec:
        return step_fn
    parts = spec.split(":")
    bad_step, value = int(parts[0]), jnp.inf if "inf" in parts else jnp.nan

    @jax.custom_vjp
    def poison_gradient(logits, poison):
        return logits

    poison_gradient.defvjp(lambda logits, poison: (logits, poison),
                           lambda poison, g: (g + poison, jnp.zeros_like(poison)))

    def poisoned(state, *batch, apply_fn, **kwargs):
        poison = jnp.where(state["step"] + 1 == bad_step, value, 0.0).astype(jnp.float32)
        poison_logits = (lambda x: poison_gradient(x, poison)) if "grad" in parts else (lambda x: x + poison)

        def apply(*args, **kw):
            logits, carry = apply_fn(*args, **kw)
            return poison_logits(logits), carry

        return step_fn(state, *batch, apply_fn=apply, **kwargs)

    return poisoned
