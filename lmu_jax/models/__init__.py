"""The model registry: family name -> ``Family`` (config class, module builder, forward FLOPs).

The trainer knows a family only through this record. Adding a family = one model file that defines
``FAMILIES = [Family(...)]``, one line in ``_FAMILY_MODULES`` below, and tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import flax.linen as nn

from lmu_jax.config import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type  # a frozen dataclass subclassing ModelConfig
    build: Callable[[ModelConfig], nn.Module]  # resolved config -> linen module
    forward_flops_per_token: Callable[[ModelConfig, int], float]  # (cfg, seq_len) -> analytic forward FLOPs
    description: str = ""
    # Families with carried state (Transformer-XL memory, QRNN cells): (cfg, batch, evaluation=False) -> a
    # pytree of batch-leading arrays, all zeros for a fresh stream; the module then takes it as its second
    # argument and returns (logits, new_state). None: stateless.
    initial_state: Callable | None = None


_FAMILY_MODULES = ["transformer", "lmu", "lstm", "transformer_xl", "qrnn", "multiscale"]


def _load() -> dict[str, Family]:
    families = {}
    for module_name in _FAMILY_MODULES:
        module = importlib.import_module(f"lmu_jax.models.{module_name}")
        for family in module.FAMILIES:
            families[family.name] = family
    return families


FAMILIES: dict[str, Family] = _load()


def get_family(name: str) -> Family:
    from lmu_jax.errors import bad_value

    if name not in FAMILIES:
        raise bad_value("model.family", name, f"one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def build_model(cfg: ModelConfig) -> nn.Module:
    return get_family(cfg.family).build(cfg)
