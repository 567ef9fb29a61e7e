"""Data-parallel training on a CPU mesh (``scgjax.parallel``): a sharded step is the
single-device step.

The test process keeps one device, so the checks run in subprocesses of this file (run as a
script): ``mesh`` on 8 simulated CPU devices (``--xla_force_host_platform_device_count=8``), and
``process`` twice, two processes of 2 devices each joined by ``jax.distributed.initialize``
(gloo collectives). Each writes its numbers to ``results.json`` / ``arrays.npz``, and the tests
below compare them. XLA's LLVM optimisation is off in the subprocesses
(``--xla_backend_optimization_level=0``): compiling dominates, and both sides of every
comparison run in the same process with the same flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
N, D, M = 64, 3, 16  # data points, features, subsample size
DEVICES = 8
#: a sharded quantity may differ from the single-device one by this, relative to the largest
#: entry of the single-device array (sums over the plate are taken in another order)
RTOL = 1e-4
#: the estimators and objectives compared, data sharded over the 8 devices
DATA_CASES = ("elbo_rloo", "elbo_dcv", "elbo_disarm", "elbo_nvil", "elbo_pathwise",
              "iwae_vimco", "rws", "expectation", "subsample")
#: particles split over a mesh axis (1-D: all 8 devices; 2-D: data 2 x particle 4)
PARTICLE_CASES = ("particles_iwae", "particles_disarm_2d")
#: the cases whose sharded state comes from ``svi.init`` on the sharded data (the others
#: replicate the single-device initial state, from a jitted ``svi.init``: quicker)
INIT_ON_MESH = ("elbo_rloo", "expectation", "particles_disarm_2d")


def _env(extra_flags: str = "") -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_backend_optimization_level=0 {extra_flags}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("JAX_ENABLE_X64", None)
    return env


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on ``path`` (POSIX; none elsewhere)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory) -> tuple[dict, dict]:
    """The ``mesh`` subprocess's results, run once per session (pytest-xdist workers share
    it: their temporary folders have a common parent)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "sharding_mesh"
    with _lock(root / "sharding_mesh.lock"):
        if not (out / "results.json").is_file():
            out.mkdir(exist_ok=True)
            proc = subprocess.run(
                [sys.executable, str(HERE), "mesh", str(out)], cwd=ROOT, capture_output=True,
                text=True, timeout=600,
                env=_env(f"--xla_force_host_platform_device_count={DEVICES}"))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "arrays.npz") as f:
        arrays = dict(f)
    return results, arrays


def _close(name: str, got: np.ndarray, want: np.ndarray) -> str | None:
    """A message if ``got`` differs from ``want`` by more than ``RTOL`` of ``want``'s scale."""
    if got.shape != want.shape:
        return f"{name}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    if not np.isfinite(want).all() or err > RTOL * scale:
        return f"{name}: max |sharded - single| = {err:.3g} (scale {scale:.3g})"
    return None


def test_sharded_step_equals_single_device_step(mesh_run):
    """Loss (two steps), gradients, estimator state and params after two steps: the same on 8
    devices as on one, for each estimator and objective, data or particles sharded."""
    results, arrays = mesh_run
    assert results["devices"] == DEVICES
    problems = []
    for case in DATA_CASES + PARTICLE_CASES:
        keys = sorted(k for k in arrays if k.startswith(f"{case}|one|"))
        assert keys, case
        kinds = {k.split("|")[2] for k in keys}
        assert {"loss1", "loss2", "grads", "params"} <= kinds, (case, kinds)
        for key in keys:
            other = key.replace("|one|", "|sharded|", 1)
            msg = _close(key, arrays[other], arrays[key])
            if msg:
                problems.append(msg)
        if case in ("elbo_nvil", "expectation"):  # estimators with a state (DCV's alpha is a
            # param, compared with the params)
            assert "est_state" in kinds, case
    assert not problems, "\n".join(problems)


def test_state_stays_replicated(mesh_run):
    """SVI.init on sharded data puts the state on the mesh, replicated; the step keeps it so."""
    results, _ = mesh_run
    for case in DATA_CASES + PARTICLE_CASES:
        info = results["cases"][case]
        assert info["state_devices"] == DEVICES, (case, info)
        assert info["state_replicated"], case


def test_data_stays_sharded(mesh_run):
    """The compiled data-parallel step gathers no data: its only collectives are all-reduces
    of parameter-sized arrays (the gradients) and of per-particle scalars; a sub-sampling plate
    all-reduces the subsample's rows (each device contributes the rows it holds), never the
    whole data set."""
    results, _ = mesh_run
    for case in DATA_CASES:
        info = results["cases"][case]
        ops = info["collectives"]
        assert ops, f"{case}: no collectives at all: the step did not run on the mesh"
        assert len(ops) == info["raw_count"], (case, ops)  # the parser saw every one
        for op, shapes in ops:
            assert op == "all-reduce", (case, op, shapes)
            for shape in shapes:
                assert N not in shape, (case, op, shape)  # nothing of the data's size
                size = int(np.prod(shape))
                if case == "subsample":  # the subsample's rows, (K, M, D)
                    assert size <= info["num_particles"] * M * D, (case, shape)
                else:
                    assert size <= max(info["largest_param"], info["num_particles"]), (
                        case, shape, info["largest_param"])


