"""Data-flow provenance: which inputs of a JAX function each of its outputs depends on.

The stochastic computation graph is read off the program's *data flow*, not its program order:
a cost depends on a random choice exactly when a value computed from the choice reaches it.
:func:`dependencies` traces a function to a jaxpr (no computation runs) and propagates, through
every equation, the set of inputs each variable was computed from. Sub-jaxprs (``jit``,
``custom_jvp``/``custom_vjp``/``custom_vmap`` calls, ``cond``, ``scan``, ``while``) are followed
inside, with a fixed point over loop carries, so structure survives jitted helpers and loops;
any other primitive is treated conservatively (every output depends on every input), which can
only over-approximate the graph: the estimator stays unbiased, at worst with more variance.

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

__all__ = ["dependencies", "source", "source_dependencies", "source_lags"]

_LOOP_LIMIT = 1000

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
    return [frozenset(lags) for lags in source_lags(fn, *example_args)]


def source_lags(fn: Callable, *example_args: Any, distance: bool = False
                ) -> list[dict[str, frozenset[int]]]:
    """For each flattened output of ``fn``, ``{name: lags}`` for the :func:`source` values it
    depends on, with the time structure of ``lax.scan`` loops.

    A source marked inside a scan's body is a *per-step* source: the value of step ``s``. An
    output that the loop stacks (its ``ys``), or an element-wise function of it, has one element
    per step ``t``; ``lags`` says at which signs of ``t - s`` the element of step ``t`` depends on
    step ``s``'s source: ``0`` through the body within a step, ``+1`` (a forward loop) or ``-1``
    (``reverse=True``) through the carry, from earlier iterations. The carry is followed to a
    fixed point, so ``{0, 1}`` is the rewards-to-go structure, ``{0}`` a step that only sees its
    own choice and ``{1}`` one that sees only earlier choices. ``{-1, 0, 1}`` means no time
    structure: a source outside any loop, a loop's final carry, a ``while`` loop. With
    ``distance``, how far: ``1`` exactly the previous step (a carry that keeps nothing older),
    ``2`` two steps or more (signed likewise).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> def episode(xs):
        ...     def step(total, x):
        ...         a = source(x * 2.0, "a")          # the step's choice
        ...         return total + a, (a * x, total)  # (this step's cost, the earlier ones')
        ...     return jax.lax.scan(step, 0.0, xs)
        >>> final, now, before = source_lags(episode, jnp.ones(3))
        >>> sorted(now["a"]), sorted(before["a"]), sorted(final["a"])
        ([0], [1], [-1, 0, 1])
        >>> sorted(source_lags(episode, jnp.ones(3), distance=True)[2]["a"])  # a running total
        [1, 2]
    """
    flat_args, in_tree = jax.tree.flatten(example_args)

    def flat_fn(*flat):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat)))

    closed = jax.make_jaxpr(flat_fn)(*flat_args)
    sources = _Sources(first_bit=0)
    out = _propagate(closed.jaxpr, [0] * len(flat_args), sources)
    return [sources.lags(mask, distance) for mask in out]


def dependencies(fn: Callable, *example_args: Any) -> list[frozenset[int]]:
    """For each flattened output of ``fn``, the indices of the flattened inputs it depends on.

    ``example_args`` may be arrays or ``jax.ShapeDtypeStruct``; nothing is computed.
    """
    flat_args, in_tree = jax.tree.flatten(example_args)

    def flat_fn(*flat):
        return jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, flat)))

    closed = jax.make_jaxpr(flat_fn)(*flat_args)
    out = _propagate(closed.jaxpr, [1 << i for i in range(len(flat_args))],
                     _Sources(first_bit=len(flat_args)))
    return [frozenset(i for i in range(len(flat_args)) if mask >> i & 1) for mask in out]


# Each named source owns six bits: its value with no time structure, and its value at the
# same step, an earlier iteration or a later one of the loop being propagated, and at exactly
# the previous or the next iteration (a carry that forgets everything older).
_ANY, _SAME, _BEFORE, _AFTER, _PREV, _NEXT = range(6)
_KINDS = 6
_LAGS = {_ANY: frozenset({-1, 0, 1}), _SAME: frozenset({0}), _BEFORE: frozenset({1}),
         _AFTER: frozenset({-1}), _PREV: frozenset({1}), _NEXT: frozenset({-1})}
#: the same with distances: 1 exactly one step, 2 two steps or more
_DISTANCES = {_ANY: frozenset({-2, -1, 0, 1, 2}), _SAME: frozenset({0}),
              _BEFORE: frozenset({1, 2}), _AFTER: frozenset({-1, -2}), _PREV: frozenset({1}),
              _NEXT: frozenset({-1})}


class _Sources:
    """The bits of the named sources met so far (allocated above those of the inputs, which
    they never share) and whether propagation is inside a loop body."""

    def __init__(self, first_bit: int):
        self.first_bit = first_bit
        self.base: dict[str, int] = {}
        self.loop_depth = 0

    def bit(self, name: str) -> int:
        """The mask of source ``name`` as marked here: per step inside a loop body."""
        base = self.base.setdefault(name, self.first_bit + _KINDS * len(self.base))
        return 1 << (base + (_SAME if self.loop_depth else _ANY))

    def lags(self, mask: int, distance: bool = False) -> dict[str, frozenset[int]]:
        table = _DISTANCES if distance else _LAGS
        out = {}
        for name, base in self.base.items():
            kinds = [k for k in range(_KINDS) if mask >> (base + k) & 1]
            if kinds:
                out[name] = frozenset().union(*(table[k] for k in kinds))
        return out

    def carried(self, mask: int, direction: int) -> int:
        """``mask`` seen one iteration later, through a loop's carry: the step's sources become
        the previous step's (``direction=1``, a forward scan) or the next step's (``-1``), those
        become earlier (later) ones; a source already on the other side, or ``direction=0`` (a
        while loop, a final carry), loses its time structure."""
        for base in self.base.values():
            bits = {k: mask >> (base + k) & 1 for k in range(1, _KINDS)}
            if not any(bits.values()):
                continue
            mask &= ~(((1 << _KINDS) - 2) << base)
            if direction == 1:
                moved = {_PREV: bits[_SAME], _BEFORE: bits[_BEFORE] | bits[_PREV],
                         _ANY: bits[_AFTER] | bits[_NEXT]}
            elif direction == -1:
                moved = {_NEXT: bits[_SAME], _AFTER: bits[_AFTER] | bits[_NEXT],
                         _ANY: bits[_BEFORE] | bits[_PREV]}
            else:
                moved = {_ANY: 1}
            for kind, on in moved.items():
                mask |= on << (base + kind)
        return mask


def _read(env: dict, atom: Any) -> int:
    if isinstance(atom, jex_core.Literal):
        return 0
    return env.get(atom, 0)


def _propagate(jaxpr: jex_core.Jaxpr, in_masks: Sequence[int], sources: _Sources
               ) -> list[int]:
    """Masks of the outputs (bits of the inputs and of the named sources met)."""
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


def _equation(eqn: Any, ins: list[int], sources: _Sources) -> list[int]:
    name = eqn.primitive.name
    params = eqn.params
    n_out = len(eqn.outvars)
    if eqn.primitive is _source_p:
        return [sources.bit(params["name"])]
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
            "jaxpr", "call_jaxpr", "fun_jaxpr", "call"  # (custom_vmap's: "call")
        )
    ]
    return subs[0] if len(subs) == 1 else None


def _loop_body(body: jex_core.Jaxpr, ins: list[int], sources: _Sources) -> list[int]:
    sources.loop_depth += 1
    try:
        return _propagate(body, ins, sources)
    finally:
        sources.loop_depth -= 1


def _scan(params: dict, ins: list[int], sources: _Sources) -> list[int]:
    """A scan's outputs: the carry to a fixed point (a step's sources become earlier or later
    ones as they go round); the stacked ``ys`` keep their per-step structure, the final carry
    has none."""
    body = _open(params["jaxpr"])
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    direction = -1 if params["reverse"] else 1
    for _ in range(_LOOP_LIMIT):
        out = _loop_body(body, consts + carry + xs, sources)
        new_carry = [a | sources.carried(b, direction)
                     for a, b in zip(carry, out[:n_carry], strict=True)]
        if new_carry == carry:
            final = [sources.carried(a | b, 0) for a, b in zip(carry, out[:n_carry],
                                                                strict=True)]
            return final + out[n_carry:]
        carry = new_carry
    return [sources.carried(_union(ins), 0)] * len(out)


def _while(params: dict, ins: list[int], sources: _Sources) -> list[int]:
    cond, body = _open(params["cond_jaxpr"]), _open(params["body_jaxpr"])
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts = ins[:n_cond], ins[n_cond:n_cond + n_body]
    carry = ins[n_cond + n_body:]
    for _ in range(_LOOP_LIMIT):
        stop = _union(_loop_body(cond, cond_consts + carry, sources))
        out = _loop_body(body, body_consts + carry, sources)
        new_carry = [a | sources.carried(b | stop, 0) for a, b in zip(carry, out, strict=True)]
        if new_carry == carry:
            return carry
        carry = new_carry
    return [sources.carried(_union(ins), 0)] * len(carry)
