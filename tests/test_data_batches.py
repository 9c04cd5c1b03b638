"""The determinism contract for batches: windows, the per-epoch permutation, per-process slices; ordered
streams for carried state; the whole-split evaluation layouts (streams, sliding windows)."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmu_jax.data.pipeline import (StreamBatcher, WindowBatcher, check_rows_line_up, sliding_window_batches,
                                   stream_eval_batches, to_global_array, validation_windows, word_count)
from lmu_jax.errors import UserError


def token_ramp(n_windows: int, seq_len: int) -> np.ndarray:
    """Token i has value i, so a window's first token tells which window it is."""
    return np.arange(n_windows * seq_len + 1, dtype=np.uint16)


def test_windows_overlap_by_one_token_for_input_and_target():
    batcher = WindowBatcher(token_ramp(10, 4), seq_len=4, global_batch=3, seed=0)
    rows = batcher.local_batch(0, 0, 1)
    assert rows.dtype == np.int32 and rows.shape == (3, 5)
    ids = batcher.window_ids(0)
    np.testing.assert_array_equal(rows, ids[:, None] * 4 + np.arange(5))  # window w = tokens[4w : 4w + 5]
    assert batcher.windows_per_epoch == 10


def test_window_ids_are_a_pure_function_of_seed_and_step():
    a = WindowBatcher(token_ramp(1000, 2), 2, 16, seed=7)
    b = WindowBatcher(token_ramp(1000, 2), 2, 16, seed=7)
    steps = [0, 5, 300, 62, 5, 0, 1000]
    first = [a.window_ids(s) for s in steps]
    second = [b.window_ids(s) for s in reversed(steps)][::-1]  # another order, another object
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.window_ids(3), WindowBatcher(token_ramp(1000, 2), 2, 16, seed=8).window_ids(3))
    assert not np.array_equal(a.window_ids(0), a.window_ids(63))  # epoch 1 is shuffled differently


def test_a_batch_may_straddle_two_epochs():
    batcher = WindowBatcher(token_ramp(5, 3), 3, global_batch=4, seed=1)
    step1 = batcher.window_ids(1)  # positions 4..7: the last of epoch 0, three of epoch 1
    assert step1[0] == batcher.permutation(0)[4]
    np.testing.assert_array_equal(step1[1:], batcher.permutation(1)[:3])


@settings(max_examples=60, deadline=None)
@given(n_windows=st.integers(1, 60), local=st.integers(1, 6), process_count=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**32), seq_len=st.integers(1, 4))
def test_every_window_once_per_epoch_and_processes_tile_the_batch(n_windows, local, process_count, seed, seq_len):
    batch = local * process_count
    batcher = WindowBatcher(token_ramp(n_windows, seq_len), seq_len, batch, seed)
    steps = -(-3 * n_windows // batch)  # enough steps to cover three epochs
    flat = np.concatenate([batcher.window_ids(s) for s in range(steps)])
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(flat[epoch * n_windows:(epoch + 1) * n_windows]), np.arange(n_windows))
    for step in (0, steps - 1):
        rows = np.concatenate([batcher.local_batch(step, p, process_count) for p in range(process_count)])
        np.testing.assert_array_equal(rows, WindowBatcher(token_ramp(n_windows, seq_len), seq_len, batch, seed)
                                      .local_batch(step, 0, 1))
        np.testing.assert_array_equal(rows[:, 0], batcher.window_ids(step) * seq_len)


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="data.seq_len=8 is invalid"):
        WindowBatcher(np.arange(8), 8, 2, 0)
    with pytest.raises(UserError, match="train.batch_size=6 is invalid: a multiple of the process count 4"):
        WindowBatcher(np.arange(100), 8, 6, 0).local_batch(0, 0, 4)
    with pytest.raises(UserError, match="train.seed=-1"):
        WindowBatcher(np.arange(100), 8, 6, -1)
    with pytest.raises(UserError, match="data.seq_len=16 is invalid: at most 9"):
        validation_windows(np.arange(10), 16, 4)


def test_validation_windows_are_fixed_and_spread_over_the_split():
    tokens = token_ramp(100, 4)
    windows = validation_windows(tokens, 4, 10)
    assert windows.shape == (10, 5) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows[:, 0] // 4, np.arange(0, 100, 10))
    np.testing.assert_array_equal(windows, validation_windows(tokens, 4, 10))
    assert len(validation_windows(tokens, 4, 1000)) == 100  # never more than the split holds


def test_global_batch_on_eight_devices_equals_the_local_rows():
    """One process, 8 fake CPU devices, the trainer's batch sharding: device k holds rows [2k, 2k+2)."""
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices).reshape(4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    batcher = WindowBatcher(token_ramp(200, 8), 8, 16, seed=3)
    rows = batcher.local_batch(5, jax.process_index(), jax.process_count())
    batch = to_global_array(rows, sharding)
    assert batch.shape == (16, 9) and batch.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(batch), rows)
    for shard in batch.addressable_shards:
        k = devices.index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), rows[2 * k:2 * k + 2])


