"""FLOP and parameter accounting: one convention for every family.

Convention (docs/flops.md says why and how the tests check it):
- ``forward_flops_per_token`` (per family, in its model file) counts matmuls as 2·m·k per token, the
  unembedding included, the embedding gather excluded; causal attention counts half of the full QKᵀ
  and AV (``dense_flops``, ``attention_flops`` in lmu_jax/models/base.py); family-specific ops (LMU
  memory convolutions, scans) are counted by their own formulas.
- training FLOPs = 3 × forward (backward = 2 × forward): ``model_flops_per_token``. A family with a
  carry is counted as the trainer runs it: with its memory when the carry is fed (data.order streams),
  without when it is not (Transformer-XL with the empty carry computes no memory rows).
- ``kaplan_flops_per_token`` = 6·N with N the non-embedding parameters, logged beside it.
- Non-embedding parameters exclude every parameter with a ``vocab`` or ``position`` logical axis
  (token embeddings, untied output heads, learned position tables).
- ``xla_flops`` asks XLA's ``cost_analysis()`` of a compiled function, as a cross-check.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmu_jax.models import build_model, get_family

EMBEDDING_AXES = ("vocab", "position")


def model_flops_per_token(cfg, seq_len: int, *, feeds_carry: bool) -> float:
    """Training FLOPs per token: 3 × the family's analytic forward count, as the trainer computes it:
    ``feeds_carry`` (``lmu_jax.models.feeds_carry``) says whether the run feeds the family's carry."""
    return 3.0 * get_family(cfg.family).forward_flops_per_token(cfg, seq_len, feeds_carry=feeds_carry)


def kaplan_flops_per_token(non_embedding_params: int) -> float:
    return 6.0 * non_embedding_params


def abstract_variables(cfg, seq_len: int):
    """Shapes of the model's variables (boxed with logical axes), without allocating anything."""
    model = build_model(cfg)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, {}), tokens)


def param_counts(cfg, seq_len: int = 16) -> dict:
    """Exact parameter counts from the model's own shapes: total and non-embedding."""
    variables = abstract_variables(cfg, seq_len)["params"]
    total = embedding = 0
    leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
        axes = leaf.names if isinstance(leaf, nn.Partitioned) else ()
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        size = math.prod(value.shape)
        total += size
        if any(a in EMBEDDING_AXES for a in axes if a):
            embedding += size
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding}


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function (``jax.jit(f).lower(*args).compile()``) as XLA's
    ``cost_analysis()`` counts them: what its kernels execute, recomputation (remat) included; None where
    XLA gives no count. A while loop's body is counted once whatever its trip count, so for a program
    with a loop that matters (a scan over time) the count is a lower bound."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    flops = (analysis or {}).get("flops")
    return None if flops is None else float(flops)
