"""The replicated-parameter guard (MaxText's sharding_tolerance) and every family's sharding on fsdp."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from helpers import FAMILY_TINY
from lmu_jax.config import MeshConfig, config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.models import FAMILIES, build_model
from lmu_jax.sharding import (LOGICAL_RULES, SHARED_RULES, _with_family_rules, check_sufficiently_sharded, make_mesh,
                              param_shardings, replicated_fraction)


def abstract_params(family: str):
    cfg = config_from_dict({"model": {"family": family, **FAMILY_TINY[family]}, "data": {"seq_len": 32}})
    model_cfg = cfg.model.resolved(256, 32)
    model_cfg.validate()
    model = build_model(model_cfg)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32), {}))["params"]


def test_every_family_has_a_tiny_test_config():
    assert set(FAMILY_TINY) == set(FAMILIES)


def test_family_axes_join_the_shared_rules_and_cannot_remap_them():
    """A family's own logical axes (Family.logical_rules, e.g. the LMU's order) are mapped as it says;
    one that a shared rule already maps is refused."""
    rules = dict(LOGICAL_RULES)
    assert len(rules) == len(LOGICAL_RULES) and rules["order"] == "fsdp" and rules["order_reduced"] is None
    for family in FAMILIES.values():
        assert all(rules[axis] == mesh_axis for axis, mesh_axis in family.logical_rules)
    with pytest.raises(ValueError, match="'order'"):
        _with_family_rules(SHARED_RULES + (("order", None),))


@pytest.mark.parametrize("family", sorted(FAMILY_TINY))
def test_every_family_is_sufficiently_sharded_on_fsdp(family):
    boxed = abstract_params(family)
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    shapes, shardings = nn.meta.unbox(boxed), param_shardings(boxed, mesh)
    tolerance = MeshConfig().sharding_tolerance
    assert replicated_fraction(shapes, shardings) <= tolerance
    check_sufficiently_sharded(shapes, shardings, mesh, tolerance)
    whole = [jax.tree_util.keystr(path) for (path, x), s in
             zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(shardings))
             if s.is_fully_replicated and x.size >= 64 * 64]
    assert not whole, f"matrices left whole on every device: {whole}"  # only vectors (norms, biases) may be


def test_the_guard_raises_above_the_tolerance_and_not_without_fsdp():
    boxed = abstract_params("transformer")
    shapes = nn.meta.unbox(boxed)
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    shardings = param_shardings(boxed, mesh)
    fraction = replicated_fraction(shapes, shardings)
    assert 0 < fraction < 0.02
    with pytest.raises(UserError, match=r"mesh.sharding_tolerance=0.001: 1\.\d% of parameter bytes stay replicated"):
        check_sufficiently_sharded(shapes, shardings, mesh, 0.001)
    everything_whole = jax.tree.map(lambda s: s.update(spec=jax.sharding.PartitionSpec()), shardings)
    assert replicated_fraction(shapes, everything_whole) == 1.0
    with pytest.raises(UserError):
        check_sufficiently_sharded(shapes, everything_whole, mesh, 0.5)
    data_only = make_mesh(MeshConfig(data=8))  # fsdp = 1: nothing is expected to be split
    check_sufficiently_sharded(shapes, param_shardings(boxed, data_only), data_only, 0.0)
