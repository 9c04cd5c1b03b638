"""What every family is written with: ``ModelConfig`` (the keys all families share), the registry record
``Family`` and its ``ShapeRule``, and the per-operation FLOP counts that the families' analytic counts add up.

A leaf module (it imports no other lmu_jax module but ``errors``), so that the family modules, the
registry (``lmu_jax.models``) and ``lmu_jax.config``, which asks the registry for a family's config
class, import each other in one direction only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from lmu_jax.errors import bad_value

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Keys shared by every family; each family subclasses this with its own keys."""

    family: str = "transformer"  # registry name, see `lmu-jax flops --list`
    vocab_size: int = 0  # 0 = take it from the tokenizer
    d_model: int = 128  # residual width
    n_layers: int = 2  # number of blocks
    tie_embeddings: bool = True  # share the input embedding with the output projection
    dtype: str = "float32"  # compute dtype; parameters stay float32, loss and softmax float32

    def resolved(self, vocab_size: int, seq_len: int) -> "ModelConfig":
        """Fill what comes from the data (vocabulary; families add e.g. theta = seq_len)."""
        return dataclasses.replace(self, vocab_size=self.vocab_size or vocab_size)

    @staticmethod
    def check_auto_flag(name: str, value) -> None:
        """A speed setting that is true, false or auto (``resolve_auto`` makes auto concrete)."""
        if value not in (True, False, "auto"):
            raise bad_value(f"model.{name}", value, "true, false or auto")

    def resolve_auto(self, platform: str) -> "ModelConfig":
        """This config with its ``auto`` speed settings made concrete for `platform` (the model's share of
        ``lmu_jax.config.resolve_auto``); a family with such a key overrides this."""
        return self

    def eval_context(self) -> dict:
        """Settings that shape a whole-split evaluation with carried state, recorded beside its result
        (``eval.json`` ``split_eval``); a family whose evaluation has such settings overrides this."""
        return {}

    def validate(self) -> None:
        for name in ("d_model", "n_layers"):
            if getattr(self, name) <= 0:
                raise bad_value(f"model.{name}", getattr(self, name), "a positive number")
        if self.vocab_size < 0:
            raise bad_value("model.vocab_size", self.vocab_size, "0 (from the tokenizer) or a positive int")
        if self.dtype not in DTYPES:
            raise bad_value("model.dtype", self.dtype, f"one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class ShapeRule:
    """How ``lmu_jax.sizing`` scales a family to a target size: d_model is the free width, these follow it."""

    heads: str = ""  # the key of the attention head count, set to heads ~64 wide with an even width; "" = none
    scaled: tuple[str, ...] = ()  # widths kept in proportion to d_model where the base sets them (0 stays 0)
    depth: bool = False  # n_layers follows the target too, keeping the base config's d_model / n_layers
    paper_width: bool = False  # the LMU paper's width rule d = sqrt(N / 24) (sizing rule="paper") applies


def no_carry(cfg: ModelConfig, batch: int, evaluation: bool = False) -> dict:
    """A stateless family's carry: empty (a pytree with no leaves, so passing it along costs nothing)."""
    return {}


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type  # a frozen dataclass subclassing ModelConfig
    build: Callable[[ModelConfig], Any]  # resolved config -> linen module
    # (cfg, seq_len, feeds_carry=...) -> analytic forward FLOPs per token; ``feeds_carry`` says whether the run
    # feeds the family's carry (so that e.g. Transformer-XL's memory rows are computed)
    forward_flops_per_token: Callable[..., float]
    description: str = ""
    # (cfg, batch, evaluation=False) -> the carry of `batch` fresh streams: a pytree of batch-leading arrays,
    # all zeros (Transformer-XL memory, QRNN cells), or ``no_carry``'s empty one for a stateless family.
    # Every module is called as ``apply(variables, tokens, carry, train=...)`` and returns (logits, carry).
    initial_carry: Callable[..., Any] = no_carry
    shape_rule: ShapeRule = ShapeRule()
    # (logical axis, mesh axis or None) for the axes only this family's parameters have
    # (``lmu_jax.sharding`` adds them to the shared rules)
    logical_rules: tuple[tuple[str, str | None], ...] = ()
    # train.microbatches=auto on CPU accumulates over parts of ~512 tokens (lmu_jax.config.resolve_auto)
    cpu_microbatches: bool = False

    @property
    def has_carry(self) -> bool:
        """Whether the family carries state from one window of a stream to the next."""
        return self.initial_carry is not no_carry


def dense_flops(d_in: int, d_out: int) -> float:
    """Forward FLOPs per token of a d_in x d_out matmul (multiply + add)."""
    return 2.0 * d_in * d_out


def attention_flops(d_attn: int, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of QKᵀ and AV over a window of seq_len; causal counts half the map."""
    full = 2.0 * 2.0 * d_attn * seq_len
    return full / 2 if causal else full
