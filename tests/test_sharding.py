"""The tasks plate across devices (and processes): metaprior.inference.sharding.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts, so the
several-device checks run this file as a script in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu``; the script
computes everything, writes a JSON report, and the tests here assert on it.

Multi-process: two real processes on 127.0.0.1, two CPU devices each, joined by
``jax.distributed.initialize`` and talking through Gloo (JAX's CPU collectives), run
the same sharded meta-training over the 4 devices of both; not a simulation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

# Float32 sums are reassociated when split over devices (a psum of 4 partial sums
# instead of one sequential sum); on these small problems that moves results by a few
# ulps relative (~1e-7), and a handful of Adam steps by ~1e-6. 1e-5 relative leaves
# room for that while still catching any real difference (a wrong row, a task counted
# twice or missed), which changes results at the 1e-2 level or more.
RTOL = 1e-5
ATOL = 1e-6


# --------------------------------------------------------------------------- one device


def test_task_shardings_rule_on_one_device():
    from jax.sharding import PartitionSpec as P

    from metaprior.inference import sharding

    mesh = sharding.task_mesh()
    tree = {"rows": jnp.zeros((6, 3)), "glob": jnp.zeros((4, 3)), "scalar": jnp.zeros(())}
    specs = jax.tree.map(lambda s: s.spec, sharding.task_shardings(tree, mesh, num_tasks=6))
    assert specs == {"rows": P("tasks"), "glob": P(), "scalar": P()}
    # Inferred from the first leaf with an axis (dict leaves are in key order: "glob").
    assert sharding.infer_num_tasks(tree) == 4
    assert sharding.infer_num_tasks({"a": jnp.zeros(())}) is None
    placed = sharding.shard_tasks(tree, mesh, num_tasks=6)
    np.testing.assert_array_equal(placed["rows"], tree["rows"])


def test_fit_with_one_device_mesh_matches_fit_without(rng_key):
    import optax

    from metaprior.inference import sharding
    from metaprior.inference.meta import fit, meta_learner

    data = {"x": jax.random.normal(rng_key, (8, 5)), "y": jax.random.normal(jax.random.key(1), (8, 5))}
    params = {"w": jnp.ones(()), "rows": jnp.zeros((8,))}

    def loss_fn(params, rng_key, batch):
        pred = params["w"] * batch["x"] + params["rows"][:, None]
        return jnp.mean((pred - batch["y"]) ** 2)

    learner = meta_learner(loss_fn, optax.adam(1e-2))
    plain = fit(rng_key, learner, params, 5, data=data, progress=False)
    meshed = fit(rng_key, learner, params, 5, data=data, progress=False, mesh=sharding.task_mesh())
    np.testing.assert_allclose(meshed.losses, plain.losses, rtol=RTOL)
    np.testing.assert_allclose(meshed.state.params["rows"], plain.state.params["rows"], rtol=RTOL, atol=ATOL)


def test_shard_plate_needs_a_mesh():
    from metaprior.inference import sharding

    with pytest.raises(ValueError, match="mesh"):
        sharding.shard_plate(lambda: None)


# --------------------------------------------------------------------------- 4 devices


def _run_worker(args: list[str], env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(HERE), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    proc = _run_worker(
        ["four-devices", str(out)],
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"},
        timeout=900,
    )
    assert proc.returncode == 0, f"4-device worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_worker_sees_four_devices(four_devices):
    assert four_devices["device_count"] == 4


def test_sharded_elbo_step_equals_unsharded(four_devices):
    """The harmonic task-latent model with the per-task IAF guide, task subsampling on."""
    r = four_devices["elbo"]
    np.testing.assert_allclose(r["loss_sharded"], r["loss_plain"], rtol=RTOL)
    np.testing.assert_allclose(r["loss_plate"], r["loss_plain"], rtol=RTOL)
    assert r["grad_rel_err_sharded"] < RTOL, r
    assert r["grad_rel_err_plate"] < RTOL, r
    assert r["grad_norm"] > 0  # the comparison is not between two zero vectors


def test_elbo_arrays_are_split_across_devices(four_devices):
    r = four_devices["elbo"]
    num_tasks = r["num_tasks"]
    # The meta-training set: every leaf is [tasks, ...], each device holds a quarter.
    for name, rows in r["data_shard_rows"].items():
        assert rows == [num_tasks // 4] * 4, (name, rows)
    # Per-task guide rows are split; the shared network is whole on every device.
    assert r["per_task_param_shard_rows"], "no per-task parameters found"
    for name, rows in r["per_task_param_shard_rows"].items():
        assert rows == [num_tasks // 4] * 4, (name, rows)
    assert r["global_params_replicated"]
    # The subsampled latents z [B, 1, d], pinned by shard_plate inside the model.
    assert r["latent_shard_rows"] == [r["subsample_size"] // 4] * 4


def test_fit_on_mesh_equals_fit_without_mesh(four_devices):
    r = four_devices["fit_elbo"]
    np.testing.assert_allclose(r["losses_mesh"], r["losses_plain"], rtol=1e-4)
    assert r["param_rel_err"] < 1e-4, r  # 6 Adam steps: the ulp-level differences grow a little
    # The layout survives the compiled steps: per-task rows and Adam moments still split.
    assert r["state_per_task_specs"] and set(r["state_per_task_specs"]) == {"P('tasks',)"}, r
    assert r["opt_state_split_leaves"] >= 2 * len(r["state_per_task_specs"])  # mu and nu rows


def test_task_batch_learner_on_mesh_equals_without(four_devices):
    """The row-sparse step (gather, E-steps, scatter) gives the same run on 4 devices,
    and the guide table and its per-task optimizer states stay split across them."""
    r = four_devices["fit_rows"]
    np.testing.assert_allclose(r["losses_mesh"], r["losses_plain"], rtol=1e-4)
    assert r["param_rel_err"] < 1e-4, r
    assert r["state_per_task_specs"] and set(r["state_per_task_specs"]) == {"P('tasks',)"}, r
    assert r["row_opt_split_leaves"] == r["row_opt_leaves"] > 0, r


def test_vmapped_per_task_step_is_split(four_devices):
    """A MAML-style step: per-task inner loop under vmap, tasks drawn by a sampler."""
    r = four_devices["maml_like"]
    np.testing.assert_allclose(r["loss_sharded"], r["loss_plain"], rtol=RTOL)
    assert r["grad_rel_err"] < RTOL, r
    b = r["task_batch"]
    assert r["adapted_shard_rows"] == [b // 4] * 4  # adapted parameters per task
    assert r["curvature_shard_rows"] == [b // 4] * 4  # per-task curvature (diagonal Fisher)
    np.testing.assert_allclose(r["fit_losses_mesh"], r["fit_losses_plain"], rtol=1e-4)


def test_checkpoint_resume_on_mesh(four_devices):
    r = four_devices["checkpoint"]
    assert r["resumed_equals_straight"], r


def test_uneven_task_counts_are_refused_or_replicated(four_devices):
    r = four_devices["uneven"]
    assert "not a multiple" in r["shard_tasks_error"]
    assert r["fit_warned"] and r["fit_state_replicated"]


# --------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_loopback(tmp_path):
    """Two real processes (jax.distributed.initialize, Gloo) x 2 CPU devices each."""
    port = _free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = []
    for pid in range(2):
        e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        e.update(env)
        e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), "two-processes", str(tmp_path), str(pid), str(port)],
                env=e,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, f"process failed:\n{stdout[-2000:]}\n{stderr[-6000:]}"
    reports = [json.loads((tmp_path / f"proc{pid}.json").read_text()) for pid in range(2)]
    for pid, r in enumerate(reports):
        assert r["process_index"] == pid and r["process_count"] == 2
        assert r["device_count"] == 4 and r["local_device_count"] == 2
        # Each process holds half of the per-task rows (its two devices' quarters).
        assert r["local_rows"] == [r["num_tasks"] // 4] * 2
        np.testing.assert_allclose(r["losses_mesh"], r["losses_plain"], rtol=1e-4)
        assert r["param_rel_err"] < 1e-4, r
    # Both processes computed the same global run, and process 0 wrote the checkpoint.
    np.testing.assert_allclose(reports[0]["losses_mesh"], reports[1]["losses_mesh"], rtol=0)
    assert reports[0]["checkpoint_matches"]


# --------------------------------------------------------------------------- workers
# Run as `python tests/test_sharding.py four-devices OUT` or
# `python tests/test_sharding.py two-processes DIR PID PORT` (XLA_FLAGS set by the caller).


def _rows(array) -> list[int]:
    return sorted((int(s.data.shape[0]) for s in array.addressable_shards), reverse=True)


def _rel_err(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _harmonic(num_tasks: int, subsample_size: int):
    """The issue-2 model at a tiny size, its IAF guide, and its ELBO."""
    from metaprior.data.tasks import harmonic_tasks
    from metaprior.inference.guides import TaskIAFGuide
    from metaprior.inference.svi import elbo_loss, init_params
    from metaprior.models.task_latent import make_task_latent_net, task_latent_model

    data, _ = harmonic_tasks(jax.random.key(0), num_tasks, 12, min_examples=4)
    # the paper's residual MLP: shard_params splits every leaf whose leading axis equals the
    # number of tasks, and the FiLM net's 32-unit noise layer would match num_tasks here
    net = make_task_latent_net(jax.random.key(1), 2, arch="paper", width=16, num_layers=2)
    kwargs = dict(net=net, latent_dim=2, subsample_size=subsample_size)
    guide = TaskIAFGuide.build(jax.random.key(2), task_latent_model, data, num_flows=1, hidden_dim=8, **kwargs)
    params = init_params(jax.random.key(3), task_latent_model, guide, data, **kwargs)
    return data, params, task_latent_model, guide, kwargs, elbo_loss


def _maml_like(num_tasks: int):
    """A MAML-shaped objective: per task, one inner SGD step of an MLP on the support
    set, query loss at the adapted weights, and a per-task diagonal Fisher."""
    import equinox as eqx

    from metaprior.models.nets import MLP

    k = jax.random.split(jax.random.key(5), 4)
    amp = jax.random.uniform(k[0], (num_tasks, 1, 1), minval=0.5, maxval=2.0)
    xs = jax.random.uniform(k[1], (num_tasks, 10, 1), minval=-3, maxval=3)
    xq = jax.random.uniform(k[2], (num_tasks, 10, 1), minval=-3, maxval=3)
    data = {"xs": xs, "ys": amp * jnp.sin(xs), "xq": xq, "yq": amp * jnp.sin(xq)}
    net = MLP(1, 1, (16, 16), key=k[3])
    params, static = eqx.partition(net, eqx.is_array)

    def task_loss(p, x, y):
        return jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

    def per_task(p, task):
        g = jax.grad(task_loss)(p, task["xs"], task["ys"])
        adapted = jax.tree.map(lambda w, gw: w - 0.1 * gw, p, g)
        fisher = jax.tree.map(jnp.square, jax.grad(task_loss)(adapted, task["xq"], task["yq"]))
        return task_loss(adapted, task["xq"], task["yq"]), (adapted, fisher)

    def loss_fn(p, rng_key, batch):
        losses, (adapted, fisher) = jax.vmap(per_task, in_axes=(None, 0))(p, batch)
        return jnp.mean(losses), (adapted, fisher)

    return data, params, loss_fn


def _four_devices(out: str) -> None:
    import warnings

    import numpyro
    import numpyro.distributions as dist
    import optax
    from jax.sharding import PartitionSpec as P
    from numpyro import handlers

    from metaprior.inference import sharding
    from metaprior.inference.meta import fit, meta_learner

    report: dict = {"device_count": jax.device_count()}
    mesh = sharding.task_mesh()
    key = jax.random.key(7)

    # ---- the harmonic model with the per-task IAF guide
    num_tasks, subsample = 32, 8
    data, params, model, guide, kwargs, elbo_loss = _harmonic(num_tasks, subsample)
    loss_plain = elbo_loss(model, guide, model_kwargs=kwargs)
    loss_plate = elbo_loss(sharding.shard_plate(model, mesh), sharding.shard_plate(guide, mesh), model_kwargs=kwargs)
    vg = jax.jit(jax.value_and_grad(loss_plain))
    vg_plate = jax.jit(jax.value_and_grad(loss_plate))
    l0, g0 = vg(params, key, data)
    s_data = sharding.shard_tasks(data, mesh)
    s_params = sharding.shard_tasks(params, mesh, num_tasks=num_tasks)
    l1, g1 = vg(s_params, key, s_data)
    l2, g2 = vg_plate(s_params, key, s_data)

    def probe(batch):  # returns the latent exactly as the model's own code receives it
        with numpyro.plate("tasks", num_tasks, subsample_size=subsample, dim=-2) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            return z + 0.0 * batch.x[idx, :1, :]

    z = jax.jit(lambda k, b: handlers.seed(sharding.shard_plate(probe, mesh), k)(b))(key, s_data)
    per_task = {n: _rows(v) for n, v in s_params.items() if np.shape(v)[:1] == (num_tasks,)}
    report["elbo"] = {
        "num_tasks": num_tasks,
        "subsample_size": subsample,
        "loss_plain": float(l0),
        "loss_sharded": float(l1),
        "loss_plate": float(l2),
        "grad_rel_err_sharded": _rel_err(g1, g0),
        "grad_rel_err_plate": _rel_err(g2, g0),
        "grad_norm": float(optax.global_norm(g0)),
        "data_shard_rows": {f: _rows(getattr(s_data, f)) for f in ("x", "y", "mask")},
        "per_task_param_shard_rows": per_task,
        "global_params_replicated": all(
            leaf.sharding.spec == P() and len(leaf.addressable_shards) == 4
            for leaf in jax.tree.leaves(s_params["net$params"])
        ),
        "latent_shard_rows": _rows(z),
    }

    # ---- fit with and without a mesh
    plain = fit(key, meta_learner(loss_plain, optax.adam(1e-2)), params, 6, data=data, progress=False)
    meshed = fit(key, meta_learner(loss_plate, optax.adam(1e-2)), params, 6, data=data, progress=False, mesh=mesh)

    def compare_fits(plain, meshed, opt_state):
        """Losses and parameters of both runs, how the meshed run's per-task state is laid
        out, and how many per-task leaves of ``opt_state`` are split in four."""
        return {
            "losses_plain": plain.losses.tolist(),
            "losses_mesh": meshed.losses.tolist(),
            "param_rel_err": _rel_err(meshed.state.params, plain.state.params),
            "state_per_task_specs": sorted(
                {str(v.sharding.spec) for n, v in meshed.state.params.items() if np.shape(v)[:1] == (num_tasks,)}
            ),
            "split_leaves": sum(
                1
                for leaf in jax.tree.leaves(opt_state)
                if np.shape(leaf)[:1] == (num_tasks,) and _rows(leaf) == [num_tasks // 4] * 4
            ),
        }

    report["fit_elbo"] = compare_fits(plain, meshed, meshed.state.opt_state)
    report["fit_elbo"]["opt_state_split_leaves"] = report["fit_elbo"].pop("split_leaves")

    # ---- the library's row-sparse step (task_batch_learner, with E-steps) on and off a mesh
    from metaprior.inference.local import task_batch_learner

    rows_learner = task_batch_learner(
        model,
        guide,
        task_batch=subsample,
        optimizer=optax.adam(1e-2),
        local_steps=2,
        model_kwargs={k: v for k, v in kwargs.items() if k != "subsample_size"},
    )
    plain = fit(key, rows_learner, params, 6, data=data, progress=False)
    meshed = fit(key, rows_learner, params, 6, data=data, progress=False, mesh=mesh)
    report["fit_rows"] = compare_fits(plain, meshed, meshed.state.opt_state.rows)
    report["fit_rows"]["row_opt_split_leaves"] = report["fit_rows"].pop("split_leaves")
    report["fit_rows"]["row_opt_leaves"] = len(jax.tree.leaves(meshed.state.opt_state.rows))

    # ---- a MAML-shaped step: tasks drawn by a sampler, vmap over tasks
    num_tasks, batch_size = 64, 8
    mdata, mparams, mloss = _maml_like(num_tasks)

    def sample_batch(k, d):
        idx = jax.random.choice(k, num_tasks, (batch_size,), replace=False)
        return jax.tree.map(lambda a: a[idx], d)

    batch = sample_batch(key, mdata)
    (la, _), ga = jax.jit(jax.value_and_grad(mloss, has_aux=True))(mparams, key, batch)
    layout_fn = jax.jit(
        lambda p, k, b: jax.value_and_grad(mloss, has_aux=True)(p, k, sharding.constrain_tasks(b, mesh))
    )
    (lb, (adapted, fisher)), gb = layout_fn(sharding.replicate(mparams, mesh), key, sharding.shard_tasks(batch, mesh))
    mlearner = meta_learner(mloss, optax.adam(1e-2), has_aux=True)
    fp = fit(key, mlearner, mparams, 5, data=mdata, sample_batch=sample_batch, progress=False)
    fm = fit(key, mlearner, mparams, 5, data=mdata, sample_batch=sample_batch, progress=False, mesh=mesh)
    report["maml_like"] = {
        "task_batch": batch_size,
        "loss_plain": float(la),
        "loss_sharded": float(lb),
        "grad_rel_err": _rel_err(gb, ga),
        "adapted_shard_rows": _rows(jax.tree.leaves(adapted)[0]),
        "curvature_shard_rows": _rows(jax.tree.leaves(fisher)[0]),
        "fit_losses_plain": fp.losses.tolist(),
        "fit_losses_mesh": fm.losses.tolist(),
    }

    # ---- checkpoint and resume on the mesh
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "run.ckpt"
        straight = fit(key, mlearner, mparams, 4, data=mdata, sample_batch=sample_batch, progress=False, mesh=mesh)
        fit(
            key, mlearner, mparams, 2, data=mdata, sample_batch=sample_batch, progress=False, mesh=mesh, checkpoint=ckpt
        )
        resumed = fit(
            key, mlearner, mparams, 4, data=mdata, sample_batch=sample_batch, progress=False, mesh=mesh, checkpoint=ckpt
        )
        same = all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state))
        )
        report["checkpoint"] = {
            "resumed_equals_straight": bool(same and np.array_equal(straight.losses, resumed.losses))
        }

    # ---- task counts that are not a multiple of the device count
    try:
        sharding.shard_tasks({"x": jnp.zeros((6, 2))}, mesh)
        error = ""
    except ValueError as err:
        error = str(err)
    odd = {"x": jnp.zeros((6, 2)), "y": jnp.zeros((6, 2))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit(
            key,
            meta_learner(lambda p, k, b: jnp.mean((p["r"][:, None] - b["y"]) ** 2), optax.sgd(0.1)),
            {"r": jnp.ones((6,))},
            2,
            data=odd,
            progress=False,
            mesh=mesh,
        )
    report["uneven"] = {
        "shard_tasks_error": error,
        "fit_warned": any("not a multiple" in str(w.message) for w in caught),
        "fit_state_replicated": res.state.params["r"].sharding.spec == P(),
    }
    Path(out).write_text(json.dumps(report))


def _two_processes(out_dir: str, pid: int, port: int) -> None:
    from metaprior.inference import sharding

    info = sharding.initialize_distributed(
        f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=120
    )
    import optax

    from metaprior.inference.meta import fit, load_checkpoint, meta_learner

    num_tasks, subsample = 16, 8
    data, params, model, guide, kwargs, elbo_loss = _harmonic(num_tasks, subsample)
    mesh = sharding.task_mesh()
    loss = elbo_loss(sharding.shard_plate(model, mesh), sharding.shard_plate(guide, mesh), model_kwargs=kwargs)
    learner = meta_learner(loss, optax.adam(1e-2))
    key = jax.random.key(11)
    ckpt = Path(out_dir) / "run.ckpt"
    meshed = fit(key, learner, params, 4, data=data, progress=False, mesh=mesh, checkpoint=ckpt)
    # The reference: the same run on this process's first device only, no mesh.
    local = jax.local_devices()[0]
    plain_learner = meta_learner(elbo_loss(model, guide, model_kwargs=kwargs), optax.adam(1e-2))
    with jax.default_device(local):
        plain = fit(
            key, plain_learner, jax.device_put(params, local), 4, data=jax.device_put(data, local), progress=False
        )
    host = sharding.to_host(meshed.state)
    rows = next(v for v in meshed.state.params.values() if np.shape(v)[:1] == (num_tasks,))
    report = {
        **info._asdict(),
        "num_tasks": num_tasks,
        "local_rows": _rows(rows),
        "losses_mesh": meshed.losses.tolist(),
        "losses_plain": plain.losses.tolist(),
        "param_rel_err": _rel_err(host.params, plain.state.params),
    }
    if pid == 0:  # fit returns after process 0 has written the checkpoint
        loaded, _ = load_checkpoint(ckpt, like=plain.state)
        report["checkpoint_matches"] = all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(host))
        )
    Path(out_dir, f"proc{pid}.json").write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "four-devices":
        _four_devices(sys.argv[2])
    elif sys.argv[1] == "two-processes":
        _two_processes(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
