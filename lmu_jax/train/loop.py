"""The Trainer: one training loop for every family, through the model interface only.

config -> program (mesh, model, shardings, jitted steps: lmu_jax/train/builder.py) -> data cache ->
resume or init -> steps -> delayed metrics -> checkpoints -> eval -> DONE. See docs/architecture.md,
"The data flow of a run".

The carry (Transformer-XL memory, QRNN cells): a family declares one (``Family.initial_carry``); a run
on ``data.order=streams`` then keeps it in the train state as ``"carry"`` (sharded like the batch,
checkpointed, so a resume is bitwise the uninterrupted run), feeds it to every step and resets the rows
where a stream starts; every other run's carry is the empty one. The trainer names no family.
``train.init_from`` starts a run from another run's parameters (training by phases, e.g. SCH-TXL phase 2
after phase 1); ``train.branch_from`` continues a wsd run's checkpoint with its optimizer state and step
to a shorter horizon (a cooldown branch).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from etils import epath

from lmu_jax import distributed, storage
from lmu_jax.config import RunConfig, config_from_dict, read_yaml, run_id
from lmu_jax.data.pipeline import StreamBatcher, WindowBatcher, prepare, to_global_array
from lmu_jax.errors import UserError, bad_value
from lmu_jax.flops import kaplan_flops_per_token
from lmu_jax.metrics import LEVEL_WINDOW, SPIKE_NATS, MetricsWriter, peak_flops_total
from lmu_jax.models import data_order
from lmu_jax.sharding import make_mesh
from lmu_jax.train import memory_check
from lmu_jax.train.builder import Program, StateLayout
from lmu_jax.train.checkpoint import Checkpointer
from lmu_jax.train.evaluate import Evaluator
from lmu_jax.train.optim import cooldown_start
from lmu_jax.train.rundir import RunDir

log = logging.getLogger("lmu_jax")


class NonFiniteLoss(Exception):
    """The loss or gradient norm became NaN/Inf (policy ``train.nonfinite=stop``)."""


def open_data(cfg: RunConfig):
    """Process 0 tokenizes first (once, cached); then every other process opens the cache, making it
    on its own host's disk when that host has none (pod hosts do not share disks)."""
    what = f"data.corpus={cfg.data.corpus!r}"
    cache = on_main_agreed(lambda: prepare(cfg.data), what)
    return distributed.agreed(lambda: cache if cache is not None else prepare(cfg.data), what)


class StepInputs:
    """``inputs(step)``: the train step's arguments after the state, as global arrays (each process
    builds its own rows): the batch of ``program.step_input_shapes()``, and where the run carries state the
    rows whose stream starts at this step. A pure function of the step, from the run's batcher."""

    def __init__(self, program: Program, cache):
        cfg = program.cfg
        self.program = program
        if data_order(program.model_cfg, cfg.data.order) == "streams":
            self.batcher = StreamBatcher(cache.tokens("train"), cfg.data.seq_len, cfg.train.batch_size)
        else:
            self.batcher = WindowBatcher(cache.tokens("train"), cfg.data.seq_len, cfg.train.batch_size,
                                         cfg.train.seed)

    def __call__(self, step: int) -> tuple:
        where, program = (step, jax.process_index(), jax.process_count()), self.program
        batch = to_global_array(self.batcher.local_batch(*where), program.batch_sharding)
        if not program.feeds_carry:
            return (batch,)
        return batch, to_global_array(self.batcher.local_starts(*where), program.weight_sharding)


