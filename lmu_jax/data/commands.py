"""`lmu-jax data prepare | tokenizer | info [--config FILE] [section.key=value ...]`."""

from __future__ import annotations

import time

from lmu_jax.config import load_config
from lmu_jax.data.pipeline import prepare, sentencepiece_path, train_tokenizer, unigram_entropy


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="tokenize, cache and inspect corpora")
    commands = data.add_subparsers(dest="data_command", required=True)
    for name, func, text in [
        ("prepare", _prepare, "tokenize the corpus into the data cache (once; later calls reuse it)"),
        ("tokenizer", _tokenizer, "train the SentencePiece tokenizer on the corpus's train split"),
        ("info", _info, "corpus, tokenizer, token and byte counts, unigram entropy (prepares if needed)"),
    ]:
        parser = commands.add_parser(name, help=text, description=text)
        parser.add_argument("--config", help="YAML run config (data section used)")
        parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.corpus=pystdlib")
        parser.set_defaults(func=func)
        if name == "tokenizer":
            parser.add_argument("--force", action="store_true",
                                help="retrain even if the model exists (caches made with the old one are then refused)")


def _data_config(args):
    return load_config(args.config, args.overrides).data


def _prepare(args) -> int:
    cache = prepare(_data_config(args))
    counts = ", ".join(f"{split} {cache.meta['splits'][split]['tokens']:,}" for split in cache.splits)
    print(f"data cache {cache.path}: {counts} tokens; fingerprint {cache.fingerprint[:16]}")
    return 0


def _tokenizer(args) -> int:
    cfg = _data_config(args)
    start = time.perf_counter()
    tokenizer = train_tokenizer(cfg, force=args.force)
    print(f"tokenizer {sentencepiece_path(cfg)}: {tokenizer.vocab_size} pieces, fingerprint "
          f"{tokenizer.fingerprint[:16]} ({time.perf_counter() - start:.1f} s)")
    return 0


def _info(args) -> int:
    cfg = _data_config(args)
    cache = prepare(cfg)
    meta = cache.meta
    tokenizer = meta["tokenizer"]
    print(f"corpus       {cfg.corpus}  (max_bytes {cfg.max_bytes or 'all'}, sha256 {meta['corpus']['sha256'][:16]})")
    print(f"tokenizer    {tokenizer['name']}  vocab {cache.vocab_size}  fingerprint {tokenizer['fingerprint'][:16]}")
    print(f"cache        {cache.path}  fingerprint {cache.fingerprint[:16]}")
    print(f"{'split':<12} {'tokens':>13} {'bytes':>13} {'bytes/token':>12} {'documents':>10}")
    for split in cache.splits:
        counts = meta["splits"][split]
        print(f"{split:<12} {counts['tokens']:>13,} {counts['bytes']:>13,} {cache.bytes_per_token(split):>12.3f} "
              f"{counts['documents']:>10,}")
    bits = unigram_entropy(cache.tokens("train"), cache.vocab_size)
    print(f"unigram entropy of train: {bits:.4f} bits/token, {bits / cache.bytes_per_token('train'):.4f} bits/byte "
          "(a context-free baseline a model must beat)")
    return 0
