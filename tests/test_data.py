"""Corpora, tokenizers, the token cache and the `lmu-jax data` commands."""

import json
import os
import re
import shutil
import sys
import zipfile

import numpy as np
import pytest

from lmu_jax import cli
from lmu_jax.config import DataConfig
from lmu_jax.data import corpora, pipeline
from lmu_jax.data.corpora import DOCUMENT_SEPARATOR as SEP
from lmu_jax.data.corpora import cap_documents, cap_text, holdout_split, read_corpus
from lmu_jax.data.pipeline import open_cache, prepare, unigram_entropy
from lmu_jax.data.tokenizers import (BYTE_VOCAB_SIZE, ByteTokenizer, SentencePieceTokenizer,
                                     train_sentencepiece)
from lmu_jax.errors import UserError

needs_bible = pytest.mark.skipif(shutil.which("bible") is None, reason="Debian package bible-kjv not installed")
VERSE_REF = re.compile(rb"^\d?[A-Za-z]+\d+:\d+ ", re.M)


def run_cli(capsys, monkeypatch, *args):
    """`lmu-jax data ...` through the real entry point, with only the data commands registered."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["lmu_jax.data.commands"])
    code = cli.main(["data", *args])
    out, err = capsys.readouterr()
    return code, out, err


def numbered_lines(n: int, width: int = 30) -> bytes:
    return b"".join(f"line {i:06d} ".encode().ljust(width - 1, b"x") + b"\n" for i in range(n))


@pytest.fixture
def text_files(tmp_path):
    """Three small documents of unique numbered lines (so every line can be traced to its split)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    lines = numbered_lines(3000).splitlines(keepends=True)
    for i, chunk in enumerate((lines[:1000], lines[1000:2200], lines[2200:])):
        (folder / f"doc{i}.txt").write_bytes(b"".join(chunk))
    return f"files:{folder}/*.txt"


# ---------------------------------------------------------------------------------------------
# Corpora


@needs_bible
def test_kjv_reads_without_verse_references():
    texts = read_corpus(DataConfig(corpus="kjv"))
    assert set(texts) == {"train", "validation"}
    total = sum(len(t) for t in texts.values())
    assert 4.0e6 < total < 4.3e6
    assert texts["train"].startswith(b"In the beginning God created the heaven and the earth.\n")
    assert texts["train"].endswith(b"The grace of our Lord Jesus Christ be with you all. Amen.\n")
    for text in texts.values():
        assert VERSE_REF.search(text) is None
        assert max(text) < 128  # pure ASCII (the separator 0x1e included)
    assert 0.04 < len(texts["validation"]) / total < 0.07


def test_kjv_missing_package_says_how_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    code, _, err = run_cli(capsys, monkeypatch, "prepare", f"data.cache_dir={tmp_path}", "data.corpus=kjv")
    assert code == 2 and err.count("\n") == 1
    assert "apt-get install bible-kjv" in err and "data.corpus=pystdlib" in err


def test_pystdlib_reads_sorted_sources_without_tests():
    paths = corpora.pystdlib_paths()
    assert len(paths) > 300 and paths[0].endswith(".py")
    for path in paths:
        parts = set(path.split("/"))
        assert not parts & {"test", "tests", "site-packages", "dist-packages"}, path
    texts = read_corpus(DataConfig(corpus="pystdlib", max_bytes=2_000_000))
    assert b"def " in texts["train"] and b"import " in texts["validation"]
    assert sum(len(t) for t in texts.values()) - texts["train"].count(SEP) - texts["validation"].count(SEP) \
        == 2_000_000
    assert texts == read_corpus(DataConfig(corpus="pystdlib", max_bytes=2_000_000))  # deterministic


def test_holdout_split_puts_every_line_in_exactly_one_split():
    documents = [numbered_lines(400), numbered_lines(5)[:50], numbered_lines(900)[::-1]]
    texts = holdout_split(documents)
    original = sorted(line for doc in documents for line in doc.splitlines(keepends=True))
    split_lines = sorted(line for text in texts.values() for doc in text.split(SEP)
                         for line in doc.splitlines(keepends=True))
    assert split_lines == original  # nothing lost, nothing duplicated, no line cut
    held_out = len(texts["validation"]) / sum(map(len, documents))
    assert 0.03 < held_out < 0.08
    assert texts == holdout_split(documents)