def open_program(cfg: RunConfig, devices=None, run: RunDir | None = None) -> tuple[Program, object]:
    """(the program of ``cfg`` on a mesh of ``devices``, the data cache it reads), agreed on by every
    process: mesh, config (as given) and data. With ``run``, the ``auto`` settings that run already
    chose are kept. The tokenizer's vocabulary must fit the model's."""
    program = Program(run.with_earlier_choices(cfg) if run else cfg, make_mesh(cfg.mesh, devices))
    distributed.check_agreement({"mesh shape": dict(program.mesh.shape), "config (run id)": run_id(cfg)})
    cache = open_data(program.cfg)
    distributed.check_agreement({"data fingerprint": cache.fingerprint})
    if program.model_cfg.vocab_size < cache.vocab_size:
        raise bad_value("model.vocab_size", program.model_cfg.vocab_size,
                        f"0 or at least the tokenizer's vocabulary {cache.vocab_size}")
    return program, cache


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir, devices=None):
        self.run = RunDir(run_dir)
        # the run id of the config as given (a sweep's planned id); the program then makes the `auto`
        # settings concrete (those this run already chose kept): config.yaml and the checkpoints hold them
        self.run_id = run_id(cfg)
        self.program, self.cache = open_program(cfg, devices, self.run)
        self.cfg = self.program.cfg
        given, used = cfg.to_dict(), self.cfg.to_dict()  # what `auto` became: metrics.jsonl says it too
        self.chosen = {f"{section}.{key}": value for section, values in used.items()
                       for key, value in values.items() if given[section].get(key) != value}
        self.inputs = StepInputs(self.program, self.cache)
        self.evaluator = Evaluator(self.program, self.cache)

    def check_memory(self) -> None:
        """Refuse a run that cannot fit on its devices before anything is allocated
        (lmu_jax/train/memory_check.py); process 0 decides for all."""
        memory_check.check_run(self.program, lambda check: on_main_agreed(check, "the memory check"))

    def fresh_state(self):
        """The state at step 0: initialised, or with ``train.init_from``'s parameters (training by phases;
        the optimizer, step and carry stay fresh). The source is checked before anything compiles."""
        if self.cfg.train.branch_from:
            return self.branch_state()
        source = self.cfg.train.init_from
        if not source:
            return self.program.init_state()
        run_dir, step = _checkpoint_source(source)
        source_cfg = config_from_dict(read_yaml(run_dir / "config.yaml"))
        layout = StateLayout(source_cfg, self.program.mesh)
        shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
        if shapes(layout.abstract["params"]) != shapes(self.program.abstract_state["params"]):
            raise bad_value("train.init_from", source, "a run whose model has this run's parameter shapes")
        state = self.program.init_state()
        ckpt = Checkpointer(run_dir / "checkpoints", source_cfg.checkpoint, read_only=True)
        try:
            if step is None:
                restored, meta = ckpt.restore_latest(layout.abstract)
                if restored is None:
                    raise bad_value("train.init_from", source, "a run directory with a checkpoint")
            else:
                restored, meta = ckpt.restore(step, layout.abstract)
        finally:
            ckpt.close()
        if distributed.is_main_process():
            print(f"starting from the parameters of {run_dir} at step {meta['step']} (train.init_from)")
        return dict(state, params=jax.device_put(restored["params"], self.program.state_shardings["params"]))

    def branch_state(self):
        """``train.branch_from``'s checkpoint as this run's state, optimizer state and step included: a
        cooldown branch. Its parent must be this run with a longer horizon (same model, data, optimizer,
        seed and batch; schedule wsd) and the checkpoint must lie in the stable phase of both, where the
        two schedules agree; the branch then cools down to its own horizon."""
        cfg, source = self.cfg, self.cfg.train.branch_from
        relative = not storage.is_remote(source) and not os.path.isabs(source)
        run_dir, step = _checkpoint_source(str(self.run.path.parent / source) if relative else source,
                                           "train.branch_from")
        if step is None:
            raise bad_value("train.branch_from", source, "one checkpoint of a run, <run>/checkpoints/<step>")
        if cfg.optim.schedule != "wsd":
            raise bad_value("optim.schedule", cfg.optim.schedule, "wsd for a cooldown branch (train.branch_from)")
        parent = config_from_dict(read_yaml(run_dir / "config.yaml"))
        defining = lambda c: (c.model, c.data, c.optim, c.train.seed, c.train.batch_size,  # noqa: E731
                              c.train.microbatches)
        if defining(parent) != defining(cfg):
            raise bad_value("train.branch_from", source, "a checkpoint of a run with this run's model, data, "
                            "optimizer, seed and batch (only train.steps may differ)")
        last_stable = min(cooldown_start(cfg.optim, cfg.train.steps), cooldown_start(parent.optim, parent.train.steps))
        if not cfg.optim.warmup_steps <= step <= last_stable:
            raise bad_value("train.branch_from", source, f"a checkpoint between the warmup ({cfg.optim.warmup_steps} "
                            f"steps) and the start of this run's and its parent's cooldown (step {last_stable})")
        ckpt = Checkpointer(run_dir / "checkpoints", parent.checkpoint, read_only=True)
        try:
            state, meta = ckpt.restore(step, self.program.abstract_state)
        finally:
            ckpt.close()
        if meta.get("data_fingerprint") != self.cache.fingerprint:
            raise bad_value("train.branch_from", source, f"a run trained on this run's data {self.cache.fingerprint}")
        if distributed.is_main_process():
            print(f"branching from {run_dir} at step {step} with its optimizer state; cooling down to step "
                  f"{cfg.train.steps} (train.branch_from)")
        return state

    def meta(self) -> dict:
        return {"run_id": self.run_id, "data_fingerprint": self.cache.fingerprint,
                "config": self.cfg.to_dict()}

    # -- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, params, whole_split: bool = False) -> dict:
        """Loss, bits per token/byte and per-position loss over the fixed validation windows; with
        ``whole_split`` also ``split_eval``, the whole split scored once (lmu_jax/train/evaluate.py)."""
        result = self.evaluator.windows(params)
        if whole_split:
            result["split_eval"] = self.evaluator.split(params)
        return result

    # -- the loop -----------------------------------------------------------------------------------

    def train(self) -> dict:
        """Train or resume in the run directory. A launch that fails with a UserError before its first
        step removes a run directory it created itself: no half-made runs (config.yaml, lock, ...)."""
        cfg, run = self.cfg, self.run
        if run.done:
            on_main_agreed(lambda: run.check_config(cfg), f"--run-dir {run.path}")
            if distributed.is_main_process():
                print(f"run {run.path} is finished (DONE); leaving it alone")
            return {"status": "done-before"}
        main = distributed.is_main_process()
        # the lock and the config check first (a second launch is refused at once), then the memory check,
        # whose compile takes a while; a run directory made for a run that does not fit is removed below
        created = on_main_agreed(lambda: run.open(cfg), f"--run-dir {run.path}")
        self._started = False
        try:
            self.check_memory()
            return self._train_locked()
        except UserError:
            if main and created and not self._started:
                run.remove()  # while still holding the lock
            raise
        finally:
            if main:
                run.release_lock()

    def _train_locked(self) -> dict:
        cfg, run = self.cfg, self.run
        main = distributed.is_main_process()
        ckpt = writer = progress = preemption = None
        self.step_reached = 0
        try:
            ckpt = Checkpointer(run.checkpoints, cfg.checkpoint)
            state, meta = ckpt.restore_latest(self.program.abstract_state, set_aside_unusable=True)
            if state is not None and meta.get("data_fingerprint") != self.cache.fingerprint:
                raise UserError(f"--run-dir {run.path} was trained on data {meta.get('data_fingerprint')}, "
                                f"this run reads {self.cache.fingerprint}; use the same data or a new --run-dir")
            if state is None:
                state = self.fresh_state()
            start = self.step_reached = int(jax.device_get(state["step"]))
            state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.program.abstract_state))
            on_main_agreed(lambda: run.check_free_space(state_bytes, cfg.checkpoint.keep), "--run-dir")
            if main and start:
                print(f"resuming {run.path} from step {start}")
            writer = MetricsWriter(run.path, resume_step=start, tensorboard=cfg.log.tensorboard)
            progress = _progress_bar(main and cfg.log.progress, start, cfg.train.steps)
            # only now: until the first step there is nothing to save, and a SIGTERM keeps its default
            # action, ending the process at once even inside a long call (a restore, an initialisation)
            preemption = Preemption()
            self._started = True
            return self._loop(state, start, ckpt, writer, preemption, progress)
        except OSError as err:  # metrics or run files: say where, and what survives
            if ckpt is not None:
                ckpt.settle()
            raise UserError(f"I/O error in --run-dir {run.path} after step {self.step_reached} ({err}); "
                            f"{_last_good_text(ckpt)}") from err
        finally:
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()
            if ckpt is not None:
                ckpt.close()
            if preemption is not None:
                preemption.close()

    def _loop(self, state, start: int, ckpt: Checkpointer, writer: MetricsWriter, preemption, progress) -> dict:
        cfg, run, program = self.cfg, self.run, self.program
        main = distributed.is_main_process()
        peak, peak_source = peak_flops_total()
        pending = None  # (step, metrics on device): fetched one step late so the host never stalls
        last_time = time.perf_counter()
        recent = collections.deque(maxlen=LEVEL_WINDOW)  # the last finite losses: their median is the level, and a
        #                                                   step far above it is logged (an excursion, stability.py)
        writer.write({"kind": "settings", "step": start, "platform": program.platform, "chosen": self.chosen})

        def flush(pending_item):
            nonlocal last_time
            step_no, metrics = pending_item
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            dt, last_time = now - last_time, now
            loss, finite = float(metrics["loss"]), bool(metrics["finite"])
            if not finite and cfg.train.nonfinite == "stop":
                ckpt.settle()  # so that the message names a checkpoint known to be good
                raise NonFiniteLoss(f"non-finite loss or gradient at step {step_no} (loss {loss}, grad_norm "
                                    f"{float(metrics['grad_norm'])}; train.nonfinite=stop); "
                                    f"{ckpt.last_good_text()}")
            if not finite and main:
                log.warning("step %d: non-finite loss or gradient (loss %s, grad_norm %s); its update was skipped "
                            "(train.nonfinite=skip)", step_no, loss, float(metrics["grad_norm"]))
            tokens = step_no * program.tokens_per_step
            record = {
                "kind": "train", "step": step_no, "loss": loss, "lr": float(metrics["lr"]),
                "grad_norm": float(metrics["grad_norm"]), "finite": finite, "tokens": tokens,
                "flops_model": tokens * program.flops_per_token,
                "flops_6n": tokens * kaplan_flops_per_token(program.counts["non_embedding"]),
                "step_time": dt, "tokens_per_s": program.tokens_per_step / dt,
                "mfu": program.tokens_per_step * program.flops_per_token / dt / peak,
            }
            if recent:
                record["level"] = float(np.median(recent))
            spike = bool(recent) and loss > record["level"] + SPIKE_NATS
            if finite:
                recent.append(loss)
            if step_no % cfg.log.every == 0 or step_no == cfg.train.steps or not finite or spike:
                writer.write(record)  # every skipped update and every excursion, whatever log.every says
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")

        step = start
        profiling = False
        while step < cfg.train.steps:
            if cfg.train.profile_steps and step == start + 2 and main:
                jax.profiler.start_trace(str(run.path / "profile"))
                profiling = True
            state, metrics = program.train_step(state, *self.inputs(step))
            step = self.step_reached = step + 1
            if pending is not None:
                flush(pending)
            pending = (step, metrics)
            if profiling and step >= start + 2 + cfg.train.profile_steps:
                jax.profiler.stop_trace()
                profiling = False
            is_last = step == cfg.train.steps
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and not is_last:
                flush(pending)
                pending = None
                writer.write({"kind": "eval", "step": step, **_summary(self.evaluate(state["params"]))})
            stop = preemption(step)
            checkpoint_now = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or is_last \
                or step in cfg.checkpoint.at
            if checkpoint_now or stop:
                if pending is not None:  # never checkpoint a state whose loss we have not checked
                    flush(pending)
                    pending = None
                # a remote metrics.jsonl is uploaded before the checkpoint can commit, so it is never
                # behind one (a resume drops the lines past the step it restores)
                writer.sync()
                ckpt.save(state, self.meta())
            if stop and not is_last:
                ckpt.wait()
                if main:
                    print(f"SIGTERM: saved a checkpoint at step {step} in {run.path}; exiting. "
                          "Run the same command again to resume.", flush=True)
                return {"status": "preempted", "step": step}
        if pending is not None:
            flush(pending)
        ckpt.wait()  # DONE only once the final checkpoint is written and read back
        result = self.evaluate(state["params"], whole_split=True)
        result.update(step=step, tokens=step * program.tokens_per_step, params=program.counts,
                      flops_per_token=program.flops_per_token, flops_model=step * program.tokens_per_step
                      * program.flops_per_token, family=program.model_cfg.family, run_id=self.run_id,
                      peak_flops=peak, peak_source=peak_source)
        # "final": a resume after this line (killed before DONE) evaluates again and replaces it
        writer.write({"kind": "eval", "step": step, "final": True, **_summary(result)})
        if main:
            run.write_eval(result)
            run.mark_done({"step": step, "loss": result["loss"]})
        distributed.barrier("run-done")
        self.final_state = state
        return {"status": "done", **result}


