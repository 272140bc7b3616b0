"""The meta-training loop: determinism, resume, checkpoints, NaN handling, tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaprior.inference.meta import (
    NonFiniteLossError,
    fit,
    load_checkpoint,
    meta_learner,
    save_checkpoint,
)


def noisy_quadratic(params, rng_key, batch):
    noise = 0.1 * jax.random.normal(rng_key, params["w"].shape)
    return jnp.sum((params["w"] - batch + noise) ** 2)


def sample_batch(rng_key, data):
    return data + 0.01 * jax.random.normal(rng_key, data.shape)


@pytest.fixture
def learner():
    return meta_learner(noisy_quadratic, optax.adam(0.05))


def run(learner, steps, **kw):
    return fit(
        jax.random.key(3),
        learner,
        {"w": jnp.zeros(4)},
        steps,
        data=jnp.arange(4.0),
        sample_batch=sample_batch,
        progress=False,
        **kw,
    )


def test_fits_and_is_deterministic(learner):
    a, b = run(learner, 300), run(learner, 300)
    np.testing.assert_array_equal(a.state.params["w"], b.state.params["w"])
    np.testing.assert_allclose(a.state.params["w"], np.arange(4.0), atol=0.1)  # noise 0.1 per step
    assert a.losses.shape == (300,) and int(a.state.step) == 300


def test_steps_per_call_does_not_change_the_result(learner):
    # keys are a function of the step index, so fusing steps is the same computation
    a, b = run(learner, 30), run(learner, 30, steps_per_call=7)
    np.testing.assert_allclose(a.state.params["w"], b.state.params["w"], rtol=1e-6)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)


def test_resume_gives_same_parameters(learner, tmp_path):
    ckpt = tmp_path / "ckpt.npz"
    straight = run(learner, 40)
    first = run(learner, 25, checkpoint=ckpt, checkpoint_every=10)
    assert int(first.state.step) == 25
    resumed = run(learner, 40, checkpoint=ckpt, checkpoint_every=10)
    np.testing.assert_array_equal(resumed.state.params["w"], straight.state.params["w"])
    np.testing.assert_array_equal(resumed.losses, straight.losses)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temp files left behind


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def loss(params, rng_key, batch):
        # gradient -1: w grows by 0.05 a step and the loss turns NaN once w[0] > 0.5
        return jnp.where(params["w"][0] > 0.5, jnp.nan, -jnp.sum(params["w"]))

    def batch_fn(rng_key, data):
        return data

    learner = meta_learner(loss, optax.sgd(0.05))
    ckpt = tmp_path / "ckpt.npz"
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step \d+.*last good checkpoint"):
        fit(
            jax.random.key(0),
            learner,
            {"w": jnp.zeros(2)},
            100,
            data=jnp.zeros(()),
            sample_batch=batch_fn,
            checkpoint=ckpt,
            checkpoint_every=2,
            progress=False,
        )
    state, losses = load_checkpoint(ckpt, like=learner.init({"w": jnp.zeros(2)}))
    assert np.all(np.isfinite(losses)) and float(state.params["w"][0]) <= 0.5 + 0.05
    assert int(state.step) == len(losses) > 0


def test_step_traces_once(tmp_path):
    traces = []

    def loss(params, rng_key, batch):
        traces.append(1)  # runs only while tracing
        return jnp.sum((params - batch) ** 2)

    fit(
        jax.random.key(0),
        meta_learner(loss, optax.sgd(0.1)),
        jnp.zeros(3),
        25,
        data=jnp.ones(3),
        steps_per_call=5,
        progress=False,
    )
    assert len(traces) == 1


def test_checkpoint_errors(learner, tmp_path):
    state = learner.init({"w": jnp.zeros(4)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz", like=state)
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_checkpoint(bad, like=state)
    good = tmp_path / "good.npz"
    save_checkpoint(good, state)
    with pytest.raises(ValueError, match="leaf .* expects"):
        load_checkpoint(good, like=learner.init({"w": jnp.zeros(5)}))
    with pytest.raises(ValueError, match="different state structure"):
        load_checkpoint(good, like=learner.init({"v": jnp.zeros(4), "w": jnp.zeros(4)}))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=-1), "num_steps"),
        (dict(steps_per_call=0), "steps_per_call"),
        (dict(budget_s=0.0), "budget_s"),
        (dict(budget_s=float("nan")), "budget_s"),
    ],
)
def test_bad_arguments(learner, kwargs, match):
    args = dict(num_steps=3) | kwargs
    with pytest.raises(ValueError, match=match):
        fit(
            jax.random.key(0),
            learner,
            {"w": jnp.zeros(4)},
            args.pop("num_steps"),
            data=jnp.zeros(4),
            progress=False,
            **args,
        )


_ORDERED_LOSS = """
import sys, numpy as np, jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
from numpyro.infer.autoguide import AutoNormal
from metaprior.inference.svi import OrderedTrace_ELBO

def model():
    for i in range(12):  # many sites, names that hash differently from run to run
        numpyro.sample(f"site_{i}_{'abc' * i}", dist.Normal(0.1 * i, 1.0 + 0.1 * i), obs=0.37 * i)
    numpyro.sample("z", dist.Normal(0.0, 1.0))

