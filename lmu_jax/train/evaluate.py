"""Evaluation of a run's parameters: the fixed validation windows (every evaluation) and, at the end, the
whole split (eval.json's ``split_eval``).

``windows``: ``data.val_windows`` windows of ``data.seq_len`` spread evenly over the validation split, each
from the empty carry: mean loss, bits per token and byte, loss at each position (one curve per run, the
same windows every time, so evaluations during training are comparable).

``split``: every target of ``eval.split`` (or of its first ``eval.max_tokens``) scored exactly once, by one
of two protocols (docs/architectures.md, evaluation protocols), chosen by how the run trained:

- ``memory``: a run that feeds its family's carry (Transformer-XL, SCH-TXL, QRNN hybrids on
  ``data.order=streams``) reads the split as ``eval.streams`` contiguous streams in parallel, each from a
  fresh carry, in segments of ``eval.seg_len``, with the family's evaluation carry
  (``initial_carry(..., evaluation=True)``: Transformer-XL's ``eval_mem_len``; its ``same_length`` and
  ``clamp_len`` act at evaluation by themselves);
- ``sliding_window``: every other run, windows of ``data.seq_len`` every ``eval.stride`` tokens, each
  scoring the targets the previous one did not (so each with >= seq_len − stride tokens of context).

Reported: loss in nats per token, bits per token, bits per byte of the scored text (= bits per
character on enwik8/text8), token perplexity, and with ``eval.word_level`` the perplexity per word
exp(total nats / words), words counted by ``lmu_jax.data.pipeline.word_count``. The windows start from
the empty carry; a run that carries none scores the split with that same jitted step, so it compiles once.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from lmu_jax.data.pipeline import (process_rows, sliding_window_batches, stream_eval_batches, to_global_array,
                                   validation_windows, word_count)
from lmu_jax.errors import bad_value
from lmu_jax.train.builder import check_batch


class Evaluator:
    def __init__(self, program, cache):
        """``program``: the run's (lmu_jax/train/builder.py), whose jitted eval step this runs."""
        cfg = program.cfg
        self.cfg, self.model_cfg, self.cache = cfg, program.model_cfg, cache
        ev, seq_len = cfg.eval, cfg.data.seq_len
        self.feeds_carry = program.feeds_carry
        self.rows = program.batch_sharding
        self.split_batch = (ev.streams or cfg.train.batch_size) if self.feeds_carry else cfg.train.batch_size
        check_batch(program.mesh, self.split_batch, "eval.streams")
        self.length = (ev.seg_len or seq_len) if self.feeds_carry else seq_len
        self.stride = ev.stride or max(1, seq_len // 2)
        tokens = cache.tokens(ev.split)
        self.split_tokens = tokens[:ev.max_tokens + 1] if ev.max_tokens else tokens
        if len(self.split_tokens) < self.length + 1:
            raise bad_value("eval.max_tokens" if ev.max_tokens else "eval.split", ev.max_tokens or ev.split,
                            f"a split or a cap of at least {self.length} targets (one window of the evaluation)")
        self.window_step = program.eval_step({})
        self.split_carry, carry_sharding = program.eval_carry(self.split_batch)
        self.split_step = program.eval_step(carry_sharding) if self.feeds_carry else self.window_step

    def _scored(self, step, params, batches, batch: int, carry) -> tuple[np.ndarray, np.ndarray]:
        """Loss summed at each position over the scored rows of all batches (through the jitted eval
        ``step``, from ``carry``), and the counts there."""
        mine = process_rows(batch, jax.process_index(), jax.process_count())
        sums = counts = 0.0
        for rows, mask in batches:
            loss_sums, scored, carry = step(params, to_global_array(rows[mine], self.rows),
                                            to_global_array(mask[mine], self.rows), carry)
            sums = sums + np.asarray(jax.device_get(loss_sums), np.float64)
            counts = counts + np.asarray(jax.device_get(scored), np.int64)
        return sums, counts

    def windows(self, params) -> dict:
        """Mean loss, bits per token/byte and per-position loss over the fixed validation windows."""
        seq_len, batch = self.cfg.data.seq_len, self.cfg.train.batch_size
        windows = validation_windows(self.cache.tokens("validation"), seq_len, self.cfg.data.val_windows)
        count = len(windows)
        padded = math.ceil(count / batch) * batch
        windows = np.concatenate([windows, np.repeat(windows[:1], padded - count, axis=0)])
        mask = np.repeat((np.arange(padded) < count)[:, None], seq_len, axis=1)  # padding rows score nothing
        sums, counts = self._scored(self.window_step, params, ((windows[i:i + batch], mask[i:i + batch])
                                                               for i in range(0, padded, batch)), batch, {})
        per_position = sums / counts
        loss = float(per_position.mean())
        bits_per_token = loss / math.log(2)
        return {"loss": loss, "bits_per_token": bits_per_token,
                "bits_per_byte": bits_per_token / self.cache.bytes_per_token("validation"),
                "windows": count, "per_position_loss": [round(float(x), 6) for x in per_position]}

    def split(self, params) -> dict:
        """The whole split, every target once (module docstring)."""
        if self.feeds_carry:
            batches = stream_eval_batches(self.split_tokens, self.split_batch, self.length)
        else:
            batches = sliding_window_batches(self.split_tokens, self.length, self.stride, self.split_batch)
        sums, counts = self._scored(self.split_step, params, batches, self.split_batch, self.split_carry())
        nats, targets = float(sums.sum()), int(counts.sum())
        loss = nats / targets
        text = self.cache.tokenizer().decode(np.asarray(self.split_tokens[1:]))  # the scored targets
        result = {"protocol": "memory" if self.feeds_carry else "sliding_window", "split": self.cfg.eval.split,
                  "targets": targets, "loss": loss, "bits_per_token": loss / math.log(2),
                  "bits_per_byte": nats / math.log(2) / len(text), "perplexity": math.exp(loss)}
        if self.feeds_carry:
            # the result states its evaluation context
            result.update(streams=self.split_batch, segment_length=self.length, **self.model_cfg.eval_context())
        else:
            result.update(context=self.length, stride=self.stride)
        if self.cfg.eval.word_level:
            words = word_count(text)
            result.update(words=words, word_perplexity=math.exp(nats / words))
        return result
