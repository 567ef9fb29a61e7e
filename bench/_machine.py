"""A one-line description of the machine and software, for benchmark reports."""

from __future__ import annotations

import os
import platform

import jax
import optax

import scgjax as sg


def machine_info(**versions: str) -> str:
    """CPU, cores, platform, and the versions of python, jax (with its backend and devices),
    optax, scgjax and the packages given as ``name=version``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    extra = "".join(f"{name} {version}, " for name, version in versions.items())
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs "
            f"(affinity {len(os.sched_getaffinity(0))}); python {platform.python_version()}, "
            f"jax {jax.__version__} (backend {jax.default_backend()}, "
            f"devices {jax.devices()}), {extra}optax {optax.__version__}, "
            f"scgjax {sg.__version__}")
