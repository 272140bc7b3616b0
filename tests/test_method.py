"""The few-shot ``Method`` contract (metaprior.inference.method), one table of methods.

Every method through the same protocol: a finite loss on a fixed batch of episodes; loss
and gradient equal, bit for bit, to the objective the library built before the interface
existed (``ml_point``, ``kfac_llama``, ``protonet_loss`` called directly); ``adapt`` with a
leading tasks axis; predictive rows that are distributions over the ways, one per variant.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

from metaprior.data.episodes import sample_episodes
from metaprior.inference import maml
from metaprior.inference.fewshot import FewShotSettings, _likelihood, _nll, fewshot_method
from metaprior.inference.protonet import protonet_loss

SETTINGS = FewShotSettings(filters=2, ways=3, train_queries=2, meta_batch=2, log_det_tasks=1, num_samples=2)


def _reference(name: str, s: FewShotSettings):
    """The objective as the few-shot trainer built it before the Method interface."""
    inner = (_nll(), optax.sgd(s.inner_lr), s.train_inner_steps)
    if name == "llama":
        kw = dict(eta=s.eta, log_det_tasks=s.log_det_tasks, apply_fn=lambda n, x: n(x), likelihood=_likelihood)
        return maml.kfac_llama(*inner, prior_precision=s.tau, **kw)
    if name == "protonet":
        base = protonet_loss(s.ways)
        return lambda p, k, b: (base(p, k, b), None)
    return maml.ml_point(*inner, first_order=name == "maml_fo")


@pytest.fixture(scope="module")
def episodes():
    images = jax.random.uniform(jax.random.key(0), (6, 4, 28, 28, 1))
    return sample_episodes(jax.random.key(1), images, 2, SETTINGS.ways, 1, 2)


@pytest.mark.parametrize("name", ["maml", "maml_fo", "llama", "protonet"])
def test_method_contract(name, episodes):
    m = fewshot_method(name, SETTINGS)
    assert m.name == name and len(m.variants) == (2 if name == "llama" else 1)
    params = m.init(jax.random.key(2), SETTINGS.ways)
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    value = lambda fn: jax.value_and_grad(lambda d: fn(eqx.combine(d, static), jax.random.key(3), episodes)[0])(diff)
    loss, grad = value(m.loss)
    ref_loss, ref_grad = value(_reference(name, SETTINGS))
    assert np.isfinite(float(loss))
    np.testing.assert_array_equal(loss, ref_loss)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_array_equal(a, b)
    adapted = m.adapt(jax.random.key(4), params, episodes.support_x, episodes.support_y, SETTINGS.ways)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(eqx.filter(adapted, eqx.is_array)))
    options = dict(tau_pred=1e3, num_samples=2) if name == "llama" else {}
    probs = m.predictive(params, SETTINGS.ways, **options)(
        jax.random.key(5), episodes.support_x, episodes.support_y, episodes.query_x
    )
    assert probs.shape == (len(m.variants), 2, episodes.query_x.shape[1], SETTINGS.ways)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_llama_predictive_types_with_their_own_precisions_are_the_single_type_rows(episodes):
    """Two ``tau_pred`` (one per type) give the rows of each type's own predictive; one
    ``tau_pred`` gives both types from one posterior, the same numbers."""
    m = fewshot_method("llama", SETTINGS)
    params = m.init(jax.random.key(2), SETTINGS.ways)
    args = (jax.random.key(5), episodes.support_x, episodes.support_y, episodes.query_x)
    split = m.predictive(params, SETTINGS.ways, tau_pred=(1e2, 1e4), num_samples=2)(*args)
    nn = m.predictive(params, SETTINGS.ways, tau_pred=1e2, num_samples=2)(*args)[0]
    glm = m.predictive(params, SETTINGS.ways, tau_pred=1e4, num_samples=2)(*args)[1]
    np.testing.assert_allclose(split[0], nn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split[1], glm, rtol=1e-5, atol=1e-6)


def test_method_from_names_and_errors():
    s = dataclasses.replace(SETTINGS)
    assert fewshot_method("maml_fo", s).variants == ("maml_fo",)
    with pytest.raises(ValueError, match="'maml', 'maml_fo' or 'llama'"):
        maml.method_from("reptile", _nll(), optax.sgd(0.1), init=None, apply_fn=None)
    with pytest.raises(TypeError, match="no options"):
        fewshot_method("maml", s).predictive(None, 3, tau_pred=1.0)
