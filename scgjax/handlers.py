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

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import biject_to, constraints

from scgjax.errors import ScgjaxError, SiteError
from scgjax.primitives import Message, Messenger

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
    "as_prng_key",
]

Trace = dict[str, Message]


def as_prng_key(rng_key: Any, what: str = "rng_key") -> jax.Array:
    """Return ``rng_key`` as a JAX PRNG key, accepting an int seed; raise ``TypeError`` else.

    Example:
        >>> as_prng_key(0).dtype
        key<fry>
    """
    if isinstance(rng_key, (int,)) and not isinstance(rng_key, bool):
        return jax.random.key(rng_key)
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
        if previous is not None:
            if msg["type"] == "param" and previous["type"] == "param":
                old = jax.tree.map(jnp.shape, previous["value"])
                new = jax.tree.map(jnp.shape, msg["value"])
                if old != new:
                    raise SiteError(
                        name, f"is a param re-declared with shape {new}; it was {old} before"
                    )
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
    values every time it is called, under ``jit`` or not.

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

    def __enter__(self) -> seed:
        self._key = as_prng_key(self.rng_seed, "rng_seed")
        return super().__enter__()

    def process_message(self, msg: Message) -> None:
        wants_key = (
            (msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None)
            or (msg["type"] == "plate" and msg["value"] is None
                and msg["args"][1] not in (None, msg["args"][0]))
            or (msg["type"] == "param" and msg["value"] is None and callable(msg["args"][0]))
        )
        if wants_key and msg["kwargs"].get("rng_key") is None:
            self._key, msg["kwargs"]["rng_key"] = jax.random.split(self._key)


class substitute(Messenger):
    """Fix the values of latent sample sites and params by name (constrained values).

    ``data`` maps names to values; ``substitute_fn(msg)`` may compute a value or return
    ``None`` to leave the site alone.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> f = sg.handlers.substitute(lambda: sg.sample("x", dist.Normal(0.0, 1.0)), {"x": 2.0})
        >>> f()
        2.0
    """

    def __init__(self, fn: Callable | None = None, data: dict | None = None,
                 substitute_fn: Callable[[Message], Any] | None = None):
        super().__init__(fn)
        if (data is None) == (substitute_fn is None):
            raise TypeError("substitute needs exactly one of `data` or `substitute_fn`")
        self.data = data
        self.substitute_fn = substitute_fn

    def process_message(self, msg: Message) -> None:
        if msg["type"] not in ("sample", "param", "plate") or msg.get("is_observed"):
            return
        if self.data is not None:
            value = self.data.get(msg["name"])
        else:
            value = self.substitute_fn(msg)
        if value is not None:
            msg["value"] = value


class substitute_unconstrained(Messenger):
    """Give params their values from a dict of *unconstrained* values (what objectives train).

    Each stored value ``u`` becomes ``biject_to(constraint)(u)`` at the param site. A param whose
    initial value is an array of another shape than the stored one is an error.

    Example:
        >>> import jax.numpy as jnp, scgjax as sg
        >>> from scgjax.dist import constraints
        >>> prog = lambda: sg.param("s", 1.0, constraints.positive)
        >>> float(sg.handlers.substitute_unconstrained(prog, {"s": jnp.log(3.0)})())
        3.0
    """

    def __init__(self, fn: Callable | None = None, params: dict | None = None):
        super().__init__(fn)
        self.params = {} if params is None else params

    def process_message(self, msg: Message) -> None:
        if msg["type"] != "param" or msg["name"] not in self.params:
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
        if constraint is constraints.real:
            msg["value"] = stored
        else:
            msg["value"] = biject_to(constraint)(stored)


class condition(Messenger):
    """Observe sample sites: ``data[name]`` becomes an observed value of the site.

    Example:
        >>> import scgjax as sg
        >>> from scgjax import dist
        >>> prog = sg.handlers.condition(lambda: sg.sample("x", dist.Normal(0.0, 1.0)), {"x": 1.0})
        >>> tr = sg.handlers.trace(prog).get_trace()
        >>> tr["x"]["is_observed"]
        True
    """

    def __init__(self, fn: Callable | None = None, data: dict | None = None):
        super().__init__(fn)
        self.data = {} if data is None else data

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "sample" and msg["name"] in self.data and not msg.get("is_factor"):
            msg["value"] = self.data[msg["name"]]
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

    def __init__(self, fn: Callable | None = None, trace: Trace | None = None):
        super().__init__(fn)
        if trace is None:
            raise TypeError("replay needs a trace")
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
        msg["value"] = recorded["value"]


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

    def __init__(self, fn: Callable | None = None,
                 hide_fn: Callable[[Message], bool] | None = None,
                 hide: Iterable[str] | None = None, expose: Iterable[str] | None = None):
        super().__init__(fn)
        if sum(x is not None for x in (hide_fn, hide, expose)) > 1:
            raise TypeError("block takes at most one of hide_fn, hide, expose")
        if hide is not None:
            names = set(hide)
            hide_fn = lambda msg: msg["name"] in names
        elif expose is not None:
            names = set(expose)
            hide_fn = lambda msg: msg["name"] not in names
        elif hide_fn is None:
            hide_fn = lambda msg: True
        self.hide_fn = hide_fn

    def process_message(self, msg: Message) -> None:
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

    def __init__(self, fn: Callable | None = None, scale: Any = 1.0):
        super().__init__(fn)
        # numpy, not jnp: under jit a jnp comparison of a Python float is staged into a tracer
        if not isinstance(scale, jax.core.Tracer) and bool(np.any(np.asarray(scale) <= 0)):
            raise ScgjaxError(f"scale must be positive, got {scale}")
        self.scale = scale

    def process_message(self, msg: Message) -> None:
        if msg["type"] in ("sample",):
            msg["scale"] = self.scale if msg["scale"] is None else msg["scale"] * self.scale


class mask(Messenger):
    """Drop elements of sites where ``mask`` is False: their log-density becomes 0.

    A masked latent element neither costs nor earns credit; the site is still sampled.

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

    def __init__(self, fn: Callable | None = None, mask: Any = True):
        super().__init__(fn)
        self.mask = mask

    def process_message(self, msg: Message) -> None:
        if msg["type"] == "sample":
            msg["mask"] = self.mask if msg["mask"] is None else msg["mask"] & self.mask


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

    def __init__(self, fn: Callable | None = None, estimators: dict | None = None):
        super().__init__(fn)
        self.estimators = dict(estimators or {})

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
