"""Data-flow provenance: which inputs of a JAX function each of its outputs depends on.

The stochastic computation graph is read off the program's *data flow*, not its program order:
a cost depends on a random choice exactly when a value computed from the choice reaches it.
:func:`dependencies` traces a function to a jaxpr (no computation runs) and propagates, through
every equation, the set of inputs each variable was computed from. Sub-jaxprs (``jit``,
``custom_jvp``/``custom_vjp`` calls, ``cond``, ``scan``, ``while``) are followed inside, with a
fixed point over loop carries, so structure survives jitted helpers and loops; any other
primitive is treated conservatively (every output depends on every input), which can only
over-approximate the graph: the estimator stays unbiased, at worst with more variance.

Example:
    >>> import jax.numpy as jnp
    >>> deps = dependencies(lambda a, b, c: (a * 2, jnp.sin(b) + c), 1.0, 2.0, 3.0)
    >>> deps
    [frozenset({0}), frozenset({1, 2})]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

__all__ = ["dependencies"]

_LOOP_LIMIT = 1000


def dependencies(fn: Callable, *example_args: Any) -> list[frozenset[int]]:
    """For each flattened output of ``fn``, the indices of the flattened inputs it depends on.

    ``example_args`` may be arrays or ``jax.ShapeDtypeStruct``; nothing is computed.
    """
    flat_args, in_tree = jax.tree.flatten(example_args)

    def flat_fn(*flat):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat)))

    closed = jax.make_jaxpr(flat_fn)(*flat_args)
    out = _propagate(closed.jaxpr, [1 << i for i in range(len(flat_args))])
    return [frozenset(i for i in range(len(flat_args)) if mask >> i & 1) for mask in out]


def _read(env: dict, atom: Any) -> int:
    if isinstance(atom, jex_core.Literal):
        return 0
    return env.get(atom, 0)


def _propagate(jaxpr: jex_core.Jaxpr, in_masks: Sequence[int]) -> list[int]:
    env: dict = dict(zip(jaxpr.invars, in_masks, strict=True))
    for eqn in jaxpr.eqns:
        ins = [_read(env, a) for a in eqn.invars]
        outs = _equation(eqn, ins)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [_read(env, v) for v in jaxpr.outvars]


def _union(masks: Sequence[int]) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def _open(jaxpr: Any) -> jex_core.Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr


def _equation(eqn: Any, ins: list[int]) -> list[int]:
    name = eqn.primitive.name
    params = eqn.params
    n_out = len(eqn.outvars)
    if name == "cond":
        index, operands = ins[0], ins[1:]
        outs = [index] * n_out
        for branch in params["branches"]:
            outs = [a | b for a, b in zip(outs, _propagate(_open(branch), operands), strict=True)]
        return outs
    if name == "scan":
        return _scan(params, ins)
    if name == "while":
        return _while(params, ins)
    sub = _single_subjaxpr(params)
    if sub is not None and len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
        return _propagate(sub, ins)
    return [_union(ins)] * n_out


def _single_subjaxpr(params: dict) -> jex_core.Jaxpr | None:
    subs = [
        _open(v) for k, v in params.items()
        if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr)) and k in (
            "jaxpr", "call_jaxpr", "fun_jaxpr"
        )
    ]
    return subs[0] if len(subs) == 1 else None


def _scan(params: dict, ins: list[int]) -> list[int]:
    body = _open(params["jaxpr"])
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    for _ in range(_LOOP_LIMIT):
        out = _propagate(body, consts + carry + xs)
        new_carry = [a | b for a, b in zip(carry, out[:n_carry], strict=True)]
        if new_carry == carry:
            return carry + out[n_carry:]
        carry = new_carry
    return [_union(ins)] * len(out)


def _while(params: dict, ins: list[int]) -> list[int]:
    cond, body = _open(params["cond_jaxpr"]), _open(params["body_jaxpr"])
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts = ins[:n_cond], ins[n_cond:n_cond + n_body]
    carry = ins[n_cond + n_body:]
    for _ in range(_LOOP_LIMIT):
        stop = _union(_propagate(cond, cond_consts + carry))
        out = _propagate(body, body_consts + carry)
        new_carry = [a | b | stop for a, b in zip(carry, out, strict=True)]
        if new_carry == carry:
            return carry
        carry = new_carry
    return [_union(ins)] * len(carry)