def test_caps_cut_at_character_boundaries():
    assert cap_text("aé b".encode(), 2) == b"a"  # é is 2 bytes: not cut in half
    assert cap_text(b"abc", 0) == b"abc"
    assert cap_documents([b"abc", b"", b"def", b"ghi"], 5) == [b"abc", b"de"]
    assert cap_documents(iter([b"abc", b"def"]), 0) == [b"abc", b"def"]


def test_files_corpus_documents_and_cap(text_files):
    texts = read_corpus(DataConfig(corpus=text_files))
    assert texts["train"].startswith(b"line 000000 ")
    capped = read_corpus(DataConfig(corpus=text_files, max_bytes=40_000))
    assert sum(len(t) - t.count(SEP) for t in capped.values()) == 40_000


def test_files_corpus_errors_are_one_line(capsys, monkeypatch, tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n" * 50)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    cases = [
        (f"data.corpus=files:{tmp_path}/*.txt", ["bad.txt", "offset 3", "not UTF-8"]),
        (f"data.corpus=files:{tmp_path}/empty.txt", ["data.corpus", "empty"]),
        (f"data.corpus=files:{tmp_path}/nothing*", ["data.corpus", "a glob matching at least one file"]),
        ("data.corpus=wikipedia", ["data.corpus='wikipedia'", "kjv, pystdlib"]),
    ]
    for override, fragments in cases:
        code, _, err = run_cli(capsys, monkeypatch, "prepare", f"data.cache_dir={tmp_path / 'cache'}", override)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        for fragment in fragments:
            assert fragment in err, (fragment, err)


def test_corpus_shorter_than_one_window_is_one_line(capsys, monkeypatch, tmp_path, text_files):
    code, _, err = run_cli(capsys, monkeypatch, "prepare", f"data.cache_dir={tmp_path}", f"data.corpus={text_files}",
                           "data.max_bytes=3000", "data.seq_len=512")
    assert code == 2 and err.count("\n") == 1
    assert "data.seq_len=512" in err and "fewer than one window" in err and text_files in err


def test_enwik8_standard_split_from_a_local_file(monkeypatch, tmp_path):
    assert corpora.STANDARD_SPLITS["enwik8"] == (90_000_000, 5_000_000, 5_000_000)
    assert corpora.STANDARD_SPLITS["text8"] == (90_000_000, 5_000_000, 5_000_000)
    monkeypatch.setitem(corpora.STANDARD_SPLITS, "enwik8", (900, 50, 50))  # a 1000-byte stand-in
    data = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as z:
        z.writestr("enwik8", data)
    texts = read_corpus(DataConfig(corpus="enwik8", data_dir=str(tmp_path)))
    assert texts == {"train": data[:900], "validation": data[900:950], "test": data[950:]}
    (tmp_path / "enwik8").write_bytes(data[:999])  # the unpacked file wins over the zip
    with pytest.raises(UserError, match="1,000-byte file, but the one found has 999 bytes"):
        read_corpus(DataConfig(corpus="enwik8", data_dir=str(tmp_path)))