class Preemption:
    """``preemption(step)``: should the run checkpoint and stop after this step?

    One process: a SIGTERM handler sets a flag. Several: jax's preemption service (it owns SIGTERM
    after ``jax.distributed.initialize``) agrees on one step at which every process stops, so that
    they all save the same step and no collective is left waiting for a process that has gone."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and _in_main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_):
        self.requested = True

    def __call__(self, step: int) -> bool:
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service (jax_enable_preemption_service off)
                return False
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def on_main_agreed(fn, what: str):
    """``fn()`` on process 0 only; a UserError there stops every process, so none is left waiting at a
    barrier for process 0. Returns ``fn()``'s value on process 0, None elsewhere."""
    result, failure = None, None
    if distributed.is_main_process():
        try:
            result = fn()
        except UserError as err:
            failure = err
    if distributed.broadcast_from_main(np.int32(failure is not None)):
        raise failure or UserError(f"{what} failed on process 0; see its message")
    return result


def _last_good_text(ckpt: Checkpointer | None) -> str:
    return "the last good checkpoint is none" if ckpt is None else ckpt.last_good_text()


def _checkpoint_source(source: str, field: str = "train.init_from") -> tuple[epath.Path, int | None]:
    """``train.init_from`` (or ``field``) -> (run directory, checkpoint step or None for its newest good one)."""
    path = storage.path(source, field)
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        return path, None
    if path.name.isdigit() and path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file() \
            and path.is_dir():
        return path.parent.parent, int(path.name)
    raise bad_value(field, source, "a run directory (config.yaml, checkpoints/) or one of its "
                    "checkpoints, <run>/checkpoints/<step>")


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("loss", "bits_per_token", "bits_per_byte")}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                disable=None)