def test_rows_line_up_with_the_devices_each_process_owns():
    """Pretend devices 0-3 belong to process 0 and 4-7 to process 1 (as jax.devices() orders them)."""
    def process_of(device):
        return device.id // 4

    in_order = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(in_order, P(("data", "fsdp"), None))
    for p in (0, 1):
        check_rows_line_up(sharding, (16, 9), p, process_of)
    shuffled = np.array(jax.devices())[[0, 4, 1, 5, 2, 6, 3, 7]].reshape(4, 2)  # processes interleaved
    bad = NamedSharding(Mesh(shuffled, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2), P(("data", "fsdp"), None))
    with pytest.raises(ValueError, match="process 0's devices hold batch rows"):
        check_rows_line_up(bad, (16, 9), 0, process_of)


# ---------------------------------------------------------------------------------------------
# Ordered streams (data.order=streams) and the whole-split evaluation layouts


@settings(max_examples=40, deadline=None)
@given(n_segments=st.integers(1, 40), local=st.integers(1, 4), process_count=st.sampled_from([1, 2]),
       seq_len=st.integers(1, 4), tail=st.integers(0, 3))
def test_streams_are_contiguous_and_reset_only_where_they_wrap(n_segments, local, process_count, seq_len, tail):
    batch = local * process_count
    if n_segments < batch:  # every row needs a stream of at least one segment
        with pytest.raises(UserError, match="train.batch_size"):
            StreamBatcher(np.arange(n_segments * seq_len + 1), seq_len, batch)
        return
    tokens = np.arange(n_segments * seq_len + 1 + tail, dtype=np.uint16)  # token i is i
    batcher = StreamBatcher(tokens, seq_len, batch)
    per_stream = batcher.segments_per_stream
    steps = 3 * per_stream  # three epochs
    firsts = []
    for step in range(steps):
        rows = np.concatenate([batcher.local_batch(step, p, process_count) for p in range(process_count)])
        starts = np.concatenate([batcher.local_starts(step, p, process_count) for p in range(process_count)])
        np.testing.assert_array_equal(rows[:, 1:] - rows[:, :-1], 1)  # a window of the text
        if step:  # each row continues its text, except where it starts a new stream (fresh state)
            continues = rows[:, 0] == previous[:, -1]
            np.testing.assert_array_equal(continues, ~starts)
            assert starts.sum() <= 1  # only the row that wraps from the end of the text to its start
        else:
            assert starts.all()
        previous = rows
        firsts.append(rows[:, 0])
    for epoch in range(3):  # every segment once per epoch
        seen = np.concatenate(firsts[epoch * per_stream:(epoch + 1) * per_stream])
        np.testing.assert_array_equal(np.sort(seen), np.arange(batch * per_stream) * seq_len)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 80), streams=st.integers(1, 9), seg_len=st.integers(1, 9))
def test_stream_evaluation_scores_every_target_once_in_order(n, streams, seg_len):
    tokens = np.arange(n)
    if streams > n - 1:
        with pytest.raises(UserError, match="eval.streams"):
            next(stream_eval_batches(tokens, streams, seg_len))
        return
    scored = [[] for _ in range(streams)]
    for rows, mask in stream_eval_batches(tokens, streams, seg_len):
        assert rows.shape == (streams, seg_len + 1) and mask.shape == (streams, seg_len)
        np.testing.assert_array_equal(np.where(mask, rows[:, 1:] - rows[:, :-1], 1), 1)
        for b in range(streams):
            scored[b] += list(rows[b, 1:][mask[b]])
    assert sum(scored, []) == list(range(1, n))  # stream b's targets follow stream b-1's, each once


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 80), seq_len=st.integers(1, 12), stride=st.integers(1, 12), batch=st.integers(1, 5))
def test_sliding_windows_score_every_target_once_with_context(n, seq_len, stride, batch):
    if seq_len > n - 1 or stride > seq_len:
        return
    tokens, scored = np.arange(n), []
    for rows, mask in sliding_window_batches(tokens, seq_len, stride, batch):
        assert rows.shape == (batch, seq_len + 1)
        for row, keep in zip(rows, mask):
            positions = np.flatnonzero(keep)
            if scored and len(positions):  # after the first window: at least seq_len - stride tokens of context
                assert positions[0] >= seq_len - stride
            scored += list(row[1:][keep])
    assert scored == list(range(1, n))


def test_word_count_counts_words_and_line_ends():
    assert word_count(b"In the beginning\nGod  created\x1ethe heaven\n") == 7 + 3
