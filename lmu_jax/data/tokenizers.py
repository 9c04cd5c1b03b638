"""Tokenizers: bytes, or a SentencePiece model trained on the corpus. Both are lossless.

Both map a split's text (documents joined by ``DOCUMENT_SEPARATOR``) to one id stream in which
documents are separated by the tokenizer's end-of-document id ``eod_id``; ``decode`` inverts it.

byte            ids 0-255 are the bytes, 256 = end of document, 257 = padding (never in a token
                stream; for the evaluator's partial windows). ``BYTE_VOCAB_SIZE`` = 258. A 0x1e byte
                is the separator by definition, so it always becomes 256 (still one token per byte).
sentencepiece   a BPE (default; trains in seconds) or unigram model (``data.sp_model_type``) with
                ``byte_fallback`` (any byte is representable, no <unk> in practice), identity
                normalisation and no dummy prefix, so decode(encode(x)) == x;
                ids 0 = <unk>, 1 = </s> = end of document, 2 = <pad>, then 256 byte pieces and the
                learned pieces. Its fingerprint is the sha256 of the serialized model.

SentencePiece learns from lines (its training unit) and encodes line by line: over a whole document
the unigram Viterbi search accumulates float scores, and near-ties then break differently at
different offsets, so the same line could get different pieces depending on where it sits.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re

import numpy as np
import sentencepiece as spm

from lmu_jax.data.corpora import DOCUMENT_SEPARATOR
from lmu_jax.errors import UserError, bad_value

BYTE_VOCAB_SIZE = 258
BYTE_EOD_ID = 256
BYTE_PAD_ID = 257
_BYTE_SPEC = b"byte tokenizer v1: ids 0-255 are bytes, 256 = end of document (0x1e in text), 257 = padding"

_ENCODE_BATCH_LINES = 65536  # lines per sentencepiece call: bounds memory, keeps its threads busy
_THREADS = min(16, os.cpu_count() or 1)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32: halves the cache for usual vocabularies."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ByteTokenizer:
    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eod_id = BYTE_EOD_ID
    pad_id = BYTE_PAD_ID
    fingerprint = hashlib.sha256(_BYTE_SPEC).hexdigest()

    def encode(self, text: bytes) -> np.ndarray:
        ids = np.frombuffer(text, np.uint8).astype(token_dtype(self.vocab_size))
        ids[ids == DOCUMENT_SEPARATOR[0]] = self.eod_id
        return ids

    def decode(self, ids) -> bytes:
        ids = np.asarray(ids)
        ids = ids[ids != self.pad_id]
        return np.where(ids == self.eod_id, DOCUMENT_SEPARATOR[0], ids).astype(np.uint8).tobytes()


class SentencePieceTokenizer:
    name = "sentencepiece"

    def __init__(self, model: bytes):
        self.model = model
        self.processor = spm.SentencePieceProcessor(model_proto=model)
        self.vocab_size = self.processor.vocab_size()
        self.eod_id = self.processor.eos_id()
        self.pad_id = self.processor.pad_id()
        self.fingerprint = hashlib.sha256(model).hexdigest()

    def encode(self, text: bytes) -> np.ndarray:
        lines, lines_per_doc = [], []
        for doc in text.split(DOCUMENT_SEPARATOR):
            doc_lines = _lines(doc)
            lines += doc_lines
            lines_per_doc.append(len(doc_lines))
        line_ids = []
        for start in range(0, len(lines), _ENCODE_BATCH_LINES):
            line_ids += self.processor.encode(lines[start:start + _ENCODE_BATCH_LINES], out_type=int,
                                              num_threads=_THREADS)
        pieces, line = [], 0
        for doc_index, count in enumerate(lines_per_doc):
            if doc_index:
                pieces.append((self.eod_id,))
            pieces += line_ids[line:line + count]
            line += count
        total = sum(len(p) for p in pieces)
        return np.fromiter(itertools.chain.from_iterable(pieces), token_dtype(self.vocab_size), count=total)

    def decode(self, ids) -> bytes:
        ids = [int(i) for i in np.asarray(ids) if i != self.pad_id]
        docs, start = [], 0
        for end in [i for i, t in enumerate(ids) if t == self.eod_id] + [len(ids)]:
            docs.append(self.processor.decode(ids[start:end]).encode("utf-8"))
            start = end + 1
        return DOCUMENT_SEPARATOR.join(docs)


def _lines(doc: bytes) -> list[str]:
    """A document's lines, each keeping its "\\n" (the last may lack one); bytes that are not UTF-8
    (possible only at enwik8's split edges) become U+FFFD."""
    parts = doc.split(b"\n")
    lines = [p.decode("utf-8", "replace") + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1].decode("utf-8", "replace"))
    return lines


def train_sentencepiece(train_text: bytes, vocab_size: int, model_type: str = "bpe") -> bytes:
    """Train a ``model_type`` (bpe | unigram) model on the non-empty lines of ``train_text``; returns
    the serialized model. Deterministic for a given text (checked by sha256 in the tests)."""
    sentences = (line.decode("utf-8", "replace")
                 for doc in train_text.split(DOCUMENT_SEPARATOR) for line in doc.split(b"\n") if line)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True,  # lossless; indentation pieces
            unk_id=0, eos_id=1, pad_id=2, bos_id=-1,
            max_sentence_length=1 << 16, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=_THREADS, minloglevel=2)
    except RuntimeError as err:
        message = str(err)
        if "Vocabulary size too high" in message:
            limit = re.search(r"<= (\d+)", message)
            raise bad_value("data.sp_vocab_size", vocab_size,
                            f"at most {limit[1] if limit else 'fewer'} pieces for this corpus (too little text)")
        if "smaller than required_chars" in message:
            needed = re.search(r"vs (\d+)", message)
            raise bad_value("data.sp_vocab_size", vocab_size,
                            f"at least {needed[1] if needed else 'more'} (256 byte pieces + specials + characters)")
        raise UserError(f"sentencepiece training failed: {message.splitlines()[0]}")
    return model.getvalue()
