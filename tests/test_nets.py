"""ShiftConv2d computes XLA's convolution exactly (round-off aside), per-task kernels included."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprior.models.nets import Conv4, ShiftConv2d


def _pair(key, **kwargs):
    ref = eqx.nn.Conv2d(3, 4, kernel_size=3, key=key, **kwargs)
    fast = ShiftConv2d(3, 4, kernel_size=3, key=key, **kwargs)
    return ref, fast


@pytest.mark.parametrize("padding", [0, 1, ((2, 0), (1, 2))])
def test_shift_conv_matches_conv(padding):
    ref, fast = _pair(jax.random.key(0), padding=padding)
    x = jax.random.normal(jax.random.key(1), (3, 7, 6))
    np.testing.assert_allclose(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_shift_conv_matches_under_vmap_over_kernels_and_in_derivatives():
    ref, fast = _pair(jax.random.key(0), padding=1)
    x = jax.random.normal(jax.random.key(1), (5, 2, 3, 6, 6))  # [tasks, N, C, H, W]
    p_ref, static_ref = eqx.partition(ref, eqx.is_array)
    p_fast, static_fast = eqx.partition(fast, eqx.is_array)
    spread = lambda p: jax.tree.map(  # noqa: E731
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), (5,) + a.shape), p)
    per_task, per_task_fast = spread(p_ref), spread(p_fast)

    def loss(params, static):
        def one(p, xt):
            return jnp.sum(jnp.tanh(jax.vmap(eqx.combine(p, static))(xt)) ** 2)
        return jnp.sum(jax.vmap(one)(params, x))

    np.testing.assert_allclose(loss(per_task_fast, static_fast), loss(per_task, static_ref), rtol=1e-5)
    g_ref = jax.grad(loss)(per_task, static_ref)
    g_fast = jax.grad(loss)(per_task_fast, static_fast)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # forward-over-reverse (Hessian-vector product) agrees too
    hvp = lambda p0, static: jax.jvp(  # noqa: E731
        lambda p: jax.grad(loss)(p, static), (p0,), (jax.tree.map(jnp.ones_like, p0),))[1]
    for a, b in zip(jax.tree.leaves(hvp(per_task_fast, static_fast)), jax.tree.leaves(hvp(per_task, static_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_conv4_impls_agree_and_bad_impl_is_named():
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))
    a = Conv4(3, filters=4, image_size=12, num_blocks=2, key=jax.random.key(0))
    b = Conv4(3, filters=4, image_size=12, num_blocks=2, conv_impl="shift", key=jax.random.key(0))
    assert all(isinstance(c, ShiftConv2d) for c in b.convs)
    np.testing.assert_allclose(b(x), a(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="conv_impl"):
        Conv4(3, conv_impl="fft", key=jax.random.key(0))


def test_strided_layers_fall_back_to_the_parent():
    ref, fast = _pair(jax.random.key(0), stride=2)
    x = jax.random.normal(jax.random.key(1), (3, 7, 7))
    np.testing.assert_allclose(fast(x), ref(x), rtol=1e-6)
