"""Effect handlers: small, composable, stateless program transformations.

Each handler wraps a program (``handler(fn, ...)``) or is used as a context manager. They keep
no state between calls: per-call state (the running PRNG key, the recorded trace) is created
in ``__enter__``, so a handled function can be jitted, vmapped or differentiated any number of
times without leaking tracers (the failure mode of numpyro #1753 and #1981).

Example:
    >>> import jax, scgjax as sg
    >>> from scgjax import dist
    >>> def model():
    ...     return sg.sample("x", dist.Normal(0.0, 1.0))
    >>> traced = sg.handlers.trace(sg.handlers.seed(model, jax.random.key(1)))
    >>> tr = traced.get_trace()
    >>> sorted(tr), tr["x"]["type"]
    (['x'], 'sample')
"""

from __future__ import annotations

import copy
import difflib
import os
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import biject_to, constraints

from scgjax import stepped_prng
from scgjax.errors import ScgjaxError, SiteError
from scgjax.primitives import Message, Messenger, check_estimator, describe_bad

__all__ = [
    "Messenger",
    "assign_estimators",
    "block",
    "condition",
    "mask",
    "replay",
    "scale",
    "seed",
    "substitute",
    "substitute_unconstrained",
    "trace",
    "trace_program",
    "trace_guided",
    "as_prng_key",
]

Trace = dict[str, Message]


def as_prng_key(rng_key: Any, what: str = "rng_key") -> jax.Array:
    """Return ``rng_key`` as a JAX PRNG key, accepting an int seed; raise ``TypeError`` else.

    Example:
        >>> as_prng_key(0).dtype
        key<fry>
    """
    if isinstance(rng_key, (int, np.integer)) and not isinstance(rng_key, (bool, np.bool_)):
        return jax.random.key(int(rng_key))
    if isinstance(rng_key, jax.Array):
        if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key) and rng_key.shape == ():
            return rng_key
        if rng_key.dtype == jnp.uint32 and rng_key.shape == (2,):
            return jax.random.wrap_key_data(rng_key)
    shape = getattr(rng_key, "shape", None)
    dtype = getattr(rng_key, "dtype", None)
    raise TypeError(
        f"{what} must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)) or an "
        f"int seed, got {type(rng_key).__name__}"
        + (f" of shape {shape} and dtype {dtype}" if shape is not None else "")
    )


def same_constraint(a: Any, b: Any) -> bool:
    """Whether two numpyro constraints are the same (the same class and parameters).

    Example:
        >>> from numpyro.distributions import constraints
        >>> same_constraint(constraints.interval(0.0, 1.0), constraints.interval(0.0, 1.0))
        True
    """
    return a is b or (type(a) is type(b) and repr(a) == repr(b))


class trace(Messenger):
    """Record every site of a program, in order, as ``{name: message}``.

    Raises :class:`~scgjax.errors.SiteError` if two sample sites share a name, or a param is
    declared twice with different shapes.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> def model():
        ...     sg.sample("x", dist.Normal(0.0, 1.0), obs=0.5)
        >>> tr = sg.handlers.trace(model).get_trace()
        >>> tr["x"]["is_observed"], float(tr["x"]["value"])
        (True, 0.5)
    """

    keeps_state = True
    scan_role = "stacked"  # records each site of an sg.scan loop once, with its time axis

    def __enter__(self) -> trace:
        super().__enter__()
        self.trace: Trace = {}
        return self

    def postprocess_message(self, msg: Message) -> None:
        name = msg["name"]
        if msg["type"] == "plate":
            self.trace.setdefault(name, msg.copy())
            return
        previous = self.trace.get(name)
        if msg["type"] == "scan" and previous is not None and previous["type"] == "scan":
            raise SiteError(name, "names two sg.scan loops of one program; each loop's time "
                            "axis needs a name of its own: sg.scan(..., name=...)")
        if previous is not None:
            if msg["type"] == "param" and previous["type"] == "param":
                old = jax.tree.map(jnp.shape, previous["value"])
                new = jax.tree.map(jnp.shape, msg["value"])
                if old != new:
                    raise SiteError(
                        name, f"is a param re-declared with shape {new}; it was {old} before"
                    )
                before, now = (m["kwargs"]["constraint"] for m in (previous, msg))
                if not same_constraint(before, now):
                    raise SiteError(name, f"is a param re-declared with constraint {now}; it "
                                    f"was {before} before")
                return
            raise SiteError(
                name,
                f"appears twice in one program (as {previous['type']} and {msg['type']}); "
                "site names must be unique",
            )
        self.trace[name] = msg.copy()

    def get_trace(self, *args, **kwargs) -> Trace:
        """Run the wrapped program and return its trace."""
        self(*args, **kwargs)
        return self.trace


