"""The model registry: family name -> ``Family`` (config class, module builder, forward FLOPs, ...).

The trainer knows a family only through this record (``lmu_jax/models/base.py``). Adding a family = one
model file that defines ``FAMILIES = [Family(...)]``, one line in ``_FAMILY_MODULES`` below, and tests.
"""

from __future__ import annotations

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmu_jax.errors import bad_value
from lmu_jax.models.base import Family, ModelConfig, no_carry

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
    if name not in FAMILIES:
        raise bad_value("model.family", name, f"one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def build_model(cfg: ModelConfig) -> nn.Module:
    return get_family(cfg.family).build(cfg)


def data_order(model_cfg: ModelConfig, order: str) -> str:
    """``data.order`` resolved: ``auto`` is ``streams`` for a family with a carry, else ``shuffled``."""
    if order != "auto":
        return order
    return "streams" if get_family(model_cfg.family).has_carry else "shuffled"


def feeds_carry(model_cfg: ModelConfig, order: str) -> bool:
    """Whether a run feeds the family's carry from window to window: the family has one and the data come
    as streams."""
    return get_family(model_cfg.family).has_carry and data_order(model_cfg, order) == "streams"


def initial_carry(model_cfg: ModelConfig, order: str, batch: int, evaluation: bool = False):
    """The carry of `batch` fresh streams as a run on data order `order` feeds it: the family's
    (``Family.initial_carry``) where the run carries state, else the empty one (``no_carry``)."""
    make = get_family(model_cfg.family).initial_carry if feeds_carry(model_cfg, order) else no_carry
    return make(model_cfg, batch, evaluation)


def reset_rows(carry, starts):
    """Zero the carry of the rows where a new stream starts (starts: (batch,) bool): a fresh stream's carry
    is all zeros, for every family (``Family.initial_carry``). An empty carry never reads `starts`."""
    return jax.tree.map(lambda x: jnp.where(starts.reshape(-1, *(1,) * (x.ndim - 1)), jnp.zeros_like(x), x), carry)
