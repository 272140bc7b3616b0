"""The few-shot ``Method`` contract (metaprior.inference.method), one table of methods.

Every method through the same protocol: a finite loss and gradient on a fixed batch of
episodes; the loss and gradient the same program (equal jaxprs, hence equal bits) as the
objective the library built before the interface existed (``ml_point``, ``kfac_llama``,
``protonet_loss``, ``amortized_meta_loss`` and ``sib_loss`` called directly); ``adapt``
with a leading tasks axis; predictive rows that are distributions over the ways, one per
variant.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

from metaprior.data.episodes import Episodes, sample_episodes
from metaprior.inference import maml
from metaprior.inference.amortized_classifier import conv4_inference, init_conv4_guide
from metaprior.inference.fewshot import FewShotSettings, _conv4, _embed_episodes, _likelihood, _nll, fewshot_method
from metaprior.inference.guides.amortized import amortized_meta_loss
from metaprior.inference.protonet import protonet_loss
from metaprior.inference.sib import sib_loss

SETTINGS = FewShotSettings(
    filters=2,
    ways=3,
    train_queries=2,
    meta_batch=2,
    log_det_tasks=1,
    num_samples=2,
    amortized_hidden=8,
    amortized_noise=4,
    eval_inner_steps=1,
    sib_steps=2,
)
FEATURES = _conv4(jax.random.key(7), SETTINGS, 6)  # an untrained stand-in for SIB's pretrained net


def _reference(name: str, s: FewShotSettings):
    """The objective as the few-shot trainer built it before the Method interface."""
    if name == "amortized":
        net = init_conv4_guide(jax.random.key(0), s.ways, filters=s.filters, image_size=s.image_size)[1]
        spec = conv4_inference(net, beta=s.amortized_beta, inner_optimizer=optax.sgd(s.inner_lr), num_inner_steps=1)
        return amortized_meta_loss(spec, task_batch_size=1)
    if name.startswith("sib"):
        steps = 0 if name == "sib_t0" else s.sib_steps

        def loss(p, key, ep):
            embed = lambda x: _embed_episodes(FEATURES, x)
            feats = Episodes(embed(ep.support_x), ep.support_y, embed(ep.query_x), ep.query_y)
            return sib_loss(
                p, key, feats, num_ways=s.ways, num_steps=steps, inner_optimizer=optax.sgd(s.sib_inner_lr)
            ), None

        return loss
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


@pytest.mark.parametrize("name", ["maml", "maml_fo", "llama", "protonet", "amortized", "sib_t0", "sib_t3"])
def test_method_contract(name, episodes):
    m = fewshot_method(name, SETTINGS, feature_net=FEATURES if name.startswith("sib") else None)
    assert m.name == name and len(m.variants) == (2 if name == "llama" else 1)
    params = m.init(jax.random.key(2), SETTINGS.ways)
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    objective = lambda fn: jax.value_and_grad(lambda d: fn(eqx.combine(d, static), jax.random.key(3), episodes)[0])
    # the same program as the objective built directly: equal jaxprs, so the loss and gradient
    # are equal bit for bit (and one compile instead of two)
    assert str(jax.make_jaxpr(objective(m.loss))(diff)) == str(
        jax.make_jaxpr(objective(_reference(name, SETTINGS)))(diff)
    )
    loss, grad = jax.jit(objective(m.loss))(diff)
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
    support = (episodes.support_x, episodes.support_y, SETTINGS.ways)
    adapted = eqx.filter_jit(m.adapt)(jax.random.key(4), params, *support, query_x=episodes.query_x)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(eqx.filter(adapted, eqx.is_array)))
    options = {"llama": dict(tau_pred=1e3, num_samples=2), "maml": {}, "maml_fo": {}, "protonet": {}}.get(
        name, dict(num_samples=2)
    )
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


@pytest.mark.parametrize("name", ["amortized", "sib_t3"])
def test_methods_built_for_their_ways_refuse_others(name, episodes):
    """The LSTM guide's class encoding and SIB's xi are sized by the training ways; SIB's
    posterior reads the query inputs (transductive) and says so when they are missing."""
    m = fewshot_method(name, SETTINGS, feature_net=FEATURES)
    params = m.init(jax.random.key(2), SETTINGS.ways)
    with pytest.raises(ValueError, match="built for 3-way"):
        m.predictive(params, 5)
    if name == "sib_t3":
        with pytest.raises(ValueError, match="transductive"):
            m.adapt(jax.random.key(0), params, episodes.support_x, episodes.support_y, 3)
    with pytest.raises(TypeError, match="num_samples only"):
        m.predictive(params, 3, tau_pred=1.0)