class seed(Messenger):
    """Give each random site its own key, split from ``rng_seed`` (a key or an int).

    The running key is reset on every entry, so the same seeded program returns the same
    values every time it is called, under ``jit`` or not. A sub-sampling plate draws its indices
    from a key of its own, derived from the seed and the plate's name: every entry of a plate of
    that name in one run (the same ``sg.plate`` object used twice, say) gets the same subsample.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> f = sg.handlers.seed(lambda: sg.sample("x", dist.Normal(0.0, 1.0)), 3)
        >>> bool(f() == f())
        True
    """

    def __init__(self, fn: Callable | None = None, rng_seed: Any = None):
        super().__init__(fn)
        if rng_seed is None:
            raise TypeError("seed needs rng_seed: a PRNG key or an int")
        self.rng_seed = rng_seed

    keeps_state = True
    scan_role = "step"  # inside an sg.scan body: a fresh key per step

    def __enter__(self) -> seed:
        self._key = self._seed_key = as_prng_key(self.rng_seed, "rng_seed")
        return super().__enter__()

    def for_step(self, step: Any) -> seed | None:
        if step.rng_key is None:
            return None
        new = seed(rng_seed=step.rng_key)
        new._step = step  # its sites take the keys split for them before the loop
        return new

    def process_message(self, msg: Message) -> None:
        wants_key = (
            (msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None)
            or msg["type"] == "scan"
            or (msg["type"] == "plate" and msg["value"] is None
                and msg["args"][1] not in (None, msg["args"][0]))
            or (msg["type"] == "param" and msg["value"] is None and callable(msg["args"][0]))
        )
        if not wants_key or msg["kwargs"].get("rng_key") is not None:
            return
        if msg["type"] == "plate":
            # One subsample per plate name and run: every entry of the plate (the same object
            # entered twice, or two statements of one name) draws the same indices, which is
            # also what `replay` gives the model.
            plates_key = jax.random.fold_in(self._seed_key, 0x9E3779B9 & 0x7FFFFFFF)
            name_hash = zlib.crc32(msg["name"].encode()) & 0x7FFFFFFF
            msg["kwargs"]["rng_key"] = jax.random.fold_in(plates_key, name_hash)
        else:
            step = getattr(self, "_step", None)
            key = None if step is None else step.next_key()
            if key is None:
                self._key, key = stepped_prng.split(self._key)
            msg["kwargs"]["rng_key"] = key


def _kind_of(msg: Message) -> str:
    """What a site is, in words (for messages about a handler that cannot act on it)."""
    if msg["type"] != "sample":
        return f"a {msg['type']} site"
    if msg.get("is_factor"):
        return "a factor"
    return "an observed site" if msg.get("is_observed") else "a latent site"


def _check_names_dict(handler: str, what: str, data: Any) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"{handler} needs `{what}` as a dict from site names to values, got "
                        f"{type(data).__name__}")
    for name in data:
        if not isinstance(name, str):
            raise TypeError(f"{handler}: the keys of `{what}` must be site names (str), got "
                            f"{name!r}")


