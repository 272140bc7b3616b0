"""Bad inputs across the public API and the CLI: one table, each case a clear error.

Every row calls the library (or ``metaprior.cli.main``) the way a careless or hostile user
would, and asserts the exception type (or the CLI's exit status 2) and that the message
names the argument and the offending value. CLI rows also assert that nothing is left in
``--out``. The table is rendered to ``docs/bad_inputs.md`` by
``python tests/test_bad_inputs.py``; a test checks that the file is up to date.
"""

from __future__ import annotations

import io
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_inputs.md"


class Case(NamedTuple):
    id: str
    layer: str  # "data", "model", "inference", "diagnostics", "cli", "files"
    what: str  # the bad input, for the doc
    call: Callable  # call(tmp_path) -> None; must raise (or, for the CLI, return 2)
    error: type | None  # expected exception type; None for the CLI (exit status 2)
    match: tuple[str, ...]  # regexes the message must all contain


# --------------------------------------------------------------------------- helpers


def _idx(data: bytes):
    from metaprior.data.idx import parse_idx

    return parse_idx(data, source="t10k-images-idx3-ubyte")


def _batch(t=3, n=4, d=1, *, nan_y=False, inf_x=False, empty=False, y_shape=None, x_ndim=3):
    import jax.numpy as jnp

    from metaprior.data.tasks import TaskBatch

    x = np.linspace(-1, 1, t * n * d, dtype=np.float32).reshape(t, n, d)
    y = np.zeros((t, n), np.float32) if y_shape is None else np.zeros(y_shape, np.float32)
    mask = np.ones((t, n), bool)
    if nan_y:
        y[1, 2] = np.nan
    if inf_x:
        x[2, 0, 0] = np.inf
    if empty:
        mask[1] = False
    if x_ndim == 2:
        x = x[..., 0]
    return TaskBatch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))


def _task_latent(batch):
    import jax
    from numpyro import handlers

    from metaprior.models.task_latent import make_task_latent_net, task_latent_model

    net = make_task_latent_net(jax.random.key(0), 2, width=4)
    handlers.trace(handlers.seed(task_latent_model, jax.random.key(0))).get_trace(batch, net=net, latent_dim=2)


def _images(classes=3, per_class=4):
    return np.zeros((classes, per_class, 8, 8, 1), np.float32)


def _episodes(images, **kw):
    import jax

    from metaprior.data.episodes import sample_episodes

    args = dict(num_tasks=2, ways=2, shots=1, queries=1) | kw
    sample_episodes(jax.random.key(0), images, **args)


def _probs(probs, labels, **kw):
    from metaprior.inference.diagnostics import reliability_curve

    reliability_curve(np.asarray(probs), np.asarray(labels), **kw)


def _narrow_fit(**kw):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from metaprior.inference.guides import TaskNormalGuide
    from metaprior.inference.local import fit_local

    def model(y, subsample_size=None):
        with numpyro.plate("tasks", y.shape[0], subsample_size=subsample_size, dim=-1) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.1), obs=y[idx])

    y = jnp.zeros(3)
    guide = TaskNormalGuide.build(jax.random.key(0), model, y)
    return fit_local(jax.random.key(1), model, guide, y, **kw)


def _learner_state():
    import jax
    import optax

    from metaprior.inference.meta import meta_learner

    learner = meta_learner(lambda p, k, b: (p["w"] ** 2).sum(), optax.adam(1e-3))
    return learner.init({"w": jax.numpy.ones(3)})


def _checkpoint(tmp, content: bytes | None = None, *, state=None) -> Path:
    from metaprior.inference.meta import save_checkpoint

    path = tmp / "meta.ckpt"
    if content is not None:
        path.write_bytes(content)
    else:
        save_checkpoint(path, state if state is not None else _learner_state())
    return path


def _load_checkpoint(path, like=None):
    from metaprior.inference.meta import load_checkpoint

    load_checkpoint(path, like if like is not None else _learner_state())


def _foreign_version(tmp):
    buf = io.BytesIO()
    np.savez(buf, __format__=np.array("metaprior-checkpoint-v0"), leaf_0=np.ones(3))
    _load_checkpoint(_checkpoint(tmp, buf.getvalue()))


