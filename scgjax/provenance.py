"""Data-flow provenance: which inputs of a JAX function each of its outputs depends on.

The stochastic computation graph is read off the program's *data flow*, not its program order:
a cost depends on a random choice exactly when a value computed from the choice reaches it.
:func:`dependencies` traces a function to a jaxpr (no computation runs) and propagates, through
every equation, the set of inputs each variable was computed from. Sub-jaxprs (``jit``,
``custom_jvp``/``custom_vjp`` calls, ``cond``, ``scan``, ``while``) are followed inside, with a
fixed point over loop carries, so structure survives jitted helpers and loops; any other
primitive is treated conservatively (every output depends on every input), which can only
over-approximate the graph: the estimator stays unbiased, at worst with more variance.

Sources can also be *named inside* the function: :func:`source` marks a value as the random
choice ``name`` (an identity primitive), and :func:`source_dependencies` says which named
sources each output depends on. Objectives trace a program once with its sampled values marked
and read both its sites and its data flow from that one pass.

Example:
    >>> import jax.numpy as jnp
    >>> deps = dependencies(lambda a, b, c: (a * 2, jnp.sin(b) + c), 1.0, 2.0, 3.0)
    >>> deps
    [frozenset({0}), frozenset({1, 2})]
    >>> def program(x):
    ...     z = source(x * 2.0, "z")          # z's value depends on x, but it is a source
    ...     w = source(jnp.exp(z), "w")
    ...     return z + x, w * z, x
    >>> [sorted(d) for d in source_dependencies(program, 1.0)]
    [['z'], ['w', 'z'], []]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

__all__ = ["dependencies", "source", "source_dependencies"]

_LOOP_LIMIT = 1000

_FIRST_BIT = ""  # key of ``sources`` holding the first bit free for named sources
_source_p = jex_core.Primitive("scgjax_source")
_source_p.def_impl(lambda x, *, name: x)
_source_p.def_abstract_eval(lambda aval, *, name: aval)
mlir.register_lowering(_source_p, lambda ctx, x, *, name: [x])
ad.primitive_jvps[_source_p] = lambda primals, tangents, *, name: (
    _source_p.bind(primals[0], name=name), tangents[0])
batching.primitive_batchers[_source_p] = lambda args, dims, *, name: (
    _source_p.bind(args[0], name=name), dims[0])


def source(value: Any, name: str) -> Any:
    """``value``, marked as the random choice ``name``: in :func:`source_dependencies`, what is
    computed from it depends on ``name`` and on nothing ``value`` was computed from (the
    choice's own inputs reach it only through its distribution). The identity otherwise."""
    return _source_p.bind(value, name=name)


def source_dependencies(fn: Callable, *example_args: Any) -> list[frozenset[str]]:
    """For each flattened output of ``fn``, the names of the :func:`source` values it depends on.

    ``example_args`` may be arrays or ``jax.ShapeDtypeStruct``; nothing is computed. ``fn`` runs
    once (it is traced to a jaxpr).
    """
    flat_args, in_tree = jax.tree.flatten(example_args)

    def flat_fn(*flat):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat)))

    closed = jax.make_jaxpr(flat_fn)(*flat_args)
    bits: dict[str, int] = {_FIRST_BIT: 0}
    out = _propagate(closed.jaxpr, [0] * len(flat_args), bits)
    del bits[_FIRST_BIT]
    return [frozenset(n for n, b in bits.items() if mask >> b & 1) for mask in out]


def dependencies(fn: Callable, *example_args: Any) -> list[frozenset[int]]:
    """For each flattened output of ``fn``, the indices of the flattened inputs it depends on.

    ``example_args`` may be arrays or ``jax.ShapeDtypeStruct``; nothing is computed.
    """
    flat_args, in_tree = jax.tree.flatten(example_args)

    def flat_fn(*flat):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat)))

    closed = jax.make_jaxpr(flat_fn)(*flat_args)
    out = _propagate(closed.jaxpr, [1 << i for i in range(len(flat_args))],
                     {_FIRST_BIT: len(flat_args)})
    return [frozenset(i for i in range(len(flat_args)) if mask >> i & 1) for mask in out]


def _read(env: dict, atom: Any) -> int:
    if isinstance(atom, jex_core.Literal):
        return 0
    return env.get(atom, 0)


def _propagate(jaxpr: jex_core.Jaxpr, in_masks: Sequence[int], sources: dict[str, int]
               ) -> list[int]:
    """Masks of the outputs; ``sources`` maps each named source met to its bit (bits of
    named sources are allocated above those of the inputs, which they never share)."""
    env: dict = dict(zip(jaxpr.invars, in_masks, strict=True))
    for eqn in jaxpr.eqns:
        ins = [_read(env, a) for a in eqn.invars]
        outs = _equation(eqn, ins, sources)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [_read(env, v) for v in jaxpr.outvars]


def _union(masks: Sequence[int]) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def _open(jaxpr: Any) -> jex_core.Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr


def _equation(eqn: Any, ins: list[int], sources: dict[str, int]) -> list[int]:
    name = eqn.primitive.name
    params = eqn.params
    n_out = len(eqn.outvars)
    if eqn.primitive is _source_p:
        bit = sources.setdefault(params["name"], sources[_FIRST_BIT] + len(sources) - 1)
        return [1 << bit]
    if name == "cond":
        index, operands = ins[0], ins[1:]
        outs = [index] * n_out
        for branch in params["branches"]:
            outs = [a | b for a, b in zip(outs, _propagate(_open(branch), operands, sources),
                                          strict=True)]
        return outs
    if name == "scan":
        return _scan(params, ins, sources)
    if name == "while":
        return _while(params, ins, sources)
    sub = _single_subjaxpr(params)
    if sub is not None and len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
        return _propagate(sub, ins, sources)
    return [_union(ins)] * n_out


def _single_subjaxpr(params: dict) -> jex_core.Jaxpr | None:
    subs = [
        _open(v) for k, v in params.items()
        if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr)) and k in (
            "jaxpr", "call_jaxpr", "fun_jaxpr"
        )
    ]
    return subs[0] if len(subs) == 1 else None


def _scan(params: dict, ins: list[int], sources: dict[str, int]) -> list[int]:
    body = _open(params["jaxpr"])
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    for _ in range(_LOOP_LIMIT):
        out = _propagate(body, consts + carry + xs, sources)
        new_carry = [a | b for a, b in zip(carry, out[:n_carry], strict=True)]
        if new_carry == carry:
            return carry + out[n_carry:]
        carry = new_carry
    return [_union(ins)] * len(out)


def _while(params: dict, ins: list[int], sources: dict[str, int]) -> list[int]:
    cond, body = _open(params["cond_jaxpr"]), _open(params["body_jaxpr"])
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts = ins[:n_cond], ins[n_cond:n_cond + n_body]
    carry = ins[n_cond + n_body:]
    for _ in range(_LOOP_LIMIT):
        stop = _union(_propagate(cond, cond_consts + carry, sources))
        out = _propagate(body, body_consts + carry, sources)
        new_carry = [a | b | stop for a, b in zip(carry, out, strict=True)]
        if new_carry == carry:
            return carry
        carry = new_carry
    return [_union(ins)] * len(carry)