def _warn_unused(handler: str, data: Mapping, seen: dict[str, str | None]) -> None:
    """Warn about each name of ``data`` that the program never used, or used for a site that
    ``handler`` does not change (``seen[name]`` says what it was)."""
    for name in data:
        if name in seen and seen[name] is None:
            continue
        if name in seen:
            problem = f"is {seen[name]}, which {handler} does not change"
        else:
            close = closest_name(name, seen)
            problem = "is not a site of the program" + (
                f" (did you mean '{close}'?)" if close else "")
        warn_user(f"site '{name}' {problem}: its value given to sg.handlers.{handler} is "
                  "ignored")


class substitute(Messenger):
    """Fix the values of latent sample sites and params by name (constrained values).

    ``data`` maps names to values; ``substitute_fn(msg)`` may compute a value or return
    ``None`` to leave the site alone. A name of ``data`` that the program never uses (or
    uses for an observed site, a factor or a deterministic site, which substitute does not
    change) is reported with a warning once the program has run.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> f = sg.handlers.substitute(lambda: sg.sample("x", dist.Normal(0.0, 1.0)), {"x": 2.0})
        >>> f()
        2.0
    """

    scan_role = "step"  # inside sg.scan, a site's value is given for every step: (T, ...)

    def __init__(self, fn: Callable | None = None, data: dict | None = None,
                 substitute_fn: Callable[[Message], Any] | None = None):
        super().__init__(fn)
        if (data is None) == (substitute_fn is None):
            raise TypeError("substitute needs exactly one of `data` or `substitute_fn`")
        if data is not None:
            _check_names_dict("substitute", "data", data)
        self.data = data
        self.substitute_fn = substitute_fn
        self._step: Any = None

    def for_step(self, step: Any) -> substitute:
        return at_step(self, step)

    def __enter__(self) -> substitute:
        self._seen: dict[str, str | None] = {}
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and self.data is not None:
            _warn_unused("substitute", self.data, self._seen)

    def process_message(self, msg: Message) -> None:
        usable = msg["type"] in ("sample", "param", "plate") and not msg.get("is_observed")
        if self.data is not None:
            self._seen[msg["name"]] = None if usable else _kind_of(msg)
        if not usable:
            return
        if self.data is not None:
            value = self.data.get(msg["name"])
        else:
            value = self.substitute_fn(msg)
        if value is not None and self._step is not None and msg["type"] == "sample":
            value = self._step.slice(msg["name"], value)
        if value is not None:
            msg["value"] = value
            if msg["type"] == "sample":
                msg["substituted"] = True  # checked against the support when concrete


def at_step(handler: Messenger, step: Any) -> Messenger:
    """A shallow copy of ``handler`` (sharing its bookkeeping) that reads the values it holds
    for the sites of an ``sg.scan`` loop at the current step (``step.slice``)."""
    new = copy.copy(handler)
    new._step = step
    return new


