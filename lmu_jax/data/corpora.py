"""Named text sources: ``read_corpus(cfg) -> {split: UTF-8 bytes}``.

    kjv                  King James Bible from the Debian package bible-kjv; one document per book
    pystdlib             this interpreter's standard-library .py sources; one document per file
    enwik8, text8        the standard 90 M / 5 M / 5 M byte split of Matt Mahoney's files; one stream each
    files:<glob>         local text files, sorted by path; one document per file
    tfds:<name>[/<cfg>]  a prepared TFDS dataset read through ``tfds.data_source`` (array_record, no
                         TensorFlow); one document per record, text from the feature ``data.text_key``

Documents inside a split are joined with ``DOCUMENT_SEPARATOR`` (the ASCII record separator 0x1e,
which ordinary text never contains); tokenizers turn it into their end-of-document id. enwik8 and
text8 are single streams, kept byte for byte (newlines included) so bits per byte stay faithful to
the compression benchmark.

Corpora without a published validation split (kjv, pystdlib, files, tfds with only a train split)
are cut by ``holdout_split``: every document is cut into blocks of about ``block_bytes`` (at line
ends), and block number i goes to validation when ``i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2``,
so 1 block in 20 (about 5 %) is held out, spread evenly over the whole corpus. Consecutive blocks of
a document that land in the same split stay one document; where a held-out block is cut out, the
text on either side becomes two documents, so no window ever reads across the gap.

``data.max_bytes`` (0 = everything) keeps the first max_bytes bytes, cut at a UTF-8 character
boundary: of the whole corpus before the holdout split, or of each split for corpora that come with
their own splits (enwik8, text8, tfds).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from typing import TYPE_CHECKING, Iterable

from etils import epath

from lmu_jax.errors import UserError, bad_value

if TYPE_CHECKING:  # annotations only: the config module imports the tokenizers, which import this one
    from lmu_jax.config import DataConfig

DOCUMENT_SEPARATOR = b"\x1e"  # ASCII record separator, between documents of a split
SPLITS = ("train", "validation", "test")
CORPUS_NAMES = "kjv, pystdlib, enwik8, text8, files:<glob> or tfds:<name>[/<config>]"
LAYOUT_VERSION = 1  # bump when the text a corpus yields changes (separators, holdout rule, cleaning)

HOLDOUT_EVERY = 20  # 1 block in 20 goes to validation
HELD_OUT_BLOCKS = 20  # blocks shrink for small corpora so that about this many are held out ...
MAX_BLOCK_BYTES = 16 * 1024  # ... but stay within these bounds
MIN_BLOCK_BYTES = 64

# The standard enwik8/text8 splits (awd-lstm-lm prep_enwik8.py, Transformer-XL prep_text8.py):
# first 90 M bytes train, next 5 M validation, last 5 M test. Tests shrink these to a tiny file.
STANDARD_SPLITS = {
    "enwik8": (90_000_000, 5_000_000, 5_000_000),
    "text8": (90_000_000, 5_000_000, 5_000_000),
}
DOWNLOAD_URLS = {
    "enwik8": "http://mattmahoney.net/dc/enwik8.zip",
    "text8": "http://mattmahoney.net/dc/text8.zip",
}

KJV_RANGE = "gen1:1-rev22:21"
_KJV_VERSE = re.compile(rb"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")  # "1Sm3:4 text" -> book 1Sm, chapter 3, verse 4
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def read_corpus(cfg: DataConfig) -> dict[str, bytes]:
    """The corpus named by ``cfg.corpus`` as {split: text}; 'train' and 'validation' always, 'test' when
    the corpus has one. Deterministic: the same config on the same machine gives the same bytes."""
    name = cfg.corpus
    if name in ("kjv", "pystdlib") or name.startswith("files:"):
        if name == "kjv":
            documents = _kjv_documents()
        elif name == "pystdlib":
            documents = _pystdlib_documents()
        else:
            documents = _file_documents(name[len("files:"):])
        texts = holdout_split(cap_documents(documents, cfg.max_bytes))
    elif name in STANDARD_SPLITS:
        texts = _standard_split(name, cfg)
    elif name.startswith("tfds:"):
        texts = _tfds_splits(name[len("tfds:"):], cfg)
    else:
        raise bad_value("data.corpus", name, CORPUS_NAMES)
    if not texts.get("train"):
        raise bad_value("data.corpus", name, "a corpus with text (it is empty)")
    if not texts.get("validation"):
        raise bad_value("data.corpus", name, "a corpus large enough to hold out a validation split "
                                             f"(1 block in {HOLDOUT_EVERY}); raise data.max_bytes or add text")
    return texts


def corpus_identity(cfg: DataConfig) -> dict:
    """The settings that decide which bytes ``read_corpus`` yields; they name the cache directory.
    (Edits to files behind a fixed ``files:`` glob are not seen: delete the cache after such edits.)"""
    identity = {"corpus": cfg.corpus, "max_bytes": cfg.max_bytes, "layout": LAYOUT_VERSION}
    if cfg.corpus == "pystdlib":
        identity["python"] = "%d.%d" % sys.version_info[:2]  # the stdlib differs between versions
    if cfg.corpus.startswith("tfds:"):
        identity["text_key"] = cfg.text_key
    return identity


# ---------------------------------------------------------------------------------------------
# Splitting and capping


def holdout_split(documents: list[bytes]) -> dict[str, bytes]:
    """Hold out 1 block in ``HOLDOUT_EVERY`` for validation (see the module docstring)."""
    total = sum(len(doc) for doc in documents)
    block_bytes = min(MAX_BLOCK_BYTES, max(MIN_BLOCK_BYTES, total // (HOLDOUT_EVERY * HELD_OUT_BLOCKS)))
    out: dict[str, list[bytes]] = {"train": [], "validation": []}
    index = 0
    for doc in documents:
        run_split, run = None, []
        for block in _blocks(doc, block_bytes):
            split = "validation" if index % HOLDOUT_EVERY == HOLDOUT_EVERY // 2 else "train"
            index += 1
            if run and split != run_split:
                out[run_split].append(b"".join(run))
                run = []
            run_split = split
            run.append(block)
        if run:
            out[run_split].append(b"".join(run))
    return {split: DOCUMENT_SEPARATOR.join(docs) for split, docs in out.items()}


def _blocks(doc: bytes, block_bytes: int) -> Iterable[bytes]:
    """Cut after the first newline at or past ``block_bytes``; text without newlines is cut at a
    character boundary after 4 blocks' worth, so one huge line still gets split."""
    start = 0
    while start < len(doc):
        end = doc.find(b"\n", start + block_bytes, start + 4 * block_bytes)
        if end >= 0:
            end += 1
        else:
            end = start + 4 * block_bytes
            if end < len(doc):
                end = max(char_boundary(doc, end), start + 1)
        yield doc[start:end]
        start = end


