"""Prototypical networks: prototypes and logits against hand computations, the symmetries
of the predictive (class relabelling, support order), meta-training on a synthetic task
family, and the errors bad inputs raise."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaprior.data.episodes import Episodes, sample_episodes
from metaprior.inference.evaluation import evaluate_fewshot
from metaprior.inference.meta import fit, meta_learner
from metaprior.inference.protonet import protonet_logits, protonet_loss, protonet_predictive, prototypes
from metaprior.models.nets import Conv4

SIZE, BLOCKS = 8, 3  # 8x8 images through three conv blocks: 8 -> 4 -> 2 -> 1


def _flatten(x):
    return x.reshape(x.shape[0], -1)


def _conv(seed=0):
    return Conv4(None, filters=4, image_size=SIZE, num_blocks=BLOCKS, key=jax.random.key(seed))


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(*shape, SIZE, SIZE, 1)).astype(np.float32))


def test_prototypes_are_class_means_of_the_embeddings():
    # literal case, identity embedding: episode 0 has class 0 = {[1, 2], [5, 6]}, class 1 = {[3, 4]}
    sx = jnp.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[0.0, 0.0], [2.0, 2.0], [4.0, -2.0]]])
    sy = jnp.array([[0, 1, 0], [1, 1, 0]])
    expect = np.array([[[3.0, 4.0], [3.0, 4.0]], [[4.0, -2.0], [1.0, 1.0]]])
    np.testing.assert_allclose(np.asarray(prototypes(_flatten, sx, sy, 2)), expect, rtol=0, atol=1e-6)

    # Conv4 (batch statistics): each episode's support set is embedded on its own
    net, sx = _conv(), _images((3, 6))
    sy = jnp.array([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0], [1, 0, 0, 0, 2, 1]])
    got = np.asarray(eqx.filter_jit(prototypes)(net, sx, sy, 3))  # jitted: eager Conv4 compiles op by op
    assert got.shape == (3, 3, 4)
    features = eqx.filter_jit(lambda x: net(x))
    for e in range(3):
        feats, labels = np.asarray(features(sx[e])), np.asarray(sy[e])
        for k in range(3):
            np.testing.assert_allclose(got[e, k], feats[labels == k].mean(0), rtol=1e-5, atol=1e-6)
    # embedding all episodes as one batch would mix their statistics: a different answer
    pooled = np.asarray(features(sx.reshape(-1, SIZE, SIZE, 1))).reshape(3, 6, -1)
    assert not np.allclose(got[0, 0], pooled[0][np.asarray(sy[0]) == 0].mean(0), atol=1e-3)


def test_logits_are_minus_squared_distances_to_prototypes():
    # literal case, identity embedding: queries [0, 0] and [3, 5]
    sx = jnp.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    sy = jnp.array([[0, 1, 1]])  # c_0 = [1, 2], c_1 = [4, 5]
    qx = jnp.array([[[0.0, 0.0], [3.0, 5.0]]])
    expect = -np.array([[[1 + 4, 16 + 25], [4 + 9, 1 + 0]]])
    np.testing.assert_allclose(np.asarray(protonet_logits(_flatten, sx, sy, qx, 2)), expect, atol=1e-6)

    # Conv4: query features from the query set's own batch statistics, distances by hand
    net, sx, qx = _conv(1), _images((2, 4), 1), _images((2, 5), 2)
    sy = jnp.array([[0, 1, 0, 1], [1, 1, 0, 0]])
    got = np.asarray(eqx.filter_jit(protonet_logits)(net, sx, sy, qx, 2))
    features = eqx.filter_jit(lambda x: net(x))
    for e in range(2):
        fs, fq = np.asarray(features(sx[e]), np.float64), np.asarray(features(qx[e]), np.float64)
        labels = np.asarray(sy[e])
        centres = np.stack([fs[labels == k].mean(0) for k in range(2)])
        expect = -((fq[:, None, :] - centres[None]) ** 2).sum(-1)
        np.testing.assert_allclose(got[e], expect, rtol=1e-5, atol=1e-5)


def test_absent_class_gets_probability_zero():
    sx, qx = jnp.array([[[0.0], [1.0]]]), jnp.array([[[0.2], [5.0]]])
    logits = protonet_logits(_flatten, sx, jnp.array([[0, 2]]), qx, 3)  # class 1 has no support example
    assert np.all(np.asarray(logits[..., 1]) == -np.inf) and np.all(np.isfinite(np.asarray(logits[..., [0, 2]])))
    probs = np.asarray(protonet_predictive(_flatten, 3)(None, sx, jnp.array([[0, 2]]), qx))
    np.testing.assert_array_equal(probs[..., 1], 0.0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_relabelling_the_classes_permutes_the_columns_of_probs():
    net, sx, qx = _conv(2), _images((2, 6), 3), _images((2, 4), 4)
    sy = jnp.array([[0, 0, 1, 1, 2, 2], [1, 2, 0, 0, 2, 1]])
    predict = protonet_predictive(net, 3)
    probs = np.asarray(predict(None, sx, sy, qx))
    for sigma in ([1, 2, 0], [2, 1, 0], [0, 2, 1]):
        relabelled = np.asarray(predict(None, sx, jnp.asarray(sigma)[sy], qx))
        # class k is now called sigma[k]: column sigma[k] of the new probs is column k of the old
        np.testing.assert_allclose(relabelled[..., sigma], probs, rtol=1e-5, atol=1e-7)
    assert not np.allclose(probs[..., [1, 2, 0]], probs, atol=1e-3)  # the symmetry is not trivial


def test_support_order_does_not_change_the_prediction():
    net, sx, qx = _conv(3), _images((3, 6), 5), _images((3, 4), 6)
    sy = jnp.tile(jnp.array([0, 0, 1, 1, 2, 2]), (3, 1))
    predict = protonet_predictive(net, 3)
    probs = np.asarray(predict(None, sx, sy, qx))
    rng = np.random.default_rng(0)
    order = jnp.asarray(np.stack([rng.permutation(6) for _ in range(3)]))  # a different order per episode
    shuffled = np.asarray(predict(None, jnp.take_along_axis(sx, order[..., None, None, None], 1), sy[0][order], qx))
    # batch statistics and class means are sums over the set: equal up to float32 summation order
    np.testing.assert_allclose(shuffled, probs, rtol=1e-5, atol=1e-6)


def _blob_classes(rng, num_classes, num_examples, noise=0.3):
    """Each class a Gaussian bump at a random centre with a random width; its examples jitter
    the centre (sd 0.5 pixel) and add pixel noise: ``[classes, examples, 8, 8, 1]``."""
    g = np.arange(SIZE)
    out = np.empty((num_classes, num_examples, SIZE, SIZE, 1), np.float32)
    for c in range(num_classes):
        centre, width = rng.uniform(1, SIZE - 2, 2), rng.uniform(1.0, 2.5)
        for i in range(num_examples):
            x0, y0 = centre + 0.5 * rng.normal(size=2)
            bump = np.exp(-((g[:, None] - x0) ** 2 + (g[None] - y0) ** 2) / (2 * width**2))
            out[c, i, :, :, 0] = bump + noise * rng.normal(size=(SIZE, SIZE))
    return jnp.asarray(out)


def test_meta_training_lowers_the_loss_and_generalises_to_new_classes():
    rng = np.random.default_rng(0)
    train, test = _blob_classes(rng, 40, 10), _blob_classes(rng, 20, 10)  # disjoint classes
    ways, shots, queries = 5, 1, 5
    net = _conv(0)
    learner = meta_learner(protonet_loss(ways), optax.adam(1e-2))
    sampler = lambda k, images: sample_episodes(k, images, 4, ways, shots, queries)
    kw = dict(data=train, sample_batch=sampler, steps_per_call=10, progress=False)
    result = fit(jax.random.key(1), learner, net, 60, **kw)
    episodes = sample_episodes(jax.random.key(2), test, 100, ways, shots, queries)  # 2,500 test queries
    score = lambda e: evaluate_fewshot(jax.random.key(3), protonet_predictive(e, ways), episodes, progress=False)
    before, after = score(net), score(result.state.params)
    first, last = result.losses[:10].mean(), result.losses[-10:].mean()
    acc0, acc1 = before.metrics()["acc"], after.metrics()["acc"]
    # Tolerances: with seeds 0-3 (data and init) the last/first loss ratio was 0.36-0.52 and the
    # held-out accuracy 0.76-0.82 after training against 0.25-0.39 at the random init; chance is
    # 1/5 and the 95% interval of the accuracy over these 100 episodes is about +-0.03. So the
    # bounds below leave a margin of several intervals while still demanding real learning.
    assert np.all(np.isfinite(result.losses))
    assert last < 0.7 * first, (first, last)
    assert acc1 > 0.55, acc1  # chance 0.2
    assert acc1 > acc0 + 0.2, (acc0, acc1)
    assert after.metrics()["nll"] < np.log(ways)


def test_bad_inputs_raise_and_name_the_argument():
    sx, sy, qx = jnp.zeros((2, 4, 3)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match=r"support_y must be \[episodes, support\]"):
        prototypes(_flatten, sx, sy[:, :3], 2)
    with pytest.raises(ValueError, match="support_x must be"):
        prototypes(_flatten, jnp.zeros(4), sy, 2)
    with pytest.raises(ValueError, match="query_x must be"):
        protonet_logits(_flatten, sx, sy, jnp.zeros((3, 5, 3)), 2)  # episodes differ
    with pytest.raises(ValueError, match="query_x must be"):
        protonet_logits(_flatten, sx, sy, jnp.zeros((2, 5, 4)), 2)  # item shape differs
    with pytest.raises(ValueError, match=r"support_y must lie in \[0, num_ways\)"):
        prototypes(_flatten, sx, sy.at[0, 1].set(2), 2)
    with pytest.raises(ValueError, match="support_y must lie in"):
        protonet_predictive(_flatten, 2)(None, sx, sy.at[1, 0].set(-1), qx)
    with pytest.raises(ValueError, match="support_y must hold integer"):
        prototypes(_flatten, sx, jnp.zeros((2, 4)), 2)
    with pytest.raises(ValueError, match="num_ways must be >= 1"):
        protonet_loss(0)
    with pytest.raises(TypeError, match="num_ways must be a Python int"):
        protonet_predictive(_flatten, 2.0)
    with pytest.raises(ValueError, match="embed must map a set"):
        prototypes(lambda x: x.sum(-1), sx, sy, 2)
    loss = protonet_loss(2)
    with pytest.raises(ValueError, match=r"query_y must be \[episodes, queries\]"):
        loss(_flatten, None, Episodes(sx, sy, qx, jnp.zeros((2, 4), jnp.int32)))
    with pytest.raises(ValueError, match="query_y must lie in"):
        loss(_flatten, None, Episodes(sx, sy, qx, jnp.full((2, 5), 3, jnp.int32)))
    # inside jit the shapes are still checked (at trace time)
    with pytest.raises(ValueError, match="query_x must be"):
        jax.jit(lambda e: loss(_flatten, None, e))(Episodes(sx, sy, jnp.zeros((2, 5, 4)), jnp.zeros((2, 5), int)))