def test_particles_are_split(mesh_run):
    """With sg.shard_particles the step runs each device's particles and combines them (the
    data unsharded, or split over the other axis of a 2-D mesh): it has collectives, where a
    replicated step would have none."""
    results, _ = mesh_run
    for case in PARTICLE_CASES:
        assert results["cases"][case]["collectives"], case


def test_subsample_indices_agree(mesh_run):
    """A sub-sampling plate draws the same indices on one device and on the mesh: they come
    from the step's key, which is replicated, so every device holds the same indices."""
    results, _ = mesh_run
    sub = results["subsample_indices"]
    assert len(sub["one"]) == M and len(set(sub["one"])) == M
    assert sub["sharded"] == sub["one"]
    assert sub["replicated"] and all(s == sub["one"] for s in sub["per_device"])
    assert len(sub["per_device"]) == DEVICES


def test_run_and_errors(mesh_run):
    """``svi.run`` with sharded batches gives the single-device losses; wrong inputs say
    why."""
    results, arrays = mesh_run
    np.testing.assert_allclose(arrays["run|sharded|losses"], arrays["run|one|losses"],
                               rtol=RTOL)
    errors = results["errors"]
    assert "not a multiple of the 8 devices" in errors["indivisible"]
    assert "num_particles=4 is not a multiple of the 8" in errors["particles"]
    assert "particle_chunk" in errors["chunk"]


def test_example_runs(mesh_run):
    results, _ = mesh_run
    example = results["example"]
    assert example["devices"] == DEVICES
    assert np.isfinite(example["final_elbo"])
    assert example["relative_difference"] < RTOL
    assert all(op == "all-reduce" for op, _ in example["collectives"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_multi_process_cpu_collectives(tmp_path):
    """Two processes of 2 CPU devices each (``jax.distributed.initialize``, gloo): the data
    sharded over the 4 devices of both, or given by each process as its own rows
    (``local=True``), train to the single-device losses, by ``svi.update`` and by ``svi.run``."""
    import jax

    if "jax_cpu_collectives_implementation" not in jax.config.values:
        pytest.skip("this JAX has no CPU collectives across processes")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(HERE), "process", str(i), port, str(tmp_path)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-6000:]
    results = [json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(results):
        assert (r["process_count"], r["device_count"], r["local_devices"]) == (2, 4, 2)
        np.testing.assert_allclose(r["global"], r["reference"], rtol=1e-5, err_msg=str(i))
        np.testing.assert_allclose(r["local"], r["reference"], rtol=1e-5, err_msg=str(i))
        np.testing.assert_allclose(r["run"], r["run_reference"], rtol=1e-5, err_msg=str(i))
        np.testing.assert_allclose(r["params"], results[0]["params"], rtol=0, atol=0)


# -- the subprocesses ------------------------------------------------------------------------


def _models():
    """``(model, guide)`` builders of the cases (imported in the subprocesses only)."""
    import flax.linen as nn
    import jax.numpy as jnp

    import scgjax as sg
    from scgjax import dist

    def mixture_model(x):
        mu = sg.param("mu", jnp.array([[-1.0] * D, [1.0] * D]))
        prior = sg.param("prior", jnp.array(0.0))
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Bernoulli(logits=prior))
            sg.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0).to_event(1), obs=x)

    def mixture_guide(estimator):
        def guide(x):
            a = sg.param("a", jnp.full((D,), 0.3))
            b = sg.param("b", jnp.array(0.0))  # logits exactly 0 somewhere: numpyro's trap
            with sg.plate("data", x.shape[0]):
                sg.sample("z", dist.Bernoulli(logits=x @ a + b), estimator=estimator(x))
        return guide

    def nvil(x):
        return sg.ScoreFunction(baseline=sg.baselines.Neural(nn.Dense(1), inputs=x,
                                                             normalise=True))

    def vae_model(x):
        decode = sg.module("decoder", nn.Dense(D), jnp.zeros((1, 2)))
        with sg.plate("data", x.shape[0]):
            z = sg.sample("z", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
            sg.sample("x", dist.Normal(decode(z), 1.0).to_event(1), obs=x)

    def vae_guide(x):
        encode = sg.module("encoder", nn.Dense(4), jnp.zeros((1, D)))
        with sg.plate("data", x.shape[0]):
            out = encode(x)
            sg.sample("z", dist.Normal(out[:, :2], nn.softplus(out[:, 2:]) + 0.1).to_event(1))

    def policy(x):
        w = sg.param("w", jnp.zeros(D))
        with sg.plate("data", x.shape[0]):
            a = sg.sample("a", dist.Bernoulli(logits=x @ w))
            sg.factor("reward", -(a - (x[:, 0] > 0)) ** 2 * (1.0 + x[:, 1] ** 2))

    def sub_model(x):
        mu = sg.param("mu", jnp.array([[-1.0] * D, [1.0] * D]))
        with sg.plate("data", N, subsample_size=M) as idx:
            z = sg.sample("z", dist.Bernoulli(logits=0.0))
            sg.sample("x", dist.Normal(mu[z.astype(jnp.int32)], 1.0).to_event(1), obs=x[idx])

    def sub_guide(x):
        a = sg.param("a", jnp.full((D,), 0.3))
        with sg.plate("data", N, subsample_size=M) as idx:
            sg.sample("z", dist.Bernoulli(logits=x[idx] @ a), estimator=sg.RLOO())

    none = lambda x: None  # noqa: E731
    return {
        "elbo_rloo": (mixture_model, mixture_guide(lambda x: sg.RLOO()), sg.ELBO(4)),
        "elbo_dcv": (mixture_model, mixture_guide(lambda x: sg.DCV()), sg.ELBO(4)),
        "elbo_disarm": (mixture_model, mixture_guide(lambda x: sg.DisARM()), sg.ELBO(4)),
        "elbo_nvil": (mixture_model, mixture_guide(nvil), sg.ELBO(1)),
        "elbo_pathwise": (vae_model, vae_guide, sg.ELBO(2)),
        "iwae_vimco": (mixture_model, mixture_guide(none), sg.IWAE(num_particles=4)),
        "rws": (mixture_model, mixture_guide(none), sg.RWS(num_particles=4)),
        "expectation": (policy, None, sg.Expectation(1)),  # moving-average baseline
        "subsample": (sub_model, sub_guide, sg.ELBO(2)),
        "particles_iwae": (mixture_model, mixture_guide(none), sg.IWAE(num_particles=8)),
        "particles_disarm_2d": (mixture_model, mixture_guide(lambda x: sg.DisARM()),
                                sg.ELBO(8)),
    }


def _recording_sgd(lr: float = 1e-3):
    """SGD whose optimiser state is the last gradient (to compare gradients)."""
    import jax
    import optax

    return optax.GradientTransformation(
        lambda params: jax.tree.map(lambda p: 0.0 * p, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: -lr * g, grads), grads))


