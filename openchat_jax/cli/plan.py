"""`openchat-jax plan`: will this config fit the chip? Compiles the train step for a mesh of fake
CPU devices (nothing allocated) and prints memory per device, FLOPs and step time.

    openchat-jax plan --config CFG --mesh fsdp=32 [--chip v4|v5e|v5p|h100] [--mfu 0.5] [--config.k=v ...]

jax must be imported only after XLA_FLAGS/JAX_PLATFORMS are set (the fake device count is read
once, at import), so this module imports nothing that imports jax at the top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import MutableMapping

from openchat_jax.config import load_config, resolve
from openchat_jax.errors import ConfigError
from openchat_jax.cli import Subparsers, add_command
from openchat_jax.train.mesh_spec import MESH_AXES, parse_mesh

CHIP_CHOICES = ("v4", "v5e", "v5p", "h100")  # the keys of openchat_jax.train.plan.CHIPS
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def register(subparsers: Subparsers) -> None:
    p = add_command(
        subparsers, "plan",
        help="memory, FLOPs and step time of a config on a TPU/GPU mesh, compiled on fake CPU devices",
        description="Lowers and compiles the train step of CONFIG for a mesh of fake CPU devices (no parameter "
                    "memory allocated) and prints per-device memory, FLOPs per step and step time at an MFU; "
                    "override any field with --config.key=value (e.g. --config.train.micro_batches=4).",
        config_overrides=True,
    )
    p.add_argument("--config", required=True, help="config file with get_config()")
    p.add_argument("--mesh", default=None,
                   help="AXIS=SIZE[,AXIS=SIZE] over data/fsdp/tensor, e.g. fsdp=32 or fsdp=16,tensor=2 "
                        "(axes not named are 1; default: the config's mesh, which must have no -1)")
    p.add_argument("--chip", default="v5p", choices=CHIP_CHOICES, help="the accelerator of each device (default v5p)")
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilisation for step time and tokens/s (default 0.5)")
    p.add_argument("--no-compile", action="store_true", help="analytic numbers only (skips XLA's memory analysis)")
    p.add_argument("--no-xla-flops", action="store_true", help="skip XLA's FLOP count")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON to FILE")
    p.set_defaults(func=run)


def force_cpu_devices(num_devices: int, environ: MutableMapping[str, str] = os.environ) -> None:
    """Make jax (imported after this) see `num_devices` CPU devices, replacing any device count
    already in XLA_FLAGS."""
    flags = _DEVICE_COUNT.sub("", environ.get("XLA_FLAGS", "")).strip()
    environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    environ["JAX_PLATFORMS"] = "cpu"


def _late_cpu_devices(num_devices: int) -> None:
    """jax is imported (by the config file) but may not have created a backend yet: the flags
    still apply then. If it has (in-process callers such as tests), its devices are kept and
    plan_step says if there are too few."""
    import jax

    force_cpu_devices(num_devices)
    try:
        jax.config.update("jax_platforms", "cpu")
    except Exception:  # noqa: BLE001 - backend already initialised: keep its devices
        pass


def run(args: argparse.Namespace) -> int:
    # The fake device count is read when jax first creates its CPU backend, so set it before the
    # config file (which imports jax) is even loaded when --mesh gives the size.
    mesh_axes = parse_mesh(args.mesh, allow_rest=False) if args.mesh is not None else None
    if mesh_axes is not None and "jax" not in sys.modules:
        force_cpu_devices(math.prod(mesh_axes.values()))
    config = resolve(load_config(args.config, args.overrides), source=args.config)
    if mesh_axes is None:
        mesh_axes = {name: getattr(config.mesh, name) for name in MESH_AXES}
        if any(v < 1 for v in mesh_axes.values()):
            raise ConfigError(f"the config's mesh {mesh_axes} has a -1 axis: pass --mesh, e.g. --mesh fsdp=32")
        _late_cpu_devices(math.prod(mesh_axes.values()))

    from openchat_jax.train.plan import format_plan, plan_step

    plan = plan_step(
        config, mesh_axes=mesh_axes, chip=args.chip, mfu=args.mfu,
        compile=not args.no_compile, count_xla_flops=not args.no_xla_flops,
    )
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1, default=str)
            f.write("\n")
    command = ["openchat-jax plan --config", args.config]
    if args.mesh:
        command += ["--mesh", args.mesh]
    command += ["--chip", args.chip, "--mfu", f"{args.mfu:g}", *args.overrides]
    command += [flag for flag, on in (("--no-compile", args.no_compile), ("--no-xla-flops", args.no_xla_flops)) if on]
    print("`" + " ".join(command) + "`\n")
    print(format_plan(plan))
    return 0
