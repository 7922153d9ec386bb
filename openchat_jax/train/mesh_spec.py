"""The mesh axes and the one `--mesh` grammar, kept free of jax: `plan` parses --mesh to set the
fake device count before jax starts its CPU backend."""

from __future__ import annotations

from openchat_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh(text: str, *, allow_rest: bool = True) -> dict[str, int]:
    """'fsdp=16,tensor=2' -> {'data': 1, 'fsdp': 16, 'tensor': 2}. Items AXIS=SIZE, separated by
    commas or spaces; axes not named are 1. One SIZE may be -1 (the remaining devices, see
    `mesh.mesh_shape`) unless `allow_rest` is False, for a caller that must know every size."""
    out = {name: 1 for name in MESH_AXES}
    seen: set[str] = set()
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or name not in out:
            raise ConfigError(f"--mesh {text!r}: expected AXIS=SIZE items with AXIS in {MESH_AXES}, got {item!r}")
        if name in seen:
            raise ConfigError(f"--mesh {text!r}: axis {name!r} given twice")
        size = -1 if value == "-1" else int(value) if value.isdigit() else 0
        if size == -1 and not allow_rest:
            raise ConfigError(f"--mesh {text!r}: {name}=-1 (the remaining devices) needs devices to count; "
                              "give every size")
        if size == -1 and -1 in out.values():
            raise ConfigError(f"--mesh {text!r}: only one axis may be -1")
        if size == 0:
            raise ConfigError(f"--mesh {text!r}: {name} must be a positive integer or -1, got {value!r}")
        out[name] = size
        seen.add(name)
    if not seen:
        raise ConfigError(f"--mesh {text!r}: name at least one axis, e.g. fsdp=32")
    return out