def _wrong_model(tmp):
    import jax.numpy as jnp
    import optax

    from metaprior.inference.meta import meta_learner

    other = meta_learner(lambda p, k, b: (p["w"] ** 2).sum(), optax.sgd(1e-3)).init({"w": jnp.ones(3)})
    _load_checkpoint(_checkpoint(tmp, state=other))


def _wrong_shape(tmp):
    import jax.numpy as jnp
    import optax

    from metaprior.inference.meta import meta_learner

    path = _checkpoint(tmp)
    bigger = meta_learner(lambda p, k, b: (p["w"] ** 2).sum(), optax.adam(1e-3)).init({"w": jnp.ones(5)})
    _load_checkpoint(path, bigger)


def _truncated_checkpoint(tmp):
    path = _checkpoint(tmp)
    data = path.read_bytes()
    _load_checkpoint(_checkpoint(tmp, data[: len(data) // 2]))


def _validate_case_checkpoint(tmp):
    import jax

    from metaprior.experiments.validate import finished_case, make_config

    (tmp / "case_linear.json").write_text('{"metrics": {"w1_linear_exact": 0.1')
    finished_case(tmp, "linear", jax.random.key(0), make_config("quick"))


def _dwp_other_kernel_size(tmp):
    import jax

    from metaprior.models.dwp import DeepWeightPrior, KernelVAE

    path = DeepWeightPrior([KernelVAE(3, 2, (8,), key=jax.random.key(0))]).save(tmp / "prior.npz")
    DeepWeightPrior.load(path).sample_kernels(jax.random.key(0), (4, 1, 5, 5), 0)


def _dwp_not_a_prior(tmp):
    from metaprior.models.dwp import DeepWeightPrior

    path = _checkpoint(tmp)  # a metaprior file, but a checkpoint
    DeepWeightPrior.load(path)


def _posterior_file(tmp, kind: str):
    import arviz as az

    from metaprior.inference.diagnostics import load_posterior, save_posterior

    tree = az.from_dict({"posterior": {"w": np.zeros((1, 4, 2))}})
    path = tmp / "posterior.nc"
    if kind == "foreign":  # ArviZ's own writer: a valid file, not ours
        tree.to_netcdf(path, engine="h5netcdf")
    elif kind == "truncated":
        save_posterior(tree, path)
        path.write_bytes(path.read_bytes()[:300])
    else:  # a checkpoint renamed .nc
        path = _checkpoint(tmp).rename(path)
    load_posterior(path)


def _gz(tmp, content: bytes, *, corrupt: bool = False) -> Path:
    import gzip

    folder = tmp / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    raw = gzip.compress(content)
    if corrupt:
        raw = raw[:-8] + b"\0" * 8  # CRC and length of the gzip trailer wrong
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(raw)
    return tmp


def _read_gz(tmp, **kw):
    from metaprior.data.store import read_gz_verified

    read_gz_verified("mnist/t10k-images-idx3-ubyte.gz", _gz(tmp, b"\0\0\x08\x01\0\0\0\x01\x07", **kw))


def _runs_zip(tmp, *, truncate=False, missing_image=False) -> Path:
    path = tmp / "all_runs.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("run01/class_labels.txt", "run01/test/item01.png run01/training/class01.png\n")
        if not missing_image:
            zf.writestr("run01/test/item01.png", b"")
        zf.writestr("run01/training/class01.png", b"")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2] if truncate else data)
    return path


def _oneshot(tmp, **kw):
    from metaprior.data.omniglot import load_oneshot_runs

    load_oneshot_runs(_runs_zip(tmp, **kw))


def _cli(tmp, *argv, out: str | None = "out"):
    """Run the CLI in process; return its status, and assert nothing was written."""
    from metaprior.cli import main

    args = list(argv) + (["--out", str(tmp / out)] if out else [])
    before = set(tmp.rglob("*"))
    status = main(args)
    if status != 2:
        raise AssertionError(f"metaprior {' '.join(args)} returned {status}, expected 2")
    after = set(tmp.rglob("*"))
    new = sorted(str(p.relative_to(tmp)) for p in after - before)
    if new:
        raise AssertionError(f"metaprior {' '.join(args)} left {new} behind")
    raise SystemExit(2)  # the table expects the CLI's exit status as SystemExit(2)


def _cli_out_is_file(tmp):
    (tmp / "out").write_text("not a folder")
    _cli(tmp, "run", "harmonic", "--quick")


def _cli_out_not_writable(tmp):
    import os

    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder is still writable")
        _cli(tmp, "run", "harmonic", "--quick", out="locked/run")
    finally:
        locked.chmod(0o700)


def _mask_none(tmp):
    from metaprior.data.tasks import check_task_batch

    check_task_batch(_batch()._replace(mask=None))


def _learned_prior_model(batch):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    mu = numpyro.param("mu", jnp.zeros(()))
    with numpyro.plate("tasks", batch.x.shape[0], dim=-2):
        w = numpyro.sample("w", dist.Normal(mu, 1.0))
        with numpyro.plate("examples", batch.x.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(w, 0.5).mask(batch.mask), obs=batch.y)


def _unbound_prior(tmp):
    import jax

    from metaprior.inference.guides import TaskNormalGuide
    from metaprior.inference.local import fit_local

    batch = _batch()
    guide = TaskNormalGuide.build(jax.random.key(0), _learned_prior_model, batch)
    fit_local(jax.random.key(1), _learned_prior_model, guide, batch, num_steps=2, num_restarts=1)


def _indefinite_hessian(tmp):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    from metaprior.inference import laplace as lp

    net = eqx.nn.MLP("scalar", "scalar", 8, 2, key=jax.random.key(0), activation=jnp.tanh)
    x = jnp.linspace(-2, 2, 20)
    lik = lambda f: dist.Normal(f, 0.1)
    lp.laplace(None, net, x, jnp.sin(3 * x), apply_fn=lp.vmap_apply, likelihood=lik, structure="full", fisher="hessian")


def _kfac_on_own_case(tmp):
    import jax
    from numpyro import handlers

    from metaprior.inference.validation import Case, ValidationSettings, fit_method

    batch = _batch()
    model = handlers.substitute(_learned_prior_model, data={"mu": 0.0})
    case = Case("mine", model, batch, batch, {}, ("laplace_kfac",), ("w",))
    fit_method(jax.random.key(0), case, "laplace_kfac", ValidationSettings(num_steps=2), {})


def _zero_budget(tmp):
    import jax
    import optax

    from metaprior.inference.meta import fit, meta_learner

    learner = meta_learner(lambda p, k, b: (p**2).sum(), optax.adam(1e-3))
    fit(jax.random.key(0), learner, np.ones(2, np.float32), 10, data=np.ones(2, np.float32), budget_s=0.0)


def _sib_adapt_without_queries(t):
    import jax
    import optax

    from metaprior.inference.sib import sib_method

    m = sib_method(8, num_steps=1, inner_optimizer=optax.sgd(0.1))
    m.adapt(jax.random.key(0), m.init(jax.random.key(1), 3), np.zeros((1, 3, 8), np.float32), np.zeros((1, 3), int), 3)


def _amortized_other_ways(t):
    import jax
    import optax

    from metaprior.inference.amortized_classifier import amortized_method

    kw = dict(beta=1e-3, inner_optimizer=optax.sgd(0.1), train_inner_steps=1, eval_inner_steps=1, num_samples=1)
    m = amortized_method(filters=2, image_size=28, hidden_size=4, noise_size=2, **kw)
    m.predictive(m.init(jax.random.key(0), 3), 5)


def _sib_without_feature_net(t):
    from metaprior.inference.fewshot import FewShotSettings, fewshot_method

    fewshot_method("sib_t3", FewShotSettings())


# --------------------------------------------------------------------------- the table

CASES = [
    # data loaders and files
    Case(
        "idx-bad-magic",
        "files",
        "IDX bytes with a bad magic number",
        lambda t: _idx(b"\x01\x02\x08\x01" + b"\0" * 8),
        ValueError,
        ("t10k-images-idx3-ubyte", "bad magic number 01020801"),
    ),
    Case(
        "idx-type-code",
        "files",
        "IDX header with an unknown type code",
        lambda t: _idx(b"\0\0\x05\x01\0\0\0\x01\x07"),
        ValueError,
        ("unknown IDX type code 0x05",),
    ),
    Case(
        "idx-truncated-header",
        "files",
        "IDX file cut inside its header",
        lambda t: _idx(b"\0\0\x08\x03\0\0"),
        ValueError,
        ("truncated IDX header",),
    ),
    Case(
        "idx-truncated-data",
        "files",
        "IDX file shorter than its header says",
        lambda t: _idx(b"\0\0\x08\x01\0\0\0\x05\x01\x02"),
        ValueError,
        (r"shape \(5,\)", "file has 10 bytes"),
    ),
    Case(
        "idx-missing",
        "files",
        "IDX file that does not exist",
        lambda t: __import__("metaprior.data.idx", fromlist=["x"]).load_idx(t / "a-idx3-ubyte", t / "b-idx1-ubyte"),
        FileNotFoundError,
        ("a-idx3-ubyte", "not found"),
    ),
    Case(
        "gz-bad-crc",
        "files",
        "data .gz whose CRC / length trailer is wrong",
        lambda t: _read_gz(t, corrupt=True),
        ValueError,
        ("t10k-images-idx3-ubyte.gz", "gzip"),
    ),
    Case(
        "gz-missing",
        "files",
        "data file absent from the data directory",
        lambda t: __import__("metaprior.data.store", fromlist=["x"]).read_gz_verified(
            "mnist/t10k-images-idx3-ubyte.gz", t
        ),
        FileNotFoundError,
        ("t10k-images-idx3-ubyte.gz",),
    ),
    Case(
        "runs-zip-truncated",
        "files",
        "one-shot runs zip cut in half",
        lambda t: _oneshot(t, truncate=True),
        ValueError,
        ("all_runs.zip", "corrupt"),
    ),
    Case(
        "runs-missing-image",
        "files",
        "one-shot runs whose labels name a missing image",
        lambda t: _oneshot(t, missing_image=True),
        ValueError,
        ("run01", "missing images", "item01.png"),
    ),
    Case(
        "runs-absent",
        "files",
        "one-shot runs path that does not exist",
        lambda t: __import__("metaprior.data.omniglot", fromlist=["x"]).load_oneshot_runs(t / "nope.zip"),
        FileNotFoundError,
        ("nope.zip", "brendenlake/omniglot"),
    ),
    Case(
        "validate-case-ckpt-corrupt",
        "files",
        "validate's per-case checkpoint cut in half",
        _validate_case_checkpoint,
        ValueError,
        ("case_linear.json", "not a readable case checkpoint", "delete it"),
    ),
    Case(
        "ckpt-missing",
        "files",
        "checkpoint path that does not exist",
        lambda t: _load_checkpoint(t / "none.ckpt"),
        FileNotFoundError,
        ("none.ckpt", "does not exist"),
    ),
    Case(
        "ckpt-truncated",
        "files",
        "checkpoint cut in half",
        _truncated_checkpoint,
        ValueError,
        ("meta.ckpt", "unreadable or corrupt", "delete it"),
    ),
    Case(
        "ckpt-random-bytes",
        "files",
        "checkpoint of random bytes",
        lambda t: _load_checkpoint(_checkpoint(t, np.random.default_rng(0).bytes(300))),
        ValueError,
        ("meta.ckpt", "unreadable or corrupt"),
    ),
    Case(
        "ckpt-foreign-version",
        "files",
        "checkpoint of another format version",
        _foreign_version,
        ValueError,
        ("meta.ckpt", "not a metaprior-checkpoint-v1 file"),
    ),
    Case(
        "ckpt-wrong-model",
        "files",
        "checkpoint of another optimizer / model",
        _wrong_model,
        ValueError,
        ("meta.ckpt", "different state structure"),
    ),
    Case(
        "ckpt-wrong-shape",
        "files",
        "checkpoint whose leaves have other shapes",
        _wrong_shape,
        ValueError,
        ("meta.ckpt", r"leaf \d+ is \(3,\)", r"expects \(5,\)"),
    ),
    Case(
        "dwp-kernel-size",
        "files",
        "saved deep weight prior for another kernel size",
        _dwp_other_kernel_size,
        ValueError,
        ("3x3", "asked for 5x5"),
    ),
    Case(
        "dwp-not-a-prior",
        "files",
        "a checkpoint loaded as a deep weight prior",
        _dwp_not_a_prior,
        ValueError,
        ("meta.ckpt", "not a metaprior-deep-weight-prior-v1 file"),
    ),
    Case(
        "posterior-foreign",
        "files",
        "an ArviZ file that is not ours (no metaprior_format tag)",
        lambda t: _posterior_file(t, "foreign"),
        ValueError,
        ("posterior.nc", "not a metaprior posterior", "metaprior_format=None"),
    ),
    Case(
        "posterior-truncated",
        "files",
        "a truncated posterior file",
        lambda t: _posterior_file(t, "truncated"),
        ValueError,
        ("posterior.nc", "unreadable or not netCDF", "truncated"),
    ),
    Case(
        "posterior-not-netcdf",
        "files",
        "a checkpoint opened as a posterior file",
        lambda t: _posterior_file(t, "checkpoint"),
        ValueError,
        ("posterior.nc", "unreadable or not netCDF"),
    ),
    # task batches and models
    Case(
        "batch-nan-y",
        "model",
        "NaN in a task batch's y",
        lambda t: _task_latent(_batch(nan_y=True)),
        ValueError,
        (r"batch\.y", "NaN", "task 1, example 2"),
    ),
    Case(
        "batch-inf-x",
        "model",
        "inf in a task batch's x",
        lambda t: _task_latent(_batch(inf_x=True)),
        ValueError,
        (r"batch\.x", "infinite", "task 2, example 0", "inf"),
    ),
    Case(
        "batch-empty-support",
        "model",
        "a task whose support set is empty (mask all False)",
        lambda t: _task_latent(_batch(empty=True)),
        ValueError,
        ("empty support set", r"\[1\]"),
    ),
    Case(
        "batch-y-shape",
        "model",
        "y of the wrong shape",
        lambda t: _task_latent(_batch(y_shape=(3, 5))),
        ValueError,
        (r"batch\.y", r"\(3, 4\)", r"\(3, 5\)"),
    ),
    Case(
        "batch-x-ndim",
        "model",
        "x without a features axis",
        lambda t: _task_latent(_batch(x_ndim=2)),
        ValueError,
        (r"batch\.x", r"\[tasks, examples, features\]", r"\(3, 4\)"),
    ),
    Case(
        "latent-dim",
        "model",
        "latent_dim = 0",
        lambda t: __import__("metaprior.models.task_latent", fromlist=["x"]).make_task_latent_net(
            __import__("jax").random.key(0), 0
        ),
        ValueError,
        ("latent_dim", "got 0"),
    ),
    Case(
        "net-arch",
        "model",
        "unknown net architecture",
        lambda t: __import__("metaprior.models.task_latent", fromlist=["x"]).make_task_latent_net(
            __import__("jax").random.key(0), 2, arch="mlp"
        ),
        ValueError,
        ("arch", "'mlp'"),
    ),
    Case(
        "conv-impl",
        "model",
        "unknown conv_impl for Conv4",
        lambda t: __import__("metaprior.models.nets", fromlist=["x"]).Conv4(
            5, conv_impl="fft", key=__import__("jax").random.key(0)
        ),
        ValueError,
        ("conv_impl", "'fft'"),
    ),
    Case(
        "conv4-image-size",
        "model",
        "Conv4 on images too small for its pooling",
        lambda t: __import__("metaprior.models.nets", fromlist=["x"]).Conv4(
            5, image_size=8, key=__import__("jax").random.key(0)
        ),
        ValueError,
        ("image_size=8", "4 pooling"),
    ),
    Case(
        "conv4-rank",
        "model",
        "Conv4 called on one image [H, W, C]",
        lambda t: __import__("metaprior.models.nets", fromlist=["x"]).Conv4(5, key=__import__("jax").random.key(0))(
            np.zeros((28, 28, 1), np.float32)
        ),
        ValueError,
        (r"\[N, H, W, C\]", r"\(28, 28, 1\)"),
    ),
    # episodes
    Case(
        "episodes-ways",
        "data",
        "more ways than classes",
        lambda t: _episodes(_images(3), ways=5),
        ValueError,
        ("5-way", "data has 3"),
    ),
    Case(
        "episodes-shots-queries",
        "data",
        "shots + queries more than the images per class",
        lambda t: _episodes(_images(3, 4), shots=3, queries=2),
        ValueError,
        ("3 \\+ 2 = 5",),
    ),
    Case("episodes-zero-ways", "data", "ways = 0", lambda t: _episodes(_images(), ways=0), ValueError, ("ways >= 1",)),
    Case(
        "episodes-float-count",
        "data",
        "a float number of tasks",
        lambda t: _episodes(_images(), num_tasks=2.0),
        TypeError,
        ("num_tasks", "float"),
    ),
    Case(
        "episodes-rank",
        "data",
        "images without a class axis",
        lambda t: _episodes(np.zeros((12,), np.float32)),
        ValueError,
        (r"\[classes, examples, \.\.\.\]", r"\(12,\)"),
    ),
    # diagnostics
    Case(
        "probs-nan",
        "diagnostics",
        "NaN in predicted probabilities",
        lambda t: _probs([[0.5, np.nan]], [0]),
        ValueError,
        ("probs", "NaN"),
    ),
    Case(
        "labels-range",
        "diagnostics",
        "labels out of range",
        lambda t: _probs([[0.5, 0.5]], [2]),
        ValueError,
        ("labels", r"\[0, 2\)", r"\[2, 2\]"),
    ),
    Case(
        "probs-shape",
        "diagnostics",
        "probabilities without a class axis",
        lambda t: _probs([0.5, 0.5], [0, 1]),
        ValueError,
        ("probs", r"\[N, K\]", r"\(2,\)"),
    ),
    Case(
        "probs-empty",
        "diagnostics",
        "no predictions at all",
        lambda t: _probs(np.zeros((0, 2)), np.zeros(0, int)),
        ValueError,
        ("probs is empty",),
    ),
    Case(
        "bins",
        "diagnostics",
        "num_bins = 0",
        lambda t: _probs([[0.5, 0.5]], [0], num_bins=0),
        ValueError,
        ("num_bins", "got 0"),
    ),
    # inference
    Case(
        "fit-local-steps",
        "inference",
        "fit_local with num_steps = 0",
        lambda t: _narrow_fit(num_steps=0),
        ValueError,
        ("num_steps", "got 0"),
    ),
    Case(
        "fit-local-candidates",
        "inference",
        "fewer candidates than restarts",
        lambda t: _narrow_fit(num_restarts=4, num_candidates=2),
        ValueError,
        ("num_candidates", "num_restarts=4", "got 2"),
    ),
    Case(
        "fit-local-subsample",
        "inference",
        "fit_local with a subsample size",
        lambda t: _narrow_fit(model_kwargs={"subsample_size": 2}),
        ValueError,
        ("subsample_size",),
    ),
    Case(
        "elbo-particles",
        "inference",
        "num_particles = 0",
        lambda t: __import__("metaprior.inference.svi", fromlist=["x"]).elbo_loss(
            lambda: None, lambda: None, num_particles=0
        ),
        ValueError,
        ("num_particles", "got 0"),
    ),
    Case(
        "fit-steps",
        "inference",
        "meta-training for -1 steps",
        lambda t: __import__("metaprior.inference.meta", fromlist=["x"]).fit(
            __import__("jax").random.key(0),
            __import__("metaprior.inference.meta", fromlist=["x"]).meta_learner(
                lambda p, k, b: (p**2).sum(), __import__("optax").adam(1e-3)
            ),
            np.ones(2, np.float32),
            -1,
            data=np.ones(2, np.float32),
        ),
        ValueError,
        ("num_steps", "-1"),
    ),
    # the CLI
    Case(
        "cli-unknown-experiment",
        "cli",
        "`metaprior run` of an unknown experiment",
        lambda t: _cli(t, "run", "harmonc"),
        None,
        ("unknown experiment 'harmonc'", "known: .*harmonic"),
    ),
    Case(
        "cli-unknown-field",
        "cli",
        "`--set` of a field the experiment does not have",
        lambda t: _cli(t, "run", "harmonic", "--quick", "--set", "num_taks=3"),
        None,
        ("--set num_taks", "no config field 'num_taks'", "fields: .*num_tasks"),
    ),
    Case(
        "cli-wrong-type",
        "cli",
        "`--set` value of the wrong type",
        lambda t: _cli(t, "run", "harmonic", "--quick", "--set", "num_tasks=many"),
        None,
        ("--set num_tasks=many", "invalid literal"),
    ),
    Case(
        "cli-bad-bool",
        "cli",
        "`--set` of a boolean with a non-boolean value",
        lambda t: _cli(t, "run", "omniglot-maml", "--quick", "--set", "first_order=maybe"),
        None,
        ("--set first_order=maybe", "expected a boolean"),
    ),
    Case(
        "cli-zero-count",
        "cli",
        "`--set` of a count to 0",
        lambda t: _cli(t, "run", "harmonic", "--quick", "--set", "num_tasks=0"),
        None,
        ("num_tasks=0", "count and must be >= 1"),
    ),
    Case(
        "cli-negative-steps",
        "cli",
        "`--steps -5`",
        lambda t: _cli(t, "run", "harmonic", "--quick", "--steps", "-5"),
        None,
        ("--steps must be >= 1", "-5"),
    ),
    Case("cli-out-is-file", "cli", "`--out` that is a file", _cli_out_is_file, None, ("--out .*out", "not a folder")),
    Case(
        "cli-out-not-writable",
        "cli",
        "`--out` inside a read-only folder",
        _cli_out_not_writable,
        None,
        ("--out .*locked", "not writable"),
    ),
    Case(
        "task-batch-mask-none",
        "data",
        "`TaskBatch(x, y, mask=None)`",
        _mask_none,
        ValueError,
        ("batch.mask is None", "boolean"),
    ),
    Case(
        "fit-local-unbound-prior",
        "inference",
        "`fit_local` on a model whose learned `param` prior is not bound",
        _unbound_prior,
        ValueError,
        (r"\['mu'\]", "not bound", "params="),
    ),
    Case(
        "laplace-indefinite-hessian",
        "inference",
        "`laplace(fisher='hessian')` away from a minimum",
        _indefinite_hessian,
        __import__("equinox").EquinoxRuntimeError,
        ("not positive definite", "fisher='exact'"),
    ),
    Case(
        "validate-kfac-own-case",
        "inference",
        "`laplace_kfac` on a user's `Case` without a `laplace=` function",
        _kfac_on_own_case,
        ValueError,
        ("'mine'", "laplace_kfac needs a network"),
    ),
    Case(
        "sib-adapt-no-queries",
        "inference",
        "SIB's posterior asked for without the task's query inputs (it is transductive)",
        _sib_adapt_without_queries,
        ValueError,
        ("transductive", "query_x"),
    ),
    Case(
        "amortized-other-ways",
        "inference",
        "a 3-way amortized guide asked for a 5-way predictive",
        _amortized_other_ways,
        ValueError,
        ("built for 3-way", "ways=5"),
    ),
    Case(
        "fewshot-sib-no-features",
        "inference",
        "SIB's few-shot Method without the pretrained feature net it works on",
        _sib_without_feature_net,
        ValueError,
        ("sib_t3", "feature_net"),
    ),
    Case(
        "fit-zero-budget",
        "inference",
        "meta-training with a time budget of 0 s",
        _zero_budget,
        ValueError,
        ("budget_s must be a positive number", "got 0.0"),
    ),
    Case(
        "cli-bad-choice",
        "cli",
        "`--set net=flim` (not one of the choices)",
        lambda t: _cli(t, "run", "harmonic", "--quick", "--set", "net=flim"),
        None,
        ("config.net must be one of", "'flim'"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error(case, tmp_path, capsys):
    expected = SystemExit if case.error is None else case.error
    with pytest.raises(expected) as info:
        case.call(tmp_path)
    message = capsys.readouterr().err if case.error is None else str(info.value)
    for pattern in case.match:
        assert re.search(pattern, message), f"{case.id}: {pattern!r} not in {message!r}"


def test_the_table_has_at_least_30_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


def render_doc() -> str:
    lines = [
        "# Bad inputs and the errors they get",
        "",
        "Generated from `tests/test_bad_inputs.py` (`python tests/test_bad_inputs.py`); every row is a",
        "test that asserts the exception type and that the message contains the patterns shown.",
        f"CLI rows exit with status 2 and leave nothing in `--out`. {len(CASES)} cases.",
        "",
        "| # | layer | bad input | error | message contains |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, c in enumerate(CASES, 1):
        err = "exit status 2 (stderr)" if c.error is None else f"`{c.error.__name__}`"
        pats = "; ".join(f"`{p}`" for p in c.match).replace("|", "\\|")
        lines.append(f"| {i} | {c.layer} | {c.what} | {err} | {pats} |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_up_to_date():
    assert DOC.exists() and DOC.read_text() == render_doc(), (
        "docs/bad_inputs.md is out of date: run `python tests/test_bad_inputs.py`"
    )


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render_doc())
    print(f"wrote {DOC} ({len(CASES)} cases)", file=sys.stderr)
