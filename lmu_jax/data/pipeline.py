"""Token cache and batches: corpus -> tokenizer -> memmap on disk -> deterministic windows -> jax.Array.

    cache = prepare(cfg.data)                  # tokenize once (idempotent); every host of a pod calls it
    batcher = WindowBatcher(cache.tokens("train"), seq_len, global_batch, seed)
    rows = batcher.local_batch(step, jax.process_index(), jax.process_count())
    batch = to_global_array(rows, batch_sharding)

Cache layout (``~`` expanded)::

    <cache_dir>/<corpus-key>/sentencepiece-<type>-<V>.model   trained tokenizer (sentencepiece only)
    <cache_dir>/<corpus-key>/<tokenizer-key>/{train,validation[,test]}.bin + meta.json

The corpus key is the corpus name plus a hash of the settings that decide its text
(``corpora.corpus_identity``); the tokenizer key is ``byte`` or ``sentencepiece-<type>-<V>``. ``meta.json``
records the format version, the corpus content hash, the tokenizer fingerprint and token/byte counts;
it is written last (inside a temporary directory that is renamed into place; on an object store in
place), so a killed ``prepare`` never leaves a cache that looks complete. A cache whose tokenizer
fingerprint differs from the tokenizer this run would use is refused.

Where the cache lives: on a pod every host has its own disk, so every process calls ``prepare``; the
processes of one host take turns (a ``flock`` on ``<corpus-key>/.prepare.lock``), so the first makes
the cache and the others open it. A remote ``data.cache_dir`` (``gs://...``) is made once, there, and
each host copies it into a local mirror (``storage.local_mirror``) to memory-map it; the mirror is
refreshed whenever its ``meta.json`` differs from the remote one.

Batches (the determinism contract): windows are ``seq_len + 1`` tokens at stride ``seq_len``
(input w[:-1], target w[1:]). Global position j = step * global_batch + i is window
``perm(epoch)[j % W]`` with epoch = j // W, where perm is numpy's ``Generator(PCG64(SeedSequence([seed,
epoch]))).permutation(W)``: every window once per epoch, a batch may straddle two epochs, and a
batch is a pure function of (seed, step) -- resuming needs no replay. The permutation costs O(W)
time and 8 bytes per window once per epoch (cached); that is fine up to ~1e8 windows. NumPy does not
promise to keep Generator streams identical across its releases: resume with the same numpy.

``data.order=streams`` (``StreamBatcher``) instead gives every batch row a contiguous stream, segment
after segment, for families that carry state (Transformer-XL memory, QRNN cells); it also says which
rows start a new stream at a step. Evaluation over a whole split: ``stream_eval_batches`` (contiguous
streams, every target once) and ``sliding_window_batches`` (overlapping windows at a stride, every
target once); both yield (rows, scored-position mask) batches.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from collections import OrderedDict

import jax
import numpy as np
from etils import epath

from lmu_jax import storage
from lmu_jax.config import DataConfig
from lmu_jax.data.corpora import DOCUMENT_SEPARATOR, corpus_identity, read_corpus
from lmu_jax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, token_dtype,
                                     train_sentencepiece)
from lmu_jax.errors import UserError, bad_value

FORMAT_VERSION = 1  # bump when the layout or meaning of a cache changes
META = "meta.json"


# ---------------------------------------------------------------------------------------------
# Where things live


def cache_root(cfg: DataConfig) -> epath.Path:
    return storage.path(cfg.cache_dir, "data.cache_dir")


def corpus_key(cfg: DataConfig) -> str:
    identity = json.dumps(corpus_identity(cfg), sort_keys=True)
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in cfg.corpus)[:48]
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def tokenizer_key(cfg: DataConfig) -> str:
    return "byte" if cfg.tokenizer == "byte" else f"sentencepiece-{cfg.sp_model_type}-{cfg.sp_vocab_size}"


def cache_path(cfg: DataConfig) -> epath.Path:
    return cache_root(cfg) / corpus_key(cfg) / tokenizer_key(cfg)


def sentencepiece_path(cfg: DataConfig) -> epath.Path:
    return cache_root(cfg) / corpus_key(cfg) / f"{tokenizer_key(cfg)}.model"


# ---------------------------------------------------------------------------------------------
# The cache


class TokenCache:
    """A prepared corpus: token memmaps per split plus the facts in meta.json."""

    def __init__(self, path: epath.Path, meta: dict, local: epath.Path | None = None):
        self.path = path
        self.local = local or path  # where the .bin files are memory-mapped from (a mirror of a remote path)
        self.meta = meta
        self.vocab_size: int = meta["tokenizer"]["vocab_size"]
        self.fingerprint: str = meta["fingerprint"]
        self.splits: tuple[str, ...] = tuple(meta["splits"])
        self._dtype = np.dtype(meta["dtype"])
        self._memmaps: dict[str, np.memmap] = {}

    def tokens(self, split: str) -> np.memmap:
        if split not in self.splits:
            raise UserError(f"data cache {self.path} has no {split!r} split; it has {', '.join(self.splits)}")
        if split not in self._memmaps:
            self._memmaps[split] = np.memmap(os.fspath(self.local / f"{split}.bin"), dtype=self._dtype, mode="r",
                                             shape=(self.meta["splits"][split]["tokens"],))
        return self._memmaps[split]

    def bytes_per_token(self, split: str) -> float:
        """Text bytes per token (a document separator counts as one byte): bits/byte = bits/token / this."""
        counts = self.meta["splits"][split]
        return counts["bytes"] / counts["tokens"]

    def tokenizer(self):
        """The tokenizer that made this cache (to decode samples)."""
        if self.meta["tokenizer"]["name"] == "byte":
            return ByteTokenizer()
        return SentencePieceTokenizer((self.path.parent / self.meta["tokenizer"]["model_file"]).read_bytes())

    def check_fits(self, cfg: DataConfig) -> None:
        for split in ("train", "validation"):
            n = self.meta["splits"][split]["tokens"]
            if n < cfg.seq_len + 1:
                raise bad_value("data.seq_len", cfg.seq_len,
                                f"at most {max(n - 1, 0)}: the {split} split of data.corpus={cfg.corpus!r} has "
                                f"only {n} tokens, fewer than one window (seq_len + 1)")


def prepare(cfg: DataConfig) -> TokenCache:
    """Make the cache for ``cfg`` if it is missing (training a SentencePiece model first when needed),
    then open it. Idempotent: an existing, matching cache is opened without reading the corpus."""
    path = cache_path(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise bad_value("data.cache_dir", cfg.cache_dir, f"a directory that can be created ({err.strerror or err})")
    with _one_process_per_host(path.parent):
        texts = None
        tokenizer = _existing_tokenizer(cfg)
        if tokenizer is None:
            texts = read_corpus(cfg)
            tokenizer = train_tokenizer(cfg, texts)
        if not (path / META).exists():
            texts = texts if texts is not None else read_corpus(cfg)
            print(f"data: tokenizing {cfg.corpus} ({sum(map(len, texts.values())):,} bytes) with "
                  f"{tokenizer_key(cfg)} into {path}", flush=True)
            _write_cache(path, cfg, texts, tokenizer)
        return _open(path, cfg, tokenizer)


def open_cache(cfg: DataConfig) -> TokenCache:
    """Open the cache ``prepare`` made for ``cfg``; UserError when it is missing or does not match."""
    path = cache_path(cfg)
    if not (path / META).exists():
        raise UserError(f"no data cache for data.corpus={cfg.corpus!r} data.tokenizer={cfg.tokenizer!r} at {path}; "
                        "run `lmu-jax data prepare` with the same config (the trainer does so on process 0)")
    tokenizer = _existing_tokenizer(cfg)
    if tokenizer is None:
        raise UserError(f"data cache {path} needs the tokenizer {sentencepiece_path(cfg)}, which is missing; "
                        "delete the cache and run `lmu-jax data prepare` again")
    return _open(path, cfg, tokenizer)


def train_tokenizer(cfg: DataConfig, texts: dict[str, bytes] | None = None, force: bool = False):
    """Train (or, unless ``force``, reuse) the SentencePiece model for ``cfg`` on the train split only."""
    if cfg.tokenizer != "sentencepiece":
        raise bad_value("data.tokenizer", cfg.tokenizer, "sentencepiece to train a tokenizer (byte needs none)")
    path = sentencepiece_path(cfg)
    if path.exists() and not force:
        return SentencePieceTokenizer(path.read_bytes())
    texts = texts if texts is not None else read_corpus(cfg)
    print(f"data: training a SentencePiece {cfg.sp_model_type} tokenizer ({cfg.sp_vocab_size} pieces) on the "
          f"train split of {cfg.corpus} ({len(texts['train']):,} bytes) -> {path}", flush=True)
    model = train_sentencepiece(texts["train"], cfg.sp_vocab_size, cfg.sp_model_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(path, model)
    return SentencePieceTokenizer(model)


def _existing_tokenizer(cfg: DataConfig):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    path = sentencepiece_path(cfg)
    return SentencePieceTokenizer(path.read_bytes()) if path.exists() else None


@contextlib.contextmanager
def _one_process_per_host(directory: epath.Path):
    """Processes of this host making the same cache take turns (a remote directory needs no turns:
    only process 0 writes there, see the module docstring)."""
    if storage.is_remote(directory):
        yield
        return
    with open(directory / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def _mirrored(path: epath.Path) -> epath.Path:
    """A local copy of the remote cache ``path`` (fetched when missing or stale), to memory-map."""
    local = storage.local_mirror(path)
    remote_meta = (path / META).read_text()
    local.parent.mkdir(parents=True, exist_ok=True)
    with _one_process_per_host(local.parent):
        if not (local / META).exists() or (local / META).read_text() != remote_meta:
            print(f"data: copying the cache {path} to {local}", flush=True)
            partial = local.parent / f"{local.name}.tmp-{os.getpid()}"
            for stale in (partial, local):
                if stale.exists():
                    stale.rmtree()
            storage.copy_tree(path, partial)
            partial.rename(local)
    return local


def _open(path: epath.Path, cfg: DataConfig, tokenizer) -> TokenCache:
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"data cache {path} has format {meta.get('format')}, this version reads {FORMAT_VERSION}; "
                        "delete it or use another data.cache_dir")
    made_with = meta["tokenizer"]["fingerprint"]
    if made_with != tokenizer.fingerprint:
        raise UserError(f"data cache {path} was made with tokenizer {made_with[:16]}, this run asks for "
                        f"{tokenizer.fingerprint[:16]}; delete it or use another data.cache_dir")
    cache = TokenCache(path, meta, _mirrored(path) if storage.is_remote(path) else None)
    cache.check_fits(cfg)
    return cache


def _write_cache(path: epath.Path, cfg: DataConfig, texts: dict[str, bytes], tokenizer) -> None:
    """Tokenize every split, ``meta.json`` last: locally into a temporary sibling directory renamed
    into place; on an object store in place (a directory rename there copies every object, and
    ``meta.json`` is the commit mark either way)."""
    for stale in path.parent.glob(f"{path.name}.tmp-*"):  # left by a killed prepare
        stale.rmtree()
    if path.exists():  # a directory without meta.json is not a cache
        path.rmtree()
    in_place = storage.is_remote(path)
    partial = path if in_place else path.parent / f"{path.name}.tmp-{os.getpid()}"
    partial.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split, text in texts.items():
        ids = tokenizer.encode(text).astype(dtype, copy=False)
        with (partial / f"{split}.bin").open("wb") as f:
            f.write(memoryview(ids))
        splits[split] = {"tokens": int(ids.size), "bytes": len(text),
                         "documents": text.count(DOCUMENT_SEPARATOR) + 1}
    corpus_hash = hashlib.sha256()
    for split in sorted(texts):
        corpus_hash.update(f"{split}:{len(texts[split])}:".encode())
        corpus_hash.update(texts[split])
    identity = {"format": FORMAT_VERSION, "corpus": corpus_hash.hexdigest(), "tokenizer": tokenizer.fingerprint,
                "dtype": dtype.name}
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
        "corpus": {"name": cfg.corpus, "key": corpus_key(cfg), "settings": corpus_identity(cfg),
                   "sha256": corpus_hash.hexdigest()},
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                      "fingerprint": tokenizer.fingerprint, "eod_id": tokenizer.eod_id,
                      "pad_id": tokenizer.pad_id,
                      "model_file": sentencepiece_path(cfg).name if tokenizer.name == "sentencepiece" else None},
        "dtype": dtype.name,
        "splits": splits,
    }
    (partial / META).write_text(json.dumps(meta, indent=1))
    if not in_place:
        partial.rename(path)


# ---------------------------------------------------------------------------------------------
# Windows and batches


class WindowBatcher:
    """Global batch ``step`` as a pure function of (seed, step); see the module docstring."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.windows_per_epoch = (len(tokens) - 1) // seq_len
        if self.windows_per_epoch < 1:
            raise bad_value("data.seq_len", seq_len, f"at most {max(len(tokens) - 1, 0)}: the train split has "
                                                     f"only {len(tokens)} tokens, fewer than one window")
        if seed < 0:
            raise bad_value("train.seed", seed, "an int >= 0 (it keys the data order)")
        self._permutations: OrderedDict[int, np.ndarray] = OrderedDict()  # a few recent epochs

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._permutations[epoch] = rng.permutation(self.windows_per_epoch)
            while len(self._permutations) > 4:
                self._permutations.popitem(last=False)
        return self._permutations[epoch]

    def window_ids(self, step: int) -> np.ndarray:
        """np.int64[global_batch]: the windows (index into the split, stride seq_len) of batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        positions = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.windows_per_epoch)
        ids = np.empty(self.global_batch, np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            ids[here] = self.permutation(int(epoch))[offsets[here]]
        return ids

    def windows(self, window_ids: np.ndarray) -> np.ndarray:
        return gather_windows(self.tokens, window_ids, self.seq_len)

    def local_batch(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        """np.int32[global_batch // process_count, seq_len + 1]: rows [p*local, (p+1)*local) of the batch."""
        rows = process_rows(self.global_batch, process_index, process_count)
        return self.windows(self.window_ids(step)[rows])


class StreamBatcher:
    """Ordered contiguous streams (``data.order=streams``): batch ``step`` holds the next segment of each
    row's stream, and ``starts(step)`` says which rows begin a new one (their carried state is reset).

    The first B·S·L tokens of the split (B = global batch, L = seq_len, S = ((n − 1) // L) // B segments
    per stream; a tail of fewer than B·L + 1 tokens is never read) form a ring of B·S segments, segment
    g = tokens[g·L : g·L + L + 1] (input w[:-1], target w[1:], as ``WindowBatcher``). Row i of batch t
    reads segment (i·S + t) mod B·S: in epoch e = t // S it reads stream (i + e) mod B in order, and then
    runs on into the next stream, which continues the text, so its memory stays valid. It starts afresh
    only at step 0 and where it wraps from the ring's end to its start (one row per epoch). Every epoch
    reads every segment once; a batch is a pure function of the step (resuming needs no replay), and
    the order is the text's (the seed does not enter).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int):
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        n_segments = (len(tokens) - 1) // seq_len
        self.segments_per_stream = n_segments // global_batch
        if self.segments_per_stream < 1:
            raise bad_value("train.batch_size", global_batch,
                            f"at most {n_segments}: with data.order=streams every batch row reads a stream of "
                            f"at least one segment of data.seq_len={seq_len} tokens, and the train split has "
                            f"{n_segments} segments")
        self.ring = global_batch * self.segments_per_stream

    def segment_ids(self, step: int) -> np.ndarray:
        """np.int64[global_batch]: the segment each row reads at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return (np.arange(self.global_batch, dtype=np.int64) * self.segments_per_stream + step) % self.ring

    def starts(self, step: int) -> np.ndarray:
        """bool[global_batch]: rows whose stream starts at ``step`` (fresh carried state)."""
        return (self.segment_ids(step) == 0) | (step == 0)

    def local_batch(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        """np.int32[global_batch // process_count, seq_len + 1]: this process's rows of the batch."""
        rows = process_rows(self.global_batch, process_index, process_count)
        return gather_windows(self.tokens, self.segment_ids(step)[rows], self.seq_len)

    def local_starts(self, step: int, process_index: int, process_count: int) -> np.ndarray:
        return self.starts(step)[process_rows(self.global_batch, process_index, process_count)]


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """Process p supplies rows [p*local, (p+1)*local) of every global batch."""
    if global_batch % process_count:
        raise bad_value("train.batch_size", global_batch, f"a multiple of the process count {process_count}")
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


def gather_windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Window w is tokens[w*seq_len : w*seq_len + seq_len + 1], as int32 rows."""
    index = np.asarray(window_ids, np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
    return np.asarray(tokens[index], dtype=np.int32)


def validation_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """np.int32[min(count, W), seq_len + 1]: windows spread evenly over the split, the same every time."""
    available = (len(tokens) - 1) // seq_len
    if available < 1:
        raise bad_value("data.seq_len", seq_len, f"at most {max(len(tokens) - 1, 0)}: the validation split has "
                                                 f"only {len(tokens)} tokens, fewer than one window")
    n = min(count, available)
    return gather_windows(tokens, np.arange(n, dtype=np.int64) * available // n, seq_len)


def stream_eval_batches(tokens: np.ndarray, streams: int, seg_len: int):
    """Yield (rows int32[streams, seg_len + 1], mask bool[streams, seg_len]): the split as ``streams``
    contiguous streams read in parallel, segment k of every stream in batch k; each stream begins with
    an empty memory. Stream b predicts targets (⌊b(n−1)/E⌋, ⌊(b+1)(n−1)/E⌋] (E = streams), so every
    target of the split is scored exactly once; the mask is False past a stream's end."""
    n = len(tokens)
    if not 1 <= streams <= n - 1:
        raise bad_value("eval.streams", streams, f"between 1 and the split's {n - 1} targets")
    bounds = np.arange(streams + 1, dtype=np.int64) * (n - 1) // streams
    starts, ends = bounds[:-1], bounds[1:]
    offsets = np.arange(seg_len + 1, dtype=np.int64)
    for k in range(-(-int((ends - starts).max()) // seg_len)):
        first = starts + k * seg_len  # input position of each row's first token
        index = np.minimum(first[:, None] + offsets, n - 1)
        yield np.asarray(tokens[index], np.int32), first[:, None] + offsets[:-1] < ends[:, None]


def sliding_window_batches(tokens: np.ndarray, seq_len: int, stride: int, batch: int):
    """Yield (rows int32[batch, seq_len + 1], mask bool[batch, seq_len]): windows of seq_len inputs that
    start every ``stride`` tokens (the last one moved back to end at the split's end); the first window
    scores all its targets, every later one the targets the previous one did not, its last ``stride``
    (fewer for the last) with at least seq_len − stride tokens of context. Every target exactly once;
    padding rows score nothing."""
    n = len(tokens)
    last_start = n - 1 - seq_len
    if last_start < 0 or not 1 <= stride <= seq_len:
        raise ValueError(f"{n} tokens hold no window of {seq_len} + 1, or stride {stride} is not in [1, {seq_len}]")
    count = 1 + -(-last_start // stride)
    window_starts = np.minimum(np.arange(count, dtype=np.int64) * stride, last_start)
    scored_from = np.concatenate([[0], window_starts[:-1] + seq_len - window_starts[1:]])  # first new target
    for lo in range(0, count, batch):
        here = window_starts[lo:lo + batch]
        rows = np.asarray(tokens[here[:, None] + np.arange(seq_len + 1)], np.int32)
        mask = np.arange(seq_len)[None, :] >= scored_from[lo:lo + batch, None]
        pad = batch - len(here)
        yield np.pad(rows, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))


def word_count(text: bytes) -> int:
    """Words of a text for word-level perplexity: whitespace-separated words plus one end-of-line per
    line end or document separator (WikiText's <eos> per line, as Transformer-XL counts it)."""
    text = text.replace(DOCUMENT_SEPARATOR, b"\n")
    return len(text.split()) + text.count(b"\n")


def to_global_array(local_rows: np.ndarray, sharding) -> jax.Array:
    """Assemble the global batch from each process's rows (process p holds rows [p*local, (p+1)*local)).

    That is only the 1-process batch when the devices of process p hold exactly those rows, which is
    the case for a mesh built from ``jax.devices()`` in order with the batch sharded over its leading
    axes; other layouts raise instead of silently reordering the data."""
    count = jax.process_count()
    global_shape = (local_rows.shape[0] * count, *local_rows.shape[1:])
    if count > 1:
        check_rows_line_up(sharding, global_shape, jax.process_index())
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


@functools.lru_cache(maxsize=64)
def check_rows_line_up(sharding, global_shape: tuple, process_index: int, process_of=None) -> None:
    """Raise ValueError unless the devices of ``process_index`` (``process_of(device)``, default
    ``device.process_index``) hold exactly the contiguous rows that process supplies."""
    process_of = process_of or (lambda device: device.process_index)
    index_map = sharding.devices_indices_map(global_shape)
    processes = {process_of(d) for d in index_map}
    local = global_shape[0] // len(processes)
    owned = set()
    for device, index in index_map.items():
        if process_of(device) == process_index:
            owned.update(range(*index[0].indices(global_shape[0])))
    expected = set(range(process_index * local, (process_index + 1) * local))
    if owned != expected:
        raise ValueError(f"process {process_index}'s devices hold batch rows {sorted(owned)[:8]}..., not its "
                         f"slice [{process_index * local}, {(process_index + 1) * local}); build the mesh from "
                         "jax.devices() in order and shard the batch over the leading mesh axes")


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy of the token frequencies in bits per token: the loss of the best context-free model,
    a baseline every trained model must beat."""
    counts = np.zeros(vocab_size, np.int64)
    for start in range(0, len(tokens), 1 << 24):  # chunks bound the int64 copy bincount makes
        counts += np.bincount(np.asarray(tokens[start:start + (1 << 24)]), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
