"""Logical axis names -> mesh sharding, for training and inference alike. The model tags weights
(`logical_axes` metadata on each nnx.Param, read by `shardings_from_metadata`) and key activations
(`constrain`); THE rules table, `LOGICAL_AXIS_RULES`, maps them onto the mesh axes `data`, `fsdp`,
`tensor`, and `use_rules` activates it while tracing. Without active rules, `constrain` does
nothing.

Parameters are sharded over `fsdp` along `embed` and over `tensor` along heads/mlp/vocab; batches
over `data` x `fsdp`. A dimension that a mesh axis does not divide is replicated over that axis
(e.g. a 32001-row vocabulary on tensor=2) and reported once, rather than failing deep in XLA.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

# A rule maps one logical axis to a mesh axis, a tuple of mesh axes, or None (replicated).
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

BATCH_MESH_AXES = ("data", "fsdp")

# The one table: logical axis -> mesh axis (or axes, or None = replicated). A mesh axis is used at
# most once per array (the first logical axis claiming it wins; see logical_to_spec), so an
# activation [batch, length, embed] is sharded by batch over (data, fsdp) and not again by embed.
LOGICAL_AXIS_RULES: Rules = (
    ("batch", BATCH_MESH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("openchat_rules", default=None)


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """Map logical axes to a PartitionSpec. A mesh axis is used at most once per array (the first
    logical axis that claims it wins), mesh axes of size 1 are dropped, and with `shape` a mesh
    axis that does not divide its dimension is dropped too (that dimension is replicated instead
    of forcing XLA into a full rematerialisation)."""
    table: dict[str, tuple[str, ...]] = {}
    for logical, physical in rules:
        if logical in table:
            continue
        if physical is None:
            table[logical] = ()
        elif isinstance(physical, str):
            table[logical] = (physical,)
        else:
            table[logical] = tuple(physical)
    used: set[str] = set()
    spec = []
    for dim, axis in enumerate(axes):
        physical = tuple(
            p for p in table.get(axis, ()) if p not in used and (mesh is None or mesh.shape.get(p, 1) > 1)
        ) if axis is not None else ()
        if shape is not None and mesh is not None:
            kept: list[str] = []
            for p in physical:
                if shape[dim] % (mesh.shape[p] * _product(mesh, kept)) == 0:
                    kept.append(p)
            physical = tuple(kept)
        used.update(physical)
        spec.append(None if not physical else physical[0] if len(physical) == 1 else physical)
    return PartitionSpec(*spec)


def _product(mesh: Mesh, names: Sequence[str]) -> int:
    out = 1
    for n in names:
        out *= mesh.shape[n]
    return out


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) set by the innermost `use_rules`, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes, if rules are active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))


def shard_count(axis: str, size: int) -> int:
    """How many shards `constrain` splits a dimension of `size` along logical `axis` into (1 when
    no rules are active)."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, rules = active
    spec = logical_to_spec((axis,), rules, mesh, (size,))[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return _product(mesh, names)


def sharding_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                 rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """A mesh axis that does not divide its dimension is dropped (that dimension is replicated
    over it); logged once per array."""
    spec = logical_to_spec(logical_axes, rules, mesh, shape)
    if spec != logical_to_spec(logical_axes, rules, mesh):
        log.warning("shape %s (logical axes %s): a mesh axis does not divide its dimension, sharded as %s",
                    tuple(shape), tuple(logical_axes), spec)
    return NamedSharding(mesh, spec)


def shardings_from_metadata(params: nnx.State, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> dict[str, Any]:
    """The plain-dict layout of `params` (an nnx.State of Params, e.g. of an `nnx.eval_shape`d
    module) with a NamedSharding at each leaf, from the Param's `logical_axes` metadata."""
    def sharding(param: nnx.Variable) -> NamedSharding:
        if "logical_axes" not in param.get_metadata():
            raise ValueError(f"a parameter of shape {param.shape} has no logical_axes metadata")
        return sharding_for(param.shape, param.logical_axes, mesh, rules)

    return nnx.to_pure_dict(jax.tree.map(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