def test_text8_without_file_or_network_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setitem(corpora.DOWNLOAD_URLS, "text8", "http://127.0.0.1:9/text8.zip")  # refused at once
    with pytest.raises(UserError) as err:
        read_corpus(DataConfig(corpus="text8", data_dir=str(tmp_path / "raw")))
    message = str(err.value)
    assert f"{tmp_path}/raw/text8.zip" in message and "data.data_dir" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# TFDS through data_source (array_record), never TensorFlow


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    def builder(class_name, splits):
        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int64)}))

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(start, stop) for name, (start, stop) in splits.items()}

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                yield i, {"text": f"record {i:04d} héllo\n" + "words " * (i % 7) + "\n", "id": i}

        return type(class_name, (tfds.core.GeneratorBasedBuilder,), {
            "VERSION": tfds.core.Version("1.0.0"), "_info": _info, "_split_generators": _split_generators,
            "_generate_examples": _generate_examples})

    data_dir = tmp_path_factory.mktemp("tfds")
    for cls in (builder("LmuTinyTrainTest", {"train": (0, 400), "test": (400, 440)}),
                builder("LmuTinyWithValidation", {"train": (0, 100), "validation": (100, 130)})):
        cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def test_tfds_data_source_without_tensorflow(monkeypatch, tfds_dir):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # any `import tensorflow` would now fail
    texts = read_corpus(DataConfig(corpus="tfds:lmu_tiny_train_test", data_dir=tfds_dir))
    assert set(texts) == {"train", "validation", "test"}
    records = [doc for split in ("train", "validation") for doc in texts[split].split(SEP)]
    assert len(records) >= 400  # train records, some cut by the holdout
    assert "record 0007 héllo\n".encode() in b"".join(records)
    assert texts["test"].count(SEP) == 39
    given = read_corpus(DataConfig(corpus="tfds:lmu_tiny_with_validation", data_dir=tfds_dir))
    assert given["validation"].count(SEP) == 29 and b"record 0100" not in given["train"]
    monkeypatch.delitem(sys.modules, "tensorflow")
    assert "tensorflow" not in sys.modules


def test_tfds_errors_and_str_texts(tfds_dir):
    with pytest.raises(UserError, match="data.text_key='body'.*id, text"):
        read_corpus(DataConfig(corpus="tfds:lmu_tiny_train_test", data_dir=tfds_dir, text_key="body"))
    with pytest.raises(UserError, match="data.corpus='tfds:no_such_dataset_xyz' could not be opened"):
        read_corpus(DataConfig(corpus="tfds:no_such_dataset_xyz", data_dir=tfds_dir))

    class MockSource(list):  # tfds.testing.mock_data hands out str instead of bytes
        def __getitems__(self, keys):
            return [self[k] for k in keys]

    source = MockSource([{"text": "é"}, {"text": b"b"}])
    assert list(corpora._tfds_texts(source, "text", "tfds:mock")) == ["é".encode(), b"b"]


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_roundtrip_and_document_ids():
    tokenizer = ByteTokenizer()
    text = "first doc\n".encode() + SEP + "zweite Straße ✓".encode()
    ids = tokenizer.encode(text)
    assert tokenizer.vocab_size == BYTE_VOCAB_SIZE == 258 and ids.dtype == np.uint16
    assert list(ids[:10]) == list(b"first doc\n") and ids[10] == tokenizer.eod_id == 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.append(ids, tokenizer.pad_id)) == text  # padding is dropped


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_trains_quickly_and_roundtrips(model_type):
    sources = b"".join(open(p, "rb").read() for p in corpora.pystdlib_paths()[:40])[:100_000]
    model = train_sentencepiece(sources, 512, model_type)
    if model_type == "bpe":  # (unigram is deterministic too, but 10x slower to train)
        assert train_sentencepiece(sources, 512, model_type) == model
    tokenizer = SentencePieceTokenizer(model)
    assert tokenizer.vocab_size == 512 and (tokenizer.eod_id, tokenizer.pad_id) == (1, 2)
    unseen = "def f(x):\n\t  return x  # ünïcode 漢字 \x01\r\n\n".encode() + SEP + b"  trailing   spaces  "
    ids = tokenizer.encode(unseen)
    assert tokenizer.decode(ids) == unseen
    assert list(ids).count(tokenizer.eod_id) == 1
    assert len(tokenizer.encode(sources)) < 0.6 * len(sources)  # it compresses the text it learned from


def test_sentencepiece_vocab_too_large_is_a_user_error():
    with pytest.raises(UserError, match=r"data.sp_vocab_size=5000 is invalid: at most \d+"):
        train_sentencepiece(b"tiny corpus\n" * 20, 5000)


# ---------------------------------------------------------------------------------------------
# The token cache