def char_boundary(data: bytes, pos: int) -> int:
    """The largest position <= pos that does not fall inside a UTF-8 multi-byte character."""
    pos = min(pos, len(data))
    while 0 < pos < len(data) and data[pos] & 0xC0 == 0x80:
        pos -= 1
    return pos


def cap_documents(documents: Iterable[bytes], max_bytes: int) -> list[bytes]:
    """The documents holding the first ``max_bytes`` bytes of text (0 = all); reads lazily, so a huge
    source is only read up to the cap."""
    out, total = [], 0
    for doc in documents:
        if max_bytes and total + len(doc) >= max_bytes:
            doc = doc[:char_boundary(doc, max_bytes - total)]
            if doc:
                out.append(doc)
            break
        if doc:
            out.append(doc)
            total += len(doc)
    return out


def cap_text(text: bytes, max_bytes: int) -> bytes:
    return text[:char_boundary(text, max_bytes)] if max_bytes else text


# ---------------------------------------------------------------------------------------------
# Sources


def _kjv_documents() -> list[bytes]:
    """``bible -f gen1:1-rev22:21`` prints one verse per line as "Ge1:1 In the beginning ..."; we strip
    the reference and group verses by book (66 documents, about 4.1 MB of ASCII)."""
    how = ("data.corpus='kjv' needs the Debian package bible-kjv: run `apt-get install bible-kjv` "
           "(or use data.corpus=pystdlib, which is always present)")
    bible = shutil.which("bible")
    if bible is None:
        raise UserError(how)
    result = subprocess.run([bible, "-f", KJV_RANGE], stdin=subprocess.DEVNULL, capture_output=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise UserError(f"`bible -f {KJV_RANGE}` failed (exit {result.returncode}); {how}")
    books: dict[bytes, list[bytes]] = {}
    for line in result.stdout.splitlines():
        match = _KJV_VERSE.match(line)
        if match is None:
            raise UserError(f"data.corpus='kjv': unexpected line from `bible`: {line[:60]!r}")
        books.setdefault(match[1], []).append(match[4] + b"\n")
    return [b"".join(verses) for verses in books.values()]


def pystdlib_paths() -> list[str]:
    """The interpreter's standard library (``sysconfig`` stdlib path): *.py files sorted by relative
    path, without test directories and installed packages."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS]
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(paths, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


def _pystdlib_documents() -> list[bytes]:
    """One document per stdlib file; the rare file that is not UTF-8 is skipped."""
    documents = []
    for path in pystdlib_paths():
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        documents.append(data)
    return documents


def _file_documents(pattern: str) -> list[bytes]:
    corpus = f"files:{pattern}"
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise bad_value("data.corpus", corpus, "a glob matching at least one file")
    documents = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"data.corpus={corpus!r}: {path} is not UTF-8 text "
                            f"(byte 0x{data[err.start]:02x} at offset {err.start})")
        documents.append(data)
    if not any(documents):
        raise bad_value("data.corpus", corpus, f"text files with content (all {len(paths)} matched are empty)")
    return documents


def _standard_split(name: str, cfg: DataConfig) -> dict[str, bytes]:
    sizes = STANDARD_SPLITS[name]
    data = _read_mahoney_file(name, cfg)
    if len(data) != sum(sizes):
        raise bad_value("data.corpus", name, f"the standard {sum(sizes):,}-byte file, but the one found has "
                                             f"{len(data):,} bytes")
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    return {split: cap_text(data[bounds[i]:bounds[i + 1]], cfg.max_bytes) for i, split in enumerate(SPLITS)}


def raw_data_dir(cfg: DataConfig) -> epath.Path:
    """Where enwik8/text8 files are looked for and downloaded to: data.data_dir or <cache_dir>/raw."""
    return epath.Path(cfg.data_dir or os.path.join(cfg.cache_dir, "raw")).expanduser()


def _read_mahoney_file(name: str, cfg: DataConfig) -> bytes:
    """``<data_dir>/<name>`` or ``<data_dir>/<name>.zip``; downloaded to the zip when neither exists."""
    directory = raw_data_dir(cfg)
    plain, archive = directory / name, directory / f"{name}.zip"
    if plain.exists():
        return plain.read_bytes()
    if not archive.exists():
        url = DOWNLOAD_URLS[name]
        print(f"data: downloading {url} to {archive}", flush=True)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / f"{name}.zip.partial"
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as f:
                shutil.copyfileobj(response, f)
            partial.rename(archive)
        except OSError as err:
            raise UserError(f"data.corpus={name!r}: no file {plain} or {archive}, and downloading {url} failed "
                            f"({err}); download it elsewhere and put it there, or set data.data_dir")
    with archive.open("rb") as f, zipfile.ZipFile(f) as z:
        return z.read(name)


def _tfds_splits(spec: str, cfg: DataConfig) -> dict[str, bytes]:
    """Records of a prepared TFDS dataset through ``tfds.data_source`` (array_record random access;
    TensorFlow is never imported). A dataset without a validation split gets one held out of train."""
    import tensorflow_datasets as tfds  # optional dependency, imported only for tfds corpora

    corpus = f"tfds:{spec}"
    try:
        sources = tfds.data_source(spec, split=None, data_dir=cfg.data_dir or None)
    except (ValueError, OSError, NotImplementedError) as err:  # not found, bad config, not array_record
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"data.corpus={corpus!r} could not be opened from data.data_dir={cfg.data_dir!r} "
                        f"(it must be prepared with file_format=array_record): {first_line}")
    if "train" not in sources:
        raise bad_value("data.corpus", corpus, f"a dataset with a train split (it has {', '.join(sources)})")
    documents = {split: cap_documents(_tfds_texts(sources[split], cfg.text_key, corpus), cfg.max_bytes)
                 for split in SPLITS if split in sources}
    if "validation" in documents:
        return {split: DOCUMENT_SEPARATOR.join(docs) for split, docs in documents.items()}
    texts = holdout_split(documents["train"])
    if "test" in documents:
        texts["test"] = DOCUMENT_SEPARATOR.join(documents["test"])
    return texts


def _tfds_texts(source, key: str, corpus: str, batch: int = 1024) -> Iterable[bytes]:
    """The text feature of each record in index order, as UTF-8 bytes (real data sources return bytes,
    ``tfds.testing.mock_data`` returns str)."""
    for start in range(0, len(source), batch):
        for record in source.__getitems__(list(range(start, min(start + batch, len(source))))):
            if key not in record:
                raise bad_value("data.text_key", key, f"a feature of {corpus}: {', '.join(sorted(record))}")
            value = record[key]
            if isinstance(value, str):
                value = value.encode("utf-8")
            if not isinstance(value, bytes):
                raise bad_value("data.text_key", key, f"a text feature of {corpus} (it holds {type(value).__name__})")
            yield value
