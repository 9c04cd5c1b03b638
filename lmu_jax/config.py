"""Every setting of a run as frozen dataclasses; loaded from YAML plus dotted overrides.

    cfg = load_config("experiments/configs/default.yaml", ["model.d_model=256", "train.steps=2000"])

The ``model`` section is family-specific: ``model.family`` picks the family, whose config class (a
subclass of ``ModelConfig``, lmu_jax/models/base.py) the registry (``lmu_jax.models``) gives; it says which
other keys are allowed and how they are checked.
Parsing is strict: an unknown key, a wrong type or an out-of-range value raises ``UserError`` naming
the field (``train.steps``), the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmu_jax import storage
from lmu_jax.data.tokenizers import BYTE_VOCAB_SIZE
from lmu_jax.errors import UserError, bad_value
from lmu_jax.models import FAMILIES, get_family
from lmu_jax.models.base import ModelConfig

DATA_ORDERS = ("auto", "shuffled", "streams")
EVAL_SPLITS = ("validation", "test")


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "kjv"  # kjv | pystdlib | enwik8 | text8 | files:<glob> | tfds:<name>[/<config>]
    tokenizer: str = "byte"  # byte | sentencepiece
    sp_vocab_size: int = 4096  # vocabulary of a trained SentencePiece model
    sp_model_type: str = "bpe"  # SentencePiece algorithm: bpe (trains in seconds) | unigram (~10x slower on code)
    seq_len: int = 256  # tokens per training window (the model sees seq_len, predicts seq_len)
    cache_dir: str = "~/.cache/lmu_jax"  # tokenized corpora and tokenizers; local, or gs://... (mirrored locally)
    data_dir: str = ""  # where enwik8/text8 files or prepared TFDS datasets live ("" = default)
    val_windows: int = 64  # fixed validation windows evaluated each time
    max_bytes: int = 0  # cap on the text read from the corpus (0 = all); for quick demos
    text_key: str = "text"  # tfds corpora: the feature that holds the text (bytes or str)
    order: str = "auto"  # shuffled: windows in a seeded random order | streams: each batch row reads one
    #                      contiguous stream, segment after segment (carried state, e.g. Transformer-XL
    #                      memory) | auto: streams for families that carry state, shuffled otherwise

    def validate(self) -> None:
        _positive(self, "seq_len", "val_windows")
        if self.order not in DATA_ORDERS:
            raise bad_value("data.order", self.order, " | ".join(DATA_ORDERS))
        if self.tokenizer not in ("byte", "sentencepiece"):
            raise bad_value("data.tokenizer", self.tokenizer, "byte or sentencepiece")
        if self.sp_model_type not in ("bpe", "unigram"):
            raise bad_value("data.sp_model_type", self.sp_model_type, "bpe or unigram")
        if self.sp_vocab_size < 64:
            raise bad_value("data.sp_vocab_size", self.sp_vocab_size, "an int >= 64")
        if self.max_bytes < 0:
            raise bad_value("data.max_bytes", self.max_bytes, "0 (all) or a positive int")
        if not self.text_key:
            raise bad_value("data.text_key", self.text_key, "the name of a text feature, e.g. text")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # cosine (warmup + cosine to the horizon) | wsd | constant
    warmup_steps: int = 50  # linear warmup; the first step already has lr > 0
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine and wsd)
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent in the final cooldown
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # AdamW decoupled decay, on matrices only
    grad_clip: float = 1.0  # global-norm clipping (0 = off)

    def validate(self) -> None:
        _positive(self, "lr")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise bad_value("optim.schedule", self.schedule, "cosine, wsd or constant")
        for name in ("min_lr_ratio", "decay_fraction", "b1", "b2"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise bad_value(f"optim.{name}", value, "a number in [0, 1]")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eps"):
            if getattr(self, name) < 0:
                raise bad_value(f"optim.{name}", getattr(self, name), "a number >= 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # optimizer steps; the LR schedule's horizon
    batch_size: int = 16  # global batch, in sequences
    microbatches: int | str = "auto"  # gradient accumulation: the batch is split into this many parts (the same
    #                                  update); auto: resolve_auto's choice for the platform (CPU: parts of ~512 tokens)
    seed: int = 0  # parameters and data order
    eval_every: int = 100  # steps between evaluations (0 = only at the end)
    nonfinite: str = "stop"  # stop | skip: what a NaN/Inf loss or gradient does
    profile_steps: int = 0  # >0: write a jax.profiler trace of this many steps after warmup
    init_from: str = ""  # a run directory or one of its checkpoints (<run>/checkpoints/<step>): start from its
    #                      parameters, with a fresh optimizer and step 0 (training by phases); "" = fresh init
    branch_from: str = ""  # <run>/checkpoints/<step> of a wsd run: continue it WITH its optimizer state and step,
    #                        to this run's own (shorter) horizon: a cooldown branch. Relative paths are taken
    #                        from this run directory's parent (a sweep's sibling runs); "" = off

    def validate(self) -> None:
        _positive(self, "steps", "batch_size")
        if self.microbatches != "auto" and (isinstance(self.microbatches, str) or self.microbatches <= 0):
            raise bad_value("train.microbatches", self.microbatches, "auto or a positive int")
        if self.microbatches != "auto" and self.batch_size % self.microbatches:
            raise bad_value("train.microbatches", self.microbatches,
                            f"a divisor of train.batch_size={self.batch_size}")
        if self.eval_every < 0:
            raise bad_value("train.eval_every", self.eval_every, "0 (end only) or a positive int")
        if self.nonfinite not in ("stop", "skip"):
            raise bad_value("train.nonfinite", self.nonfinite, "stop or skip")
        if self.profile_steps < 0:
            raise bad_value("train.profile_steps", self.profile_steps, "an int >= 0")
        if self.branch_from and self.init_from:
            raise bad_value("train.branch_from", self.branch_from, "empty when train.init_from is set (one source)")


@dataclass(frozen=True)
class EvalConfig:
    """The final evaluation over a whole split, beside the fixed validation windows (lmu_jax/train/evaluate.py):
    families that carry state read it as contiguous streams with their evaluation memory; the others
    through sliding windows."""

    split: str = "validation"  # validation | test (corpora that have one: enwik8, text8)
    streams: int = 0  # carried state: contiguous streams scored in parallel (0 = train.batch_size)
    seg_len: int = 0  # carried state: tokens per segment (0 = data.seq_len); Transformer-XL enwik8 test: 80
    stride: int = 0  # stateless: each window after the first scores its last `stride` tokens (0 = seq_len / 2)
    max_tokens: int = 0  # score the first this many targets of the split only (0 = all of it)
    word_level: bool = False  # the corpus is word-level: also report perplexity per word (words + line ends)

    def validate(self) -> None:
        if self.split not in EVAL_SPLITS:
            raise bad_value("eval.split", self.split, " | ".join(EVAL_SPLITS))
        for name in ("streams", "seg_len", "stride", "max_tokens"):
            if getattr(self, name) < 0:
                raise bad_value(f"eval.{name}", getattr(self, name), "0 (default) or a positive int")


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel axis size (-1 = the devices left over)
    fsdp: int = 1  # parameter/optimizer sharding axis (ZeRO-3 style)
    tensor: int = 1  # tensor-parallel axis (heads, mlp, vocab)
    sharding_tolerance: float = 0.02  # max fraction of parameter bytes left replicated when fsdp > 1

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if not 0.0 <= self.sharding_tolerance <= 1.0:
            raise bad_value("mesh.sharding_tolerance", self.sharding_tolerance, "a fraction in [0, 1]")
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise bad_value("mesh", dict(data=self.data, fsdp=self.fsdp, tensor=self.tensor),
                            "positive sizes, at most one of them -1 (fill)")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (0 = only at the end and on SIGTERM)
    keep: int = 3  # keep the last N checkpoints
    keep_every: int = 0  # additionally keep every K-th step forever (0 = off)
    at: tuple[int, ...] = ()  # also checkpoint at these steps and keep them (cooldown branch points)
    async_save: bool = True  # write in the background while training goes on

    def validate(self) -> None:
        for key in ("every", "keep_every"):
            if getattr(self, key) < 0:
                raise bad_value(f"checkpoint.{key}", getattr(self, key), "an int >= 0 (0 = off)")
        _positive(self, "keep")
        if any(step < 1 for step in self.at):
            raise bad_value("checkpoint.at", list(self.at), "a list of steps >= 1")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = True  # also write TensorBoard events when tensorboardX is installed
    progress: bool = True  # tqdm progress bar (process 0)
    every: int = 1  # steps between metric lines

    def validate(self) -> None:
        _positive(self, "every")


@dataclass(frozen=True)
class DistributedConfig:
    coordinator: str = ""  # host:port of process 0 ("" = auto-detect: TPU, SLURM, MPI, or single process)
    num_processes: int = 0  # with coordinator: total processes
    process_id: int = -1  # with coordinator: this process
    timeout_s: int = 300  # initialisation and barrier timeout

    def validate(self) -> None:
        if self.coordinator and (self.num_processes < 1 or not 0 <= self.process_id < self.num_processes):
            raise bad_value("distributed.process_id", self.process_id,
                            f"0 <= process_id < num_processes={self.num_processes} with a coordinator")
        _positive(self, "timeout_s")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> "RunConfig":
        for f in dataclasses.fields(self):
            if f.name != "model":
                getattr(self, f.name).validate()
        self.resolved_model().validate()  # after data: it resolves against data.seq_len and the tokenizer
        if self.eval.stride > self.data.seq_len:
            raise bad_value("eval.stride", self.eval.stride, f"at most data.seq_len={self.data.seq_len} (0 = half of it)")
        return self

    def resolved_model(self) -> ModelConfig:
        """The model config the model is built from: ``model`` with what comes from the data filled in
        (the tokenizer's vocabulary, family defaults that follow data.seq_len such as the LMU's theta).
        ``validate`` checks this one, so a loaded config's resolved model is valid and no user of it
        checks it again."""
        return self.model.resolved(tokenizer_vocab_size(self.data), self.data.seq_len)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "RunConfig":
        return dataclasses.replace(self, **sections)


def tokenizer_vocab_size(data: DataConfig) -> int:
    """The vocabulary ``data``'s tokenizer has, known without reading the corpus: the byte tokenizer's, or
    the SentencePiece size asked for (a trained model has exactly that many pieces, or training fails)."""
    return BYTE_VOCAB_SIZE if data.tokenizer == "byte" else data.sp_vocab_size


# ---------------------------------------------------------------------------------------------
# Parsing


def _positive(section, *names):
    prefix = _SECTION_NAMES[type(section)]
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise bad_value(f"{prefix}.{name}", value, "a positive number")


_SECTION_NAMES = {
    DataConfig: "data", OptimConfig: "optim", TrainConfig: "train", EvalConfig: "eval", MeshConfig: "mesh",
    CheckpointConfig: "checkpoint", LogConfig: "log", DistributedConfig: "distributed",
}


def _coerce(path: str, value: Any, annotation) -> Any:
    """Check (and gently convert: int -> float) one value against a field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(path, value, arg)
                except UserError:
                    pass
        raise bad_value(path, value, f"of type {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise bad_value(path, value, "true or false")
    if annotation in (int, float) and isinstance(value, str):
        value = _yaml11_number(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 in YAML
        raise bad_value(path, value, "an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise bad_value(path, value, "a finite number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise bad_value(path, value, "a string")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad_value(path, value, "a list")
        (item,) = typing.get_args(annotation)[:1]
        return tuple(_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value))
    raise TypeError(f"unsupported config annotation {annotation} at {path}")


def _yaml11_number(text: str):
    try:
        return float(text) if any(c in text.lower() for c in ".e") else int(text)
    except ValueError:
        return text


def build_section(cls, values: dict, path: str):
    """Make a frozen dataclass from a dict, strictly: unknown keys and wrong types are errors."""
    if not isinstance(values, dict):
        raise bad_value(path, values, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = _field_names(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{path}.{key} is not a known key; allowed: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(f"{path}.{key}", value, hints[key])
    return cls(**kwargs)


def _model_config_class(family: str):
    return get_family(family).config_cls


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_model_keys(family: str, cls, values: dict) -> None:
    """A model key of another family names the families that have it (a misspelled key gets the
    generic message of ``build_section``)."""
    for key in values:
        owners = sorted(name for name, f in FAMILIES.items() if key in _field_names(f.config_cls))
        if key not in _field_names(cls) and owners:
            raise UserError(f"model.{key} is not a key of model.family={family} (it is one of {', '.join(owners)}); "
                            f"remove it or choose one of those families; {family} has: "
                            f"{', '.join(sorted(_field_names(cls)))}")


def config_from_dict(raw: dict) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (as loaded from YAML)."""
    raw = dict(raw or {})
    sections = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key in raw:
        if key not in sections:
            raise UserError(f"{key} is not a known section; allowed: {', '.join(sections)}")
    kwargs = {}
    for name, f in sections.items():
        values = raw.get(name) or {}
        if name == "model":
            if not isinstance(values, dict):
                raise bad_value("model", values, "a mapping of keys to values")
            family = values.get("family", ModelConfig.family)
            if not isinstance(family, str):
                raise bad_value("model.family", family, "a family name (lmu-jax flops --list)")
            cls = _model_config_class(family)
            _check_model_keys(family, cls, values)
        else:
            cls = typing.get_type_hints(RunConfig)[name]
        kwargs[name] = build_section(cls, values, name)
    return RunConfig(**kwargs).validate()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.d_model=256`` -> (['model', 'd_model'], 256); the value is parsed as YAML."""
    if "=" not in text:
        raise bad_value("override", text, "key=value with a dotted key, e.g. train.steps=100")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise bad_value("override", text, "section.key=value, e.g. model.d_model=256")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def merge_overrides(raw: dict, overrides: list[str]) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise bad_value(section, target, "a mapping of keys to values")
        target[key] = value
    return merged


def read_yaml(path: str | Path) -> dict:
    path = storage.path(path, "--config")
    if not path.is_file():
        raise bad_value("--config", str(path), "an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad_value("--config", str(path), "a YAML mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    raw = read_yaml(path) if path else {}
    overrides = list(overrides)
    raw, notice = switch_family(raw, overrides, str(path))
    cfg = config_from_dict(merge_overrides(raw, overrides))
    if notice:  # only for a config that loads: an error stays the one line
        print(notice, file=sys.stderr)
    return cfg


def switch_family(raw: dict, overrides: list[str], source: str) -> tuple[dict, str]:
    """A config file written for one family, switched to another by an override (``model.family=lstm``
    on ``default.yaml``): the file's model keys that its own family has and the new one lacks are
    dropped; returns the file's dict without them and a notice line naming them ("" if none). Everything
    else stays strict: a key the file's own family does not know either (a typo) and an unknown key
    given as an override are still errors."""
    family = None
    for text in overrides:
        (section, key), value = parse_override(text)
        if (section, key) == ("model", "family"):
            family = value
    model = raw.get("model")
    if not isinstance(family, str) or not isinstance(model, dict):
        return raw, ""
    own = model.get("family", ModelConfig.family)
    if family == own or not isinstance(own, str):
        return raw, ""
    new_keys, own_keys = _field_names(_model_config_class(family)), _field_names(_model_config_class(own))
    dropped = [key for key in model if key not in new_keys and key in own_keys]
    if not dropped:
        return raw, ""
    notice = (f"notice: model.family={family} has no {', '.join(f'model.{k}' for k in dropped)}: "
              f"ignoring these {own} keys of {source}")
    return dict(raw, model={k: v for k, v in model.items() if k not in dropped}), notice


# The `auto` settings. On CPU a train step is fastest when one part's activations stay in the last-level
# cache: gradient accumulation over microbatches of this many tokens (at least one sequence) measured
# 1.4x faster than one pass at d 1024 (benchmarks/results/cpu.md), for the families whose record says so
# (``Family.cpu_microbatches``); the LSTM's recurrent matmuls have one row per sequence of a part, and
# parts of 2 rows starved them (3x slower).
# Accelerators keep one pass (their memory is what microbatches trade for) and remat (model.remat) on.
CPU_MICROBATCH_TOKENS = 512


def resolve_auto(cfg: RunConfig, platform: str, data_parallel: int = 1) -> RunConfig:
    """``cfg`` with every ``auto`` speed setting made concrete for `platform` (jax.default_backend()):
    ``train.microbatches``, and ``model.remat`` and ``model.hoist_inputs`` (families that have them). The Trainer calls this first, so
    the run's config.yaml and checkpoints hold the values used (its run id stays that of the config as
    given: a sweep's planned id names its run directory). Neither changes the update:
    microbatches split the same batch's gradient sum, remat recomputes instead of storing."""
    model, train = cfg.model.resolve_auto(platform), cfg.train
    if train.microbatches == "auto":
        parts = 1
        if platform == "cpu" and get_family(model.family).cpu_microbatches:
            # the most parts whose rows are a multiple of the data-parallel size and hold >= the tokens
            for count in range(1, train.batch_size + 1):
                rows = train.batch_size // count
                if train.batch_size % count == 0 and rows % data_parallel == 0 \
                        and rows * cfg.data.seq_len >= CPU_MICROBATCH_TOKENS:
                    parts = count
        train = dataclasses.replace(train, microbatches=parts)
    return cfg.replace(model=model, train=train)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def run_id(cfg: RunConfig) -> str:
    """A stable 10-hex-digit hash of what defines the experiment (not how or where it runs).

    Only values that differ from their defaults count, so a key added later with a default that keeps
    the old behaviour leaves every existing run's id (and a committed study's results) valid."""
    defaults = config_from_dict({"model": {"family": cfg.model.family}}).to_dict()
    defining = {}
    for section, values in cfg.to_dict().items():
        if section in ("mesh", "log", "distributed", "checkpoint"):
            continue
        changed = {k: v for k, v in values.items() if defaults[section].get(k) != v or k == "family"}
        if changed:
            defining[section] = changed
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:10]