def test_prepare_is_idempotent_and_matches_the_text(monkeypatch, tmp_path, text_files):
    cfg = DataConfig(corpus=text_files, cache_dir=str(tmp_path / "cache"), seq_len=64)
    cache = prepare(cfg)
    texts = read_corpus(cfg)
    train = cache.tokens("train")
    assert train.dtype == np.uint16 and cache.vocab_size == 258 and cache.bytes_per_token("train") == 1.0
    assert ByteTokenizer().decode(train) == texts["train"]
    assert cache.splits == ("train", "validation")
    stamp = os.stat(cache.path / "train.bin").st_mtime_ns

    def fail(_):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(pipeline, "read_corpus", fail)
    again = prepare(cfg)
    assert again.fingerprint == cache.fingerprint and os.stat(again.path / "train.bin").st_mtime_ns == stamp
    assert open_cache(cfg).fingerprint == cache.fingerprint
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == len(texts["train"]) and meta["format"] == pipeline.FORMAT_VERSION


def test_killed_prepare_leaves_no_cache_that_looks_valid(monkeypatch, tmp_path, text_files):
    cfg = DataConfig(corpus=text_files, cache_dir=str(tmp_path), seq_len=64)
    real_encode = ByteTokenizer.encode

    def dies_on_validation(self, text):
        if len(text) < 10_000:
            raise KeyboardInterrupt  # killed half way: train.bin written, validation not
        return real_encode(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode", dies_on_validation)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    with pytest.raises(UserError, match="no data cache .* run `lmu-jax data prepare`"):
        open_cache(cfg)
    assert list(pipeline.cache_path(cfg).parent.glob("byte.tmp-*"))
    monkeypatch.setattr(ByteTokenizer, "encode", real_encode)
    prepare(cfg)
    assert not list(pipeline.cache_path(cfg).parent.glob("byte.tmp-*"))  # the leftover is cleaned up


def test_cache_made_with_another_tokenizer_is_refused(capsys, monkeypatch, tmp_path, text_files):
    cfg = DataConfig(corpus=text_files, cache_dir=str(tmp_path), seq_len=64, tokenizer="sentencepiece",
                     sp_vocab_size=300)
    cache = prepare(cfg)
    assert "training a SentencePiece bpe tokenizer" in capsys.readouterr().out
    assert cache.vocab_size == 300 and cache.bytes_per_token("train") > 1.5
    assert cache.tokenizer().decode(cache.tokens("validation")) == read_corpus(cfg)["validation"]
    other = train_sentencepiece(numbered_lines(2000)[::-1] + b"other words entirely\n" * 50, 300)
    pipeline.sentencepiece_path(cfg).write_bytes(other)  # e.g. retrained with different data
    for opener in (open_cache, prepare):
        with pytest.raises(UserError, match=r"data cache .* was made with tokenizer \w+, this run asks for \w+; "
                                            "delete it or use another data.cache_dir"):
            opener(cfg)


def test_data_commands_info_and_tokenizer(capsys, monkeypatch, tmp_path, text_files):
    base = [f"data.cache_dir={tmp_path}", f"data.corpus={text_files}", "data.seq_len=64"]
    code, out, _ = run_cli(capsys, monkeypatch, "info", *base)
    assert code == 0
    assert re.search(r"unigram entropy of train: [\d.]+ bits/token, [\d.]+ bits/byte", out)
    assert re.search(r"validation\s+[\d,]+\s+[\d,]+\s+1.000", out) and "vocab 258" in out
    code, _, err = run_cli(capsys, monkeypatch, "tokenizer", *base)
    assert code == 2 and "data.tokenizer='byte'" in err
    code, out, _ = run_cli(capsys, monkeypatch, "tokenizer", *base, "data.tokenizer=sentencepiece",
                           "data.sp_vocab_size=300")
    assert code == 0 and "300 pieces" in out
    code, out, _ = run_cli(capsys, monkeypatch, "prepare", *base, "data.tokenizer=sentencepiece",
                           "data.sp_vocab_size=300")
    assert code == 0 and "training" not in out and "validation" in out


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10, np.uint16), 258) == pytest.approx(2.0)
    assert unigram_entropy(np.zeros(100, np.uint16), 258) == 0.0
    assert unigram_entropy(np.array([0, 0, 0, 1]), 2) == pytest.approx(0.8112781, rel=1e-6)