_INTERNAL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (jax, np))
_SCGJAX_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str) -> None:
    """``warnings.warn(message)`` attributed to the first caller outside scgjax and JAX (the
    user's line), however deep inside a traced objective it is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_SCGJAX_DIR)
                                 or frame.f_code.co_filename.startswith(_INTERNAL_DIRS)
                                 or frame.f_code.co_filename.endswith("contextlib.py")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level + 1)


def closest_name(name: Any, candidates: Iterable[Any]) -> str | None:
    """The candidate closest to ``name`` (``difflib``, ignoring case), or ``None``.

    Example:
        >>> closest_name("Z", ["z", "x"]), closest_name("loc", ["scale"])
        ('z', None)
    """
    by_lower: dict[str, str] = {}
    for c in candidates:
        if isinstance(c, str):
            by_lower.setdefault(c.lower(), c)
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
    return by_lower[close[0]] if close else None


def missing_param(name: str, params: Mapping) -> SiteError:
    """The error for a param that a params dict lacks, naming its closest key.

    Example:
        >>> print(missing_param("loc", {"lco": 0.0, "scale": 1.0}))
        site 'loc' is a param of the program, but params has no key 'loc' (did you mean 'lco'?); ...
    """
    close = closest_name(name, params)
    hint = f" (did you mean '{close}'?)" if close else ""
    return SiteError(name, f"is a param of the program, but params has no key '{name}'{hint}; "
                     "make params with sg.init_params(rng_key, model, guide, *args)")


class substitute_unconstrained(Messenger):
    """Give params their values from a dict of *unconstrained* values (what objectives train).

    Each stored value ``u`` becomes ``biject_to(constraint)(u)`` at the param site. A param whose
    initial value is an array of another shape than the stored one is an error, and so is a
    param that ``params`` lacks (a misspelt key would otherwise silently leave the param at its
    initial value): the error names the closest key of ``params``. ``strict=False`` lets such
    params keep their initial value instead.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax.dist import constraints
        >>> prog = lambda: sg.param("s", 1.0, constraints.positive)
        >>> float(sg.handlers.substitute_unconstrained(prog, {"s": jnp.log(3.0)})())
        3.0
    """

    scan_role = "step"

    def __init__(self, fn: Callable | None = None, params: dict | None = None, *,
                 strict: bool = True):
        super().__init__(fn)
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict from param names to unconstrained values "
                            f"(as sg.init_params returns), got {type(params).__name__}")
        self.params = {} if params is None else params
        self.strict = strict and params is not None

    def process_message(self, msg: Message) -> None:
        if msg["type"] != "param":
            return
        if msg["name"] not in self.params:
            if self.strict:
                raise missing_param(msg["name"], self.params)
            return
        stored = self.params[msg["name"]]
        init = msg["args"][0]
        constraint = msg["kwargs"]["constraint"]
        if init is not None and not callable(init):
            want = jax.tree.map(jnp.shape, init)
            if constraint is not constraints.real:
                want = biject_to(constraint).inverse_shape(jnp.shape(init))
            have = jax.tree.map(jnp.shape, stored)
            if want != have:
                raise SiteError(
                    msg["name"],
                    f"is a param declared with shape {want}, but the params hold shape {have}",
                )
        _check_finite_param(msg["name"], stored)
        if constraint is constraints.real:
            msg["value"] = stored
        else:
            msg["value"] = biject_to(constraint)(stored)


def _check_finite_param(name: str, stored: Any) -> None:
    """A concrete stored param value must be finite (a NaN would reach the distributions
    as a raw numpyro error, or as a NaN loss, naming nothing)."""
    for leaf in jax.tree.leaves(stored):
        if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(
                jnp.result_type(leaf), jnp.inexact):
            continue
        bad = ~np.isfinite(np.asarray(leaf))
        if bad.any():
            raise SiteError(name, f"is a param whose value in params is not finite "
                            f"({describe_bad(bad)}); training diverged? (sg.SVI.run stops at "
                            "the first non-finite step and keeps the last good state)")


class condition(Messenger):
    """Observe sample sites: ``data[name]`` becomes an observed value of the site.

    A name of ``data`` that is no sample site of the program (misspelt, or a param, a factor, a
    deterministic site) is reported with a warning once the program has run.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> prog = sg.handlers.condition(lambda: sg.sample("x", dist.Normal(0.0, 1.0)), {"x": 1.0})
        >>> tr = sg.handlers.trace(prog).get_trace()
        >>> tr["x"]["is_observed"]
        True
    """

    scan_role = "step"  # inside sg.scan, a site's data is given for every step: (T, ...)

    def __init__(self, fn: Callable | None = None, data: dict | None = None):
        super().__init__(fn)
        self.data = {} if data is None else data
        _check_names_dict("condition", "data", self.data)
        self._step: Any = None

    def for_step(self, step: Any) -> condition:
        return at_step(self, step)

    def __enter__(self) -> condition:
        self._seen: dict[str, str | None] = {}
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None:
            _warn_unused("condition", self.data, self._seen)

    def process_message(self, msg: Message) -> None:
        usable = msg["type"] == "sample" and not msg.get("is_factor")
        self._seen[msg["name"]] = None if usable else _kind_of(msg)
        if usable and msg["name"] in self.data:
            value = self.data[msg["name"]]
            msg["value"] = value if self._step is None else self._step.slice(msg["name"], value)
            msg["is_observed"] = True


class replay(Messenger):
    """Reuse the latent values (and plate subsamples) recorded in ``trace``.

    This is how an objective runs the model at the guide's samples.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> guide = lambda: sg.sample("z", dist.Normal(5.0, 1.0))
        >>> tr = sg.handlers.trace(sg.handlers.seed(guide, 0)).get_trace()
        >>> model = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
        >>> bool(sg.handlers.replay(model, tr)() == tr["z"]["value"])
        True
    """

    scan_role = "step"  # inside sg.scan: the recorded loop's values at the current step

    def __init__(self, fn: Callable | None = None, trace: Trace | None = None):
        super().__init__(fn)
        self._step: Any = None
        if trace is None:
            raise TypeError("replay needs a trace")
        if not isinstance(trace, dict) or not all(
                isinstance(m, dict) and "type" in m for m in trace.values()):
            raise TypeError(
                "replay needs a trace, as returned by sg.handlers.trace(fn).get_trace(...) (a "
                "dict of site messages), not a dict of values: to fix values use "
                "sg.handlers.substitute(fn, data={...})")
        self.trace = trace

    def process_message(self, msg: Message) -> None:
        if msg["type"] not in ("sample", "plate") or msg["name"] not in self.trace:
            return
        recorded = self.trace[msg["name"]]
        if msg["type"] == "plate":
            if recorded["type"] == "plate":
                msg["value"] = recorded["value"]
            return
        if msg["is_observed"] or recorded["type"] != "sample" or recorded["is_observed"]:
            return
        value = recorded["value"]
        if self._step is not None or _time_frame(recorded) is not None:
            value = _replayed_step(msg, recorded, self._step)
        else:
            _check_same_plate_dims(msg, recorded)
        msg["value"] = value
        self._matched["sites"] += 1  # shared with its copies in sg.scan bodies

    def for_step(self, step: Any) -> replay:
        return at_step(self, step)

    def __enter__(self) -> replay:
        self._matched = {"sites": 0}
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        latent = sorted(n for n, m in self.trace.items()
                        if m["type"] == "sample" and not m.get("is_observed"))
        if exc_type is None and latent and not self._matched["sites"]:
            warn_user(f"site '{latent[0]}' and the other latent sites of the trace given to "
                      "sg.handlers.replay match no latent site of the program: nothing was "
                      "replayed (a trace of another program?)")


def _time_frame(msg: Message) -> Any:
    """The ``sg.scan`` time axis of a site, or ``None``."""
    return next((f for f in msg.get("cond_indep_stack", ()) if f.time), None)


def _replayed_step(msg: Message, recorded: Message, step: Any) -> Any:
    """The recorded value of a site of an ``sg.scan`` loop at the current step: both the
    recording and the replaying site must be in a loop of the same name."""
    frame = _time_frame(recorded)
    if step is None or frame is None or frame.name != step.name:
        here = "outside any sg.scan" if step is None else f"inside sg.scan '{step.name}'"
        there = "outside any sg.scan" if frame is None else f"inside sg.scan '{frame.name}'"
        raise SiteError(msg["name"], f"is {here} here but {there} in the replayed trace (the "
                        "guide): write the site in a loop of the same name in both programs")
    return step.slice(msg["name"], recorded["value"])


def _check_same_plate_dims(msg: Message, recorded: Message) -> None:
    """A replayed value is laid out by the recording program's plates: each plate the two
    sites share must sit at the same batch dim, else the value would be silently transposed
    (e.g. plates nested in the opposite order in the guide and the model)."""
    here = {f.name: f.dim for f in msg["cond_indep_stack"]}
    for f in recorded["cond_indep_stack"]:
        if f.name in here and here[f.name] != f.dim:
            raise SiteError(
                msg["name"], f"sits in plate '{f.name}' at dim {here[f.name]} here (the model) but "
                f"at dim {f.dim} in the replayed trace (the guide): nest the plates in the same "
                "order in both programs, or give them explicit dims",
            )


class block(Messenger):
    """Hide sites from the handlers outside this one.

    ``hide`` (names), ``expose`` (names: hide all others) or ``hide_fn(msg) -> bool``; with
    none of them, every site is hidden.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> def prog():
        ...     sg.sample("a", dist.Normal(0.0, 1.0), obs=0.0)
        ...     sg.sample("b", dist.Normal(0.0, 1.0), obs=0.0)
        >>> sorted(sg.handlers.trace(sg.handlers.block(prog, hide=["a"])).get_trace())
        ['b']
    """

    scan_role = "step"  # a hidden step's site never leaves the loop

    def __init__(self, fn: Callable | None = None,
                 hide_fn: Callable[[Message], bool] | None = None,
                 hide: Iterable[str] | None = None, expose: Iterable[str] | None = None):
        if fn is not None and not callable(fn):
            raise TypeError(f"block's first argument is the program to wrap, got "
                            f"{type(fn).__name__}; write block(fn, hide=[...])")
        super().__init__(fn)
        if sum(x is not None for x in (hide_fn, hide, expose)) > 1:
            raise TypeError("block takes at most one of hide_fn, hide, expose")
        for what, names in (("hide", hide), ("expose", expose)):
            if isinstance(names, str):
                raise TypeError(f"block's {what} is a list of site names, got the string "
                                f"{names!r}; write {what}=[{names!r}]")
        if hide_fn is not None and not callable(hide_fn):
            raise TypeError(f"block's hide_fn must be a function of the message, got "
                            f"{type(hide_fn).__name__}; for names use hide=[...]")
        self._names: set[str] | None = None
        if hide is not None:
            names = self._names = set(hide)
            hide_fn = lambda msg: msg["name"] in names
        elif expose is not None:
            names = self._names = set(expose)
            hide_fn = lambda msg: msg["name"] not in names
        elif hide_fn is None:
            hide_fn = lambda msg: True
        self.hide_fn = hide_fn

    def __enter__(self) -> block:
        self._seen: set[str] = set()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        if exc_type is None and self._names:
            for name in sorted(self._names - self._seen):
                hint = closest_name(name, self._seen)
                warn_user(f"site '{name}' is not a site of the program"
                          + (f" (did you mean '{hint}'?)" if hint else "")
                          + ": sg.handlers.block ignores it")

    def process_message(self, msg: Message) -> None:
        self._seen.add(msg["name"])
        if self.hide_fn(msg):
            msg["stop"] = True


class scale(Messenger):
    """Multiply the log-densities (costs) of the sites inside by a positive ``scale``.

    Score-function terms use the unscaled log-density of a site; only its role as a cost is
    scaled (e.g. KL annealing, or weighting a mini-batch).

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> prog = sg.handlers.scale(lambda: sg.sample("x", dist.Normal(0., 1.), obs=0.), 2.0)
        >>> sg.handlers.trace(prog).get_trace()["x"]["scale"]
        2.0
    """

    scan_role = "stacked"  # a scale may have the loop's time axis: (T, ...)

    def __init__(self, fn: Callable | None = None, scale: Any = 1.0):
        super().__init__(fn)
        # numpy, not jnp: under jit a jnp comparison of a Python float is staged into a tracer
        if not isinstance(scale, jax.core.Tracer) and not bool(np.all(np.asarray(scale) > 0)):
            raise ScgjaxError(f"scale must be positive (and not NaN), got {scale}")
        self.scale = scale

    def process_message(self, msg: Message) -> None:
        if msg["type"] in ("sample",):
            msg["scale"] = self.scale if msg["scale"] is None else msg["scale"] * self.scale

    def postprocess_message(self, msg: Message) -> None:
        if msg["type"] != "sample":
            return
        batch = tuple(msg["fn"].batch_shape)  # final: every plate has expanded the site
        try:
            fits = np.broadcast_shapes(np.shape(self.scale), batch) == batch
        except ValueError:
            fits = False
        if not fits:
            raise SiteError(
                msg["name"], f"has batch shape {batch} (plates included), which a scale of "
                f"shape {np.shape(self.scale)} does not broadcast to",
            )


class mask(Messenger):
    """Drop elements of sites where ``mask`` is False: their log-density becomes 0.

    A masked latent element neither costs nor earns credit; the site is still sampled.
    ``mask`` is a bool or a boolean array that broadcasts to the batch shape of every sample
    site inside (plates included); anything else is an error naming the site.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def prog():
        ...     with sg.plate("n", 2):
        ...         sg.sample("x", dist.Normal(0., 1.), obs=jnp.zeros(2))
        >>> m = jnp.array([True, False])
        >>> tr = sg.handlers.trace(sg.handlers.mask(prog, m)).get_trace()
        >>> tr["x"]["mask"].tolist()
        [True, False]
    """

    scan_role = "stacked"  # a mask may have the loop's time axis: (T, ...)

    def __init__(self, fn: Callable | None = None, mask: Any = True):
        super().__init__(fn)
        dtype = getattr(mask, "dtype", None)
        if not (isinstance(mask, (bool, np.bool_))
                or (dtype is not None and np.dtype(dtype) == np.bool_)):
            raise TypeError(
                f"mask must be a bool or a boolean array (True keeps an element), got "
                f"{type(mask).__name__}" + (f" of dtype {dtype}" if dtype is not None else "")
                + "; write e.g. m > 0 or m.astype(bool)")
        self.mask = mask

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "sample":
            msg["mask"] = self.mask if msg["mask"] is None else msg["mask"] & self.mask

    def postprocess_message(self, msg: Message) -> None:
        # here the site's distribution is final (its plates have expanded it)
        if msg["type"] != "sample":
            return
        batch = tuple(msg["fn"].batch_shape)
        shape = tuple(jnp.shape(self.mask))
        try:
            fits = np.broadcast_shapes(shape, batch) == batch
        except ValueError:
            fits = False
        if not fits:
            raise SiteError(msg["name"], f"has batch shape {batch} (plates included), which a "
                            f"mask of shape {shape} does not broadcast to")


class same_plate_sizes(Messenger):
    """Check that every use of a plate name, in one program or in the guide and the model,
    has the same size (and subsample size), before the site values are shaped by it: the model
    replays the guide's plate indices, so a mismatch would otherwise surface as a shape error
    at some other site, with a size the user never wrote. ``sizes`` is a dict shared by the
    programs of one run (``{name: (size, subsample_size, role)}``, made fresh for each run);
    without it, each call of the handled program starts afresh.

    Example:
        >>> import scgjax as sg
        >>> def prog():
        ...     with sg.plate("data", 5):
        ...         pass
        ...     with sg.plate("data", 3):
        ...         pass
        >>> same_plate_sizes(prog)()
        Traceback (most recent call last):
        ...
        scgjax.errors.SiteError: site 'data' is a plate used with size 5 and then 3 ...
    """

    scan_role = "step"

    def __init__(self, fn: Callable | None = None, sizes: dict | None = None,
                 role: str = "program"):
        super().__init__(fn)
        self.shared_sizes = sizes
        self.role = role

    def __enter__(self) -> same_plate_sizes:
        self.sizes = {} if self.shared_sizes is None else self.shared_sizes
        return super().__enter__()

    def process_message(self, msg: Message) -> None:
        if msg["type"] != "plate":
            return
        size, subsample = msg["args"]
        subsample = None if subsample == size else subsample  # all of them: no subsampling
        old_size, old_subsample, old_role = self.sizes.setdefault(
            msg["name"], (size, subsample, self.role))

        def both(what: str, old: Any, new: Any) -> str:
            if old_role == self.role:
                return f"is a plate used with {what} {old} and then {new} in the {self.role}"
            return f"is a plate with {what} {old} in the {old_role} but {new} in the {self.role}"

        if size != old_size:
            raise SiteError(msg["name"], both("size", old_size, size)
                            + "; a plate name must always have the same size")
        # the model follows the guide's subsample: it may omit subsample_size, not change it
        follows = old_role == "guide" and self.role == "model" and subsample is None
        if subsample != old_subsample and not follows:
            raise SiteError(msg["name"], both("subsample_size", old_subsample, subsample)
                            + "; a plate must be subsampled the same way wherever it is used "
                            "(the model replays the guide's subsample)")


class assign_estimators(Messenger):
    """Choose the gradient estimators of latent sites by name, from outside the program.

    Overrides the ``estimator=`` written at the sample statement, so estimators can be
    compared without editing a model. A name that matches no latent site of the program is an
    error (a misspelt site would otherwise silently keep its default).

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> guide = lambda: sg.sample("z", dist.Bernoulli(logits=0.0))
        >>> g = sg.graph(guide, sg.handlers.assign_estimators(guide, {"z": sg.RLOO()}),
        ...              num_particles=2)
        >>> g.nodes["z"].estimator
        RLOO()
    """

    scan_role = "step"

    def __init__(self, fn: Callable | None = None, estimators: dict | None = None):
        super().__init__(fn)
        _check_names_dict("assign_estimators", "estimators", estimators or {})
        self.estimators = dict(estimators or {})

        for name, estimator in self.estimators.items():
            check_estimator(name, estimator)  # None: the objective's default estimator

    def __enter__(self) -> assign_estimators:
        self._seen: set[str] = set()
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        missing = sorted(set(self.estimators) - self._seen)
        if exc_type is None and missing:
            raise SiteError(missing[0], "was given an estimator by assign_estimators, but the "
                            "program has no latent site of that name")

    def process_message(self, msg: Message) -> None:
        if (msg["type"] == "sample" and not msg["is_observed"]
                and msg["name"] in self.estimators):
            msg["estimator"] = self.estimators[msg["name"]]
            self._seen.add(msg["name"])


def trace_program(fn: Callable, rng_key: Any, params: Mapping | None, *args, **kwargs
                  ) -> Trace:
    """The trace of ``fn(*args, **kwargs)`` run at ``params`` (unconstrained values, as
    ``sg.init_params`` and ``SVI.get_params``'s input hold them; ``None``: each param's
    initial value), its sample sites seeded from ``rng_key``.

    The one way to run a program at given params (NumPyro's ``Predictive`` with one sample
    plays this role): ``seed(substitute_unconstrained(fn, params), rng_key)`` under ``trace``.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax import dist
        >>> def model():
        ...     s = sg.param("s", 2.0, constraint=dist.constraints.positive)
        ...     sg.sample("x", dist.Normal(0.0, s))
        >>> tr = sg.handlers.trace_program(model, 0, {"s": jnp.log(3.0)})
        >>> float(tr["s"]["value"]), tr["x"]["value"].shape
        (3.0, ())
    """
    if params is not None:
        fn = substitute_unconstrained(fn, params)
    return trace(seed(fn, as_prng_key(rng_key))).get_trace(*args, **kwargs)


def trace_guided(model: Callable, guide: Callable, rng_key: Any, params: Mapping | None,
                 *args, **kwargs) -> tuple[Trace, Trace]:
    """``(model_trace, guide_trace)``: the guide run at ``params``, then the model replayed
    at the guide's latent values (NumPyro's ``get_importance_trace``; no log-densities are
    added: ``sg.graph.site_cost`` computes them).

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> model = lambda: sg.sample("z", dist.Normal(0.0, 1.0))
        >>> guide = lambda: sg.sample("z", dist.Normal(1.0, 0.1))
        >>> model_tr, guide_tr = sg.handlers.trace_guided(model, guide, 0, None)
        >>> bool(model_tr["z"]["value"] == guide_tr["z"]["value"])
        True
    """
    key_guide, key_model = jax.random.split(as_prng_key(rng_key))
    guide_tr = trace_program(guide, key_guide, params, *args, **kwargs)
    model_tr = trace_program(replay(model, guide_tr), key_model, params, *args, **kwargs)
    return model_tr, guide_tr