def _flat(tree, prefix: str) -> dict:
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def _mesh_main(out: Path) -> None:  # noqa: PLR0915 -- one process runs every case
    import jax

    import scgjax as sg
    from scgjax.parallel import collectives

    assert len(jax.devices()) == DEVICES, jax.devices()
    x = np.asarray(jax.random.normal(jax.random.key(0), (N, D)), np.float32)
    results: dict = {"devices": len(jax.devices()), "cases": {}}
    arrays: dict = {}
    mesh_1d = sg.device_mesh()
    mesh_2d = sg.device_mesh(data=2, particle=4)
    particle_mesh = sg.device_mesh(particle=-1)
    start = time.perf_counter()
    for case, (model, guide, objective) in _models().items():
        print(f"{time.perf_counter() - start:6.1f} s: {case}", flush=True)
        data_mesh, sharded_objective = mesh_1d, objective
        if case == "particles_iwae":  # the data on every device, the particles split 8 ways
            data_mesh, sharded_objective = None, sg.shard_particles(objective, particle_mesh)
        elif case == "particles_disarm_2d":
            data_mesh, sharded_objective = mesh_2d, sg.shard_particles(objective, mesh_2d)
        svis = {"one": sg.SVI(model, guide, _recording_sgd(), objective),
                "sharded": sg.SVI(model, guide, _recording_sgd(), sharded_objective)}
        data = {"one": x, "sharded": x if data_mesh is None else sg.shard_data(x, data_mesh)}
        initial = None
        for which, svi in svis.items():
            if case in INIT_ON_MESH:
                state = svi.init(1, data[which])  # on sharded data: replicated on the mesh
            elif which == "one":  # jitted: quicker than svi.init's un-jitted runs
                state = jax.jit(svi.init)(jax.random.key(1), x)
            else:
                state = sg.replicate(initial, data_mesh or particle_mesh)
            initial = initial or state
            state, loss1 = svi.update(state, data[which])
            state, loss2 = svi.update(state, data[which])
            arrays[f"{case}|{which}|loss1"] = np.asarray(loss1)
            arrays[f"{case}|{which}|loss2"] = np.asarray(loss2)
            arrays.update(_flat(state.opt_state, f"{case}|{which}|grads|"))
            arrays.update(_flat(state.params, f"{case}|{which}|params|"))
            arrays.update(_flat(state.estimator_state, f"{case}|{which}|est_state|"))
        leaves = jax.tree.leaves(state)
        # the step that svi.update ran (compiled already: this is a cache hit)
        step, inputs = svis["sharded"]._compiled((data["sharded"],), {})
        text = step.lower(state, inputs).compile().as_text()
        results["cases"][case] = {
            "collectives": collectives(text),
            "raw_count": len(re.findall(r"\s(?:all-gather|all-reduce|all-to-all|reduce-scatter|"
                                        r"collective-permute)(?:-start)?\(", text)),
            "state_devices": min(len(leaf.sharding.device_set) for leaf in leaves),
            "state_replicated": all(leaf.sharding.is_fully_replicated for leaf in leaves),
            "largest_param": max(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
            "num_particles": objective.num_particles,
        }
        if case == "elbo_rloo":
            run_svi = svis

    # svi.run on sharded mini-batches (a sharded first batch: run replicates the state)
    batches = [x[np.random.default_rng(i).permutation(N)] for i in range(3)]
    for which, svi in run_svi.items():
        items = batches if which == "one" else [sg.shard_data(b) for b in batches]
        result = svi.run(2, 3, batches=items, progress_bar=False)
        arrays[f"run|{which}|losses"] = result.losses

    # the subsample's indices, drawn inside a jitted program that reads the sharded data
    sub_model = _models()["subsample"][0]

    def indices(key, data):
        trace = sg.handlers.trace_program(sub_model, key, None, data)
        return trace["data"]["value"], trace["x"]["value"].sum()

    idx_one = jax.jit(indices)(jax.random.key(3), x)[0]
    idx_sharded = jax.jit(indices)(jax.random.key(3), sg.shard_data(x))[0]
    results["subsample_indices"] = {
        "one": np.asarray(idx_one).tolist(), "sharded": np.asarray(idx_sharded).tolist(),
        "replicated": idx_sharded.sharding.is_fully_replicated,
        "per_device": [np.asarray(s.data).tolist() for s in idx_sharded.addressable_shards]}

    errors = {}
    for name, attempt in {
        "indivisible": lambda: sg.shard_data(x[:60]),
        "particles": lambda: sg.shard_particles(sg.ELBO(num_particles=4)),
        "chunk": lambda: sg.shard_particles(sg.ELBO(num_particles=16, particle_chunk=8)),
    }.items():
        try:
            attempt()
            errors[name] = "no error"
        except (ValueError, TypeError) as e:
            errors[name] = str(e)
    results["errors"] = errors

    sys.path.insert(0, str(ROOT / "examples"))
    import sharded_vae

    results["example"] = sharded_vae.main(["--devices", str(DEVICES), "--steps", "4",
                                           "--synthetic", "--batch-size", "64", "--no-progress",
                                           "--hidden", "16", "--out", str(out / "example")])
    np.savez(out / "arrays.npz", **arrays)
    (out / "results.json").write_text(json.dumps(results, default=float))


def _process_main(process_id: int, port: str, out: Path) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    import optax

    import scgjax as sg

    model, guide, objective = _models()["elbo_rloo"]
    x = np.asarray(jax.random.normal(jax.random.key(0), (N, D)), np.float32)
    svi = sg.SVI(model, guide, optax.adam(0.05), objective)
    losses: dict = {"reference": [], "global": [], "local": []}
    states = {"reference": svi.init(0, x)}  # this process's own device, host data
    states["global"] = states["local"] = sg.replicate(states["reference"])  # on all 4
    rows = slice(process_id * N // 2, (process_id + 1) * N // 2)
    data = {"reference": x, "global": sg.shard_data(x), "local": sg.shard_data(x[rows],
                                                                               local=True)}
    for which in losses:
        state = states[which]
        for _ in range(3):
            state, loss = svi.update(state, data[which])
            losses[which].append(float(loss))
        states[which] = state
    # svi.run on data spread over both processes (its un-jitted checks skip what no process
    # sees whole), against svi.run on host data
    losses["run"] = svi.run(jax.random.key(5), 3, sg.shard_data(x[rows], local=True),
                            progress_bar=False).losses.tolist()
    losses["run_reference"] = svi.run(jax.random.key(5), 3, x, progress_bar=False).losses.tolist()
    result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
              "local_devices": jax.local_device_count(), **losses,
              "params": np.asarray(states["global"].params["a"]).tolist()}
    (out / f"process{process_id}.json").write_text(json.dumps(result))
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "mesh":
        _mesh_main(Path(sys.argv[2]))
    elif sys.argv[1] == "process":
        _process_main(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
