"""Test-session setup: XLA's backend optimisation off for the test processes.

Most of the suite's time is XLA compiling small programs once each (examples' smoke runs,
notebooks at reduced sizes, statistical tests over vmapped keys), not running them. With
``--xla_backend_optimization_level=0`` (LLVM's passes off; XLA's own graph optimisations
still run, and the values are the same up to floating-point rounding) the suite ran in
11 min 19 s against about 15 min (2 cores, ``-n 2``), every test passing. It is read when
JAX starts its CPU backend, which no test has done when this file is imported; a flag
already set in ``XLA_FLAGS`` is kept.
Benchmarks (``bench/``) and user code are not affected.
"""

from __future__ import annotations

import os

_FLAG = "--xla_backend_optimization_level"

if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=0".strip()
