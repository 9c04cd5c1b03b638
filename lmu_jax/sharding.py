"""Device mesh from config, logical-axis rules, and NamedShardings for parameters and batches.

One mode project-wide: mesh axes are ``AxisType.Auto`` (classic GSPMD propagation; jax >= 0.10 makes
``jax.make_mesh`` Explicit by default, which would demand out_sharding on every sharded contraction).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmu_jax.errors import UserError
from lmu_jax.models import FAMILIES

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both data-parallel axes

# Logical axis -> mesh axis (None = replicated), for the axes families share. Sequence axes are never
# sharded: the LMU memory convolution and the scans run along time.
SHARED_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("position", None),
    ("norm", None),
    ("layers", None),
)


def _with_family_rules(shared) -> tuple:
    """The shared rules, then the axes of each family's own (``Family.logical_rules``), each once:
    families that name the same axis must map it alike, and no family remaps a shared axis."""
    rules = dict(shared)
    for family in FAMILIES.values():
        for axis, mesh_axis in family.logical_rules:
            if axis in dict(shared) or rules.setdefault(axis, mesh_axis) != mesh_axis:
                raise ValueError(f"family {family.name}: logical axis {axis!r} -> {mesh_axis!r} conflicts with "
                                 f"{axis!r} -> {rules[axis]!r} of the shared rules or another family")
    return tuple(rules.items())


LOGICAL_RULES = _with_family_rules(SHARED_RULES)


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise UserError(f"mesh=({mesh_cfg.data},{mesh_cfg.fsdp},{mesh_cfg.tensor}) cannot fill "
                            f"{device_count} devices: the fixed sizes' product {known} must divide it")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise UserError(f"mesh=({sizes[0]},{sizes[1]},{sizes[2]}) has {math.prod(sizes)} devices but "
                        f"{device_count} are present: the product of mesh.data, mesh.fsdp, mesh.tensor "
                        "must equal the device count (use -1 to fill)")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    # Devices in id order: process p owns a contiguous block of the flattened mesh, so its batch rows
    # are a contiguous slice of the global batch (what make_array_from_process_local_data expects).
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _fit_spec(spec: P, shape, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide a dimension (that dimension is then replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(None if not names or dim % size else (names[0] if len(names) == 1 else names))
    return P(*fitted)


def param_shardings(abstract_params, mesh: Mesh):
    """NamedShardings for a tree of boxed (nn.Partitioned) abstract parameters."""
    logical = nn.get_partition_spec(abstract_params)
    mesh_specs = nn.logical_to_mesh(logical, LOGICAL_RULES)
    shapes = nn.meta.unbox(abstract_params)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
                        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over the data-parallel axes, every other dimension whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *(None,) * (ndim - 1)))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated_fraction(shapes, shardings) -> float:
    """Fraction of parameter bytes stored whole on every device (not split at all)."""
    total = replicated_bytes = 0
    for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        total += nbytes
        if s.is_fully_replicated:
            replicated_bytes += nbytes
    return replicated_bytes / max(total, 1)


def check_sufficiently_sharded(shapes, shardings, mesh: Mesh, tolerance: float) -> None:
    """MaxText's guard: with fsdp > 1, at most `tolerance` of the parameter bytes may stay replicated."""
    if mesh.shape["fsdp"] <= 1:
        return
    fraction = replicated_fraction(shapes, shardings)
    if fraction > tolerance:
        raise UserError(f"mesh.sharding_tolerance={tolerance}: {fraction:.1%} of parameter bytes stay "
                        f"replicated on mesh {dict(mesh.shape)}; choose sizes that divide the model's "
                        "widths or raise the tolerance")