guide = AutoNormal(model)
params = {"z_auto_loc": jnp.array(0.3), "z_auto_scale": jnp.array(0.7)}
loss = OrderedTrace_ELBO().loss(jax.random.key(0), params, model, guide)
print(np.asarray(loss, np.float32).view(np.int32))
"""


def test_ordered_trace_elbo_is_the_same_bits_under_any_hash_seed():
    """NumPyro's Trace_ELBO sums its site terms in set order, which depends on
    PYTHONHASHSEED; OrderedTrace_ELBO sums them in sorted order, so two processes with
    different hash seeds get the same float32 bits (what makes a killed-and-resumed run's
    loss history equal an uninterrupted one's)."""
    import os
    import subprocess
    import sys

    out = {
        seed: subprocess.run(
            [sys.executable, "-c", _ORDERED_LOSS],
            env=dict(os.environ, PYTHONHASHSEED=seed),
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(set(out.values())) == 1, out


def test_ordered_trace_elbo_equals_trace_elbo():
    """Same estimator: the value agrees with NumPyro's Trace_ELBO to float32 round-off."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    from metaprior.inference.svi import OrderedTrace_ELBO

    def model():
        numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("b", dist.Normal(1.0, 2.0), obs=0.5)

    guide = AutoNormal(model)
    params = {"a_auto_loc": jnp.array(0.3), "a_auto_scale": jnp.array(0.7)}
    Trace_ELBO().loss(jax.random.key(9), params, model, guide)  # AutoNormal's lazy set-up draws on the first call
    a = OrderedTrace_ELBO(num_particles=4).loss(jax.random.key(0), params, model, guide)
    b = Trace_ELBO(num_particles=4).loss(jax.random.key(0), params, model, guide)
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.fixture
def fake_clock(monkeypatch):
    """Every compiled call of ``fit`` takes exactly one second of the training clock: a
    budget then ends at a known step, whatever the machine's speed."""
    from metaprior.inference import meta

    ticks = iter(range(10**6))
    monkeypatch.setattr(meta, "_clock", lambda: float(next(ticks)))  # tic, toc: one second apart
    return meta


def test_budget_stops_a_run_and_a_rerun_keeps_its_result(learner, tmp_path, fake_clock):
    """``budget_s = 5.5`` with 3 steps per call of one second each: the run stops after the
    sixth call (18 steps, 6 s) although ``num_steps`` is 100; the checkpoint says the
    budget is spent, so the same command again trains no further; an uninterrupted run
    of 18 steps and no budget has the same parameters, bit for bit."""
    ckpt = tmp_path / "ckpt.npz"
    kw = dict(steps_per_call=3, checkpoint=ckpt, checkpoint_every=6, budget_s=5.5)
    timed = run(learner, 100, **kw)
    assert int(timed.state.step) == 18 and timed.budget_spent and timed.train_time_s == 6.0
    assert fake_clock.load_clock(ckpt) == fake_clock.TrainingClock(6.0, True)
    again = run(learner, 100, **kw)
    assert int(again.state.step) == 18 and again.budget_spent
    np.testing.assert_array_equal(again.state.params["w"], timed.state.params["w"])
    straight = run(learner, 18, steps_per_call=3)
    np.testing.assert_array_equal(straight.state.params["w"], timed.state.params["w"])
    np.testing.assert_array_equal(straight.losses, timed.losses)
    assert not straight.budget_spent


def test_budget_a_killed_run_resumes_with_the_time_it_had_spent(learner, tmp_path, fake_clock, monkeypatch):
    """A NaN at step 13 stops the run after its checkpoint at step 12 (4 calls, 4 s); the
    rerun starts from there with 4 s spent and stops at the budget, after 2 more calls
    (18 steps): the uninterrupted budget-limited result."""
    ckpt = tmp_path / "ckpt.npz"
    kw = dict(steps_per_call=3, checkpoint=ckpt, checkpoint_every=3, budget_s=5.5)
    monkeypatch.setenv("METAPRIOR_TEST_NAN_AT_STEP", "13")
    with pytest.raises(NonFiniteLossError):
        run(learner, 100, **kw)
    assert int(load_checkpoint(ckpt, like=learner.init({"w": jnp.zeros(4)}))[0].step) == 12
    assert fake_clock.load_clock(ckpt) == fake_clock.TrainingClock(4.0, False)
    monkeypatch.delenv("METAPRIOR_TEST_NAN_AT_STEP")
    resumed = run(learner, 100, **kw)
    assert int(resumed.state.step) == 18 and resumed.budget_spent and resumed.train_time_s == 6.0
    straight = run(learner, 18, steps_per_call=3)
    np.testing.assert_array_equal(resumed.state.params["w"], straight.state.params["w"])
    np.testing.assert_array_equal(resumed.losses, straight.losses)


def test_a_budget_that_outlasts_num_steps_changes_nothing(learner):
    a, b = run(learner, 30), run(learner, 30, budget_s=1e6)
    np.testing.assert_array_equal(a.state.params["w"], b.state.params["w"])
    assert not b.budget_spent and b.train_time_s > 0


def test_callback_sees_every_call_and_the_snapshots_are_the_shorter_runs(learner, fake_clock):
    """``callback(state, seconds)`` runs before the first step and after each compiled call
    (3 steps, one fake second each); the state it sees after call ``i`` is, bit for bit,
    that of a run of ``3 i`` steps, and the few-shot snapshot recorder keeps evenly spaced
    ones of those (budget 6 s, 3 points: 0, 2, 4 and 6 s)."""
    from metaprior.inference.fewshot import _Snapshots

    seen = []
    snaps = _Snapshots(3, 100, 6.0)
    both = lambda state, seconds: (seen.append((int(state.step), seconds, state.params["w"])), snaps(state, seconds))
    timed = run(learner, 100, steps_per_call=3, budget_s=5.5, callback=both)
    assert [(s, t) for s, t, _ in seen] == [(3 * i, float(i)) for i in range(7)]
    for step, _, w in seen[1:4]:
        np.testing.assert_array_equal(w, run(learner, step, steps_per_call=3).state.params["w"])
    assert [t for t, _ in snaps.curve()] == [0.0, 2.0, 4.0, 6.0]
    np.testing.assert_array_equal(snaps.curve()[-1][1]["w"], timed.state.params["w"])
