"""Logical axis names -> mesh sharding. The model tags weights (`logical_axes` metadata on each
nnx.Param) and key activations (`constrain`); the train side chooses the mesh and the rules table
and activates them with `use_rules`. Without active rules, `constrain` does nothing."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# A rule maps one logical axis to a mesh axis, a tuple of mesh axes, or None (replicated).
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

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
