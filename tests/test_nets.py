"""ShiftConv2d and Im2colConv2d compute XLA's convolution exactly (round-off aside), per-task kernels and
second derivatives included; Conv4's channels-last path is the same function as the channels-first ones."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprior.models.nets import Conv4, Im2colConv2d, ShiftConv2d, cols_matmul, max_pool_2x2_nhwc


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
    spread = lambda p: jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), (5,) + a.shape), p)
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
    hvp = lambda p0, static: jax.jvp(lambda p: jax.grad(loss)(p, static), (p0,), (jax.tree.map(jnp.ones_like, p0),))[1]
    for a, b in zip(jax.tree.leaves(hvp(per_task_fast, static_fast)), jax.tree.leaves(hvp(per_task, static_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("padding", [0, 1, ((2, 0), (1, 2))])
def test_im2col_conv_nhwc_matches_conv(padding):
    """Batched channels-last call = XLA's per-example convolution, transposed."""
    ref = eqx.nn.Conv2d(3, 4, kernel_size=3, padding=padding, key=jax.random.key(0))
    fast = Im2colConv2d(3, 4, kernel_size=3, padding=padding, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 7, 6))  # [N, C, H, W]
    want = jnp.transpose(jax.vmap(ref)(x), (0, 2, 3, 1))
    np.testing.assert_allclose(fast.nhwc(jnp.transpose(x, (0, 2, 3, 1))), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast(x[0]), ref(x[0]), rtol=1e-5, atol=1e-5)  # per-example call kept
    strided = Im2colConv2d(3, 4, kernel_size=3, stride=2, key=jax.random.key(0))  # falls back
    ref_s = eqx.nn.Conv2d(3, 4, kernel_size=3, stride=2, key=jax.random.key(0))
    np.testing.assert_allclose(
        strided.nhwc(jnp.transpose(x, (0, 2, 3, 1))),
        jnp.transpose(jax.vmap(ref_s)(x), (0, 2, 3, 1)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_max_pool_2x2_nhwc_matches_reduce_window():
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))  # odd height: last row dropped
    want = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(max_pool_2x2_nhwc(x), want)
    # without ties the gradients are the same one-hot selections
    g = jax.grad(lambda a: jnp.sum(max_pool_2x2_nhwc(a) ** 2))(x)
    g_ref = jax.grad(
        lambda a: jnp.sum(jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") ** 2)
    )(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)


@pytest.mark.parametrize("image_size,num_blocks", [(12, 2), (28, 4), (20, 2)])
def test_conv4_impls_agree_and_bad_impl_is_named(image_size, num_blocks):
    """The same weights give the same outputs under all three implementations, with a
    5x5 final map at 20 pixels (so the channels-last path must flatten in (C, H, W) order
    for the head)."""
    x = jax.random.normal(jax.random.key(1), (4, image_size, image_size, 1))
    kw = dict(filters=4, image_size=image_size, num_blocks=num_blocks, key=jax.random.key(0))
    a = Conv4(3, **kw)
    b = Conv4(3, conv_impl="shift", **kw)
    c = Conv4(3, conv_impl="im2col", **kw)
    assert all(isinstance(conv, ShiftConv2d) for conv in b.convs)
    assert all(type(conv) is Im2colConv2d for conv in c.convs)
    np.testing.assert_allclose(b(x), a(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c(x), a(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="conv_impl"):
        Conv4(3, conv_impl="fft", key=jax.random.key(0))


def test_strided_layers_fall_back_to_the_parent():
    ref, fast = _pair(jax.random.key(0), stride=2)
    x = jax.random.normal(jax.random.key(1), (3, 7, 7))
    np.testing.assert_allclose(fast(x), ref(x), rtol=1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_is_the_same_for_every_conv_impl(first_order):
    """One (second- or first-order) MAML meta-gradient of Conv4 over 3 tasks, 2 inner
    steps: the channels-last im2col path equals the channels-first shift and lax paths
    leaf by leaf. Tolerance: float32 round-off through two inner steps and a second
    derivative (sums in a different order), rtol 2e-3 with atol 2e-4 of a gradient whose
    largest entries are O(1)."""
    import numpyro.distributions as dist
    import optax

    from metaprior.inference.maml import ml_point, nll_loss

    k1, k2 = jax.random.split(jax.random.key(3))
    from metaprior.inference.maml import SupportQuery

    batch = SupportQuery(
        jax.random.uniform(k1, (3, 4, 28, 28, 1)),
        jnp.tile(jnp.arange(4), (3, 1)),
        jax.random.uniform(k2, (3, 8, 28, 28, 1)),
        jnp.tile(jnp.arange(4).repeat(2), (3, 1)),
    )
    loss = nll_loss(lambda n, x: n(x), lambda f: dist.Categorical(logits=f))
    objective = ml_point(loss, optax.sgd(0.4), 2, first_order=first_order)

    def meta_grad(impl):
        net = Conv4(4, filters=8, conv_impl=impl, key=jax.random.key(0))
        params, static = eqx.partition(net, eqx.is_inexact_array)
        value, g = jax.value_and_grad(lambda p: objective(eqx.combine(p, static), jax.random.key(0), batch)[0])(params)
        return value, jax.tree.leaves(g)

    v_new, g_new = meta_grad("im2col")
    for impl in ("shift", "lax"):
        v_old, g_old = meta_grad(impl)
        np.testing.assert_allclose(v_new, v_old, rtol=1e-5)
        assert len(g_new) == len(g_old)
        for a, b in zip(g_new, g_old):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)


def test_cols_matmul_first_and_second_derivatives_equal_the_plain_product():
    """cols_matmul only changes the order of the kernel gradient's operands: its value,
    gradient and reverse-over-reverse second derivative (what second-order MAML takes),
    under vmap over per-task kernels, equal jnp.matmul's. Tolerance: float32 sums of
    50-100 products in another order."""
    a = jax.random.normal(jax.random.key(0), (3, 50, 7))
    b = jax.random.normal(jax.random.key(1), (3, 7, 4))
    w = jax.random.normal(jax.random.key(2), (3, 50, 4))

    def loss(mm, a, b):
        inner = jax.grad(lambda b: jnp.sum(jnp.tanh(jax.vmap(mm)(a, b)) * w))(b)  # one "inner step"
        return jnp.sum(jnp.sin(jax.vmap(mm)(a, b - 0.1 * inner)))

    g_fast = jax.grad(loss, argnums=(1, 2))(cols_matmul, a, b)
    g_ref = jax.grad(loss, argnums=(1, 2))(jnp.matmul, a, b)
    for x, y in zip(g_fast, g_ref):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cols_matmul(a[0], b[0]), a[0] @ b[0], rtol=1e-6)


def test_im2col_forward_mode_with_fast_vjp_off_equals_the_transposed_vjp():
    """A custom_vjp has no forward mode: jax.jvp through Conv4's fast path raises, and
    fast_vjp=False gives the JVP. That JVP equals the transpose of the fast path's VJP
    (how the Laplace GLM predictive computes J delta), to float32 round-off."""
    fast = Conv4(5, filters=8, key=jax.random.key(0))
    slow = Conv4(5, filters=8, fast_vjp=False, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(2), (3, 28, 28, 1))
    p_fast, r_fast = eqx.partition(fast, eqx.is_inexact_array)
    p_slow, r_slow = eqx.partition(slow, eqx.is_inexact_array)
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(p_fast), jax.tree.leaves(p_slow)))
    leaves = [jax.random.normal(jax.random.key(3 + i), u.shape) for i, u in enumerate(jax.tree.leaves(p_fast))]
    t_fast = jax.tree.unflatten(jax.tree.structure(p_fast), leaves)
    t_slow = jax.tree.unflatten(jax.tree.structure(p_slow), leaves)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda p: eqx.combine(p, r_fast)(x), (p_fast,), (t_fast,))
    f_slow, jvp_slow = jax.jvp(lambda p: eqx.combine(p, r_slow)(x), (p_slow,), (t_slow,))
    f_fast, vjp = jax.vjp(lambda p: eqx.combine(p, r_fast)(x), p_fast)
    (jvp_fast,) = jax.linear_transpose(lambda u: vjp(u)[0], f_fast)(t_fast)
    np.testing.assert_allclose(f_fast, f_slow, rtol=1e-5, atol=1e-5)
    scale = float(jnp.max(jnp.abs(jvp_slow)))
    np.testing.assert_allclose(jvp_fast, jvp_slow, rtol=1e-4, atol=1e-5 * scale)
