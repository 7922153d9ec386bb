"""The device mesh (axes `data`, `fsdp`, `tensor`) and shardings for optimizer state and batches
(the rules table and the params' shardings: model/partitioning.py, model/llama.py)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from openchat_jax.errors import ConfigError
from openchat_jax.model.partitioning import BATCH_MESH_AXES
from openchat_jax.train.mesh_spec import MESH_AXES


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolve the `mesh` config section (one axis may be -1 = the remaining devices)."""
    sizes = []
    for name in MESH_AXES:
        value = mesh_cfg.get(name, 1)
        if not isinstance(value, int) or (value < 1 and value != -1):
            raise ConfigError(f"mesh.{name}={value!r} must be a positive int or -1")
        sizes.append(value)
    unknown = [n for n, s in zip(MESH_AXES, sizes) if s == -1]
    if len(unknown) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {unknown}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but {num_devices} are available"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_axis_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(tx: optax.GradientTransformation, params_abstract: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Each copy of the params inside the optimizer state (Adam's mu, nu) is sharded like the
    params; everything else (step counts) is replicated."""
    state_abstract = jax.eval_shape(tx.init, params_abstract)
    rep = replicated(mesh)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        state_abstract,
        params_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, L] arrays: rows over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_MESH_AXES, None))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """Global [B, L] arrays from this process's rows [B_local, L] (multi-host: each process passes
    only its own rows; B = B_local * process_count)."""
    sharding = batch_sharding(mesh)
    keys = list(local) if keys is None else keys
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k])) for k in keys}
