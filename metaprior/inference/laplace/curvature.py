"""Curvature of a network's negative log-likelihood: ``full``, ``diag`` and ``kfac``.

All three estimate the same matrix, the generalised Gauss-Newton / Fisher

    F = sum_n J_n^T Lambda_n J_n,

with ``J_n = d f(x_n) / d params`` and ``Lambda_n`` the Hessian of ``-log p(y_n | f_n)``
with respect to the network output ``f_n`` (for the exponential families used here it
equals the Fisher of the likelihood, so GGN and Fisher coincide). ``fisher`` picks how
the expectation over outputs is taken:

- ``"exact"``: ``Lambda_n = L_n L_n^T`` in closed form (Normal: ``J_loc^T J_loc / s^2``;
  Categorical: ``diag(p) - p p^T``), one backward pass per column of ``L_n``;
- ``"mc"``: one output sampled per input from the likelihood (needs ``rng_key``);
- ``"empirical"``: the observed outputs (the "empirical Fisher");
- ``"hessian"``: the exact Hessian of the negative log-likelihood (``full`` only; what
  NumPyro's ``AutoLaplaceApproximation`` forms).

The structures differ in what they keep:

- ``full``: the dense ``[P, P]`` matrix;
- ``diag``: its diagonal;
- ``kfac``: one block per dense / conv layer, ``F_l ~= (A_l kron G_l) / M_l`` with
  ``A_l = sum a~ a~^T`` over inputs (with a homogeneous coordinate for the bias; conv
  inputs as patches), ``G_l = sum g g^T`` over output gradients and ``M_l`` the number
  of (example, location) pairs (Martens & Grosse 2015; Grosse & Martens 2016).

The posterior precision is ``F + (prior_precision + damping) I``. Its log-determinant
and samples from ``N(0, H^{-1})`` are computed per structure without ever forming a
dense matrix for ``diag`` or ``kfac`` (K-FAC through the eigendecompositions of the
Kronecker factors).

References:
    Martens & Grosse (2015), "Optimizing neural networks with Kronecker-factored
    approximate curvature", eq. (1)-(4). Grosse & Martens (2016), "A Kronecker-factored
    approximate Fisher matrix for convolution layers", section 3. Ritter, Botev & Barber
    (2018), "A scalable Laplace approximation for neural networks", eq. (6)-(8).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree

from metaprior.inference.laplace import _layers

__all__ = [
    "Structure",
    "Fisher",
    "FullCurvature",
    "DiagCurvature",
    "KFACBlock",
    "KFACCurvature",
    "STRUCTURES",
    "output_hessian_sqrt",
    "kron_log_det",
    "factored_kron_log_det",
]

PyTree = Any
Structure = Literal["full", "diag", "kfac"]
Fisher = Literal["exact", "mc", "empirical", "hessian"]


class FullCurvature(NamedTuple):
    """``matrix: [P, P]`` in the order of ``ravel_pytree(params)``."""

    matrix: jax.Array


class DiagCurvature(NamedTuple):
    """``diagonal: [P]`` in the order of ``ravel_pytree(params)``."""

    diagonal: jax.Array


class KFACBlock(NamedTuple):
    """One layer's Kronecker factors; the block is ``kron(a, g) / count``.

    Attributes:
        a: ``[in (+1), in (+1)]`` sum of input (patch) outer products.
        g: ``[out, out]`` sum of output-gradient outer products.
        count: number of (example, location) pairs summed in ``a``.
    """

    a: jax.Array
    g: jax.Array
    count: jax.Array


class KFACCurvature(NamedTuple):
    """``blocks``: one :class:`KFACBlock` per selected layer, in network order."""

    blocks: tuple[KFACBlock, ...]


# ----------------------------------------------------------------- output Hessians


def _base(d: dist.Distribution) -> dist.Distribution:
    while isinstance(d, dist.Independent):
        d = d.base_dist
    return d


def output_hessian_sqrt(likelihood: Callable, f: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """``L: [N, C, S]`` with ``L_n L_n^T`` the Hessian of ``-log p(y_n | f_n)`` in ``f_n``.

    Closed forms (differentiable everywhere) for Normal and Categorical likelihoods of
    any parameterisation in ``f`` (the parameter's Jacobian in ``f`` is applied, which
    is the GGN); otherwise the Hessian is formed per example and square-rooted by
    ``eigh`` (then ``y`` is needed).

    Args:
        likelihood: ``f [N, C] -> Distribution`` with batch shape ``[N]``.
        f: network outputs ``[N, C]``.
        y: observations ``[N, ...]`` (only for the generic fallback).
    """
    base = _base(likelihood(f))
    single = lambda fn: _base(likelihood(fn[None]))
    if isinstance(base, dist.Normal):
        loc_jac = jax.vmap(jax.jacfwd(lambda fn: single(fn).loc.reshape(-1)))(f)  # [N, D, C]
        scale = jnp.broadcast_to(base.scale, base.batch_shape).reshape(f.shape[0], -1)  # [N, D]
        return jnp.swapaxes(loc_jac, 1, 2) / scale[:, None, :]
    if isinstance(base, (dist.CategoricalLogits, dist.CategoricalProbs)):
        logit_jac = jax.vmap(jax.jacfwd(lambda fn: single(fn).logits.reshape(-1)))(f)  # [N, K, C]
        p = jax.nn.softmax(base.logits.reshape(f.shape[0], -1), axis=-1)
        sp = jnp.sqrt(p)
        l_logits = jax.vmap(jnp.diag)(sp) - p[:, :, None] * sp[:, None, :]  # [N, K, K]
        return jnp.einsum("nkc,nks->ncs", logit_jac, l_logits)
    if y is None:
        raise ValueError(f"fisher='exact' for a {type(base).__name__} likelihood needs the observations y")

    def nll(fn, yn):
        return -jnp.sum(likelihood(fn[None]).log_prob(yn[None]))

    hess = jax.vmap(jax.hessian(nll))(f, y)
    lam, vec = jnp.linalg.eigh(hess)
    return vec * jnp.sqrt(jnp.clip(lam, 0.0))[:, None, :]


def _cotangents(rng_key, likelihood, f, y, fisher: Fisher) -> jax.Array:
    """``V: [N, C, S]``; the curvature is ``sum_{n,s} J_n^T v_ns v_ns^T J_n``."""
    if fisher == "exact":
        return output_hessian_sqrt(likelihood, f, y)
    if fisher == "mc":
        if rng_key is None:
            raise ValueError("fisher='mc' samples outputs: pass rng_key")
        target = jax.lax.stop_gradient(likelihood(jax.lax.stop_gradient(f)).sample(rng_key))
    elif fisher == "empirical":
        if y is None:
            raise ValueError("fisher='empirical' needs the observations y")
        target = y
    else:
        raise ValueError(f"fisher must be 'exact', 'mc', 'empirical' or 'hessian', got {fisher!r}")
    grad = jax.grad(lambda out: -jnp.sum(likelihood(out).log_prob(target)))(f)
    return grad[:, :, None]


def _outputs(apply_fn, net) -> Callable:
    def run(x):
        out = apply_fn(net, x)
        if out.ndim != 2:
            raise ValueError(f"apply_fn(net, x) must return [examples, outputs], got shape {out.shape}")
        return out

    return run


# ------------------------------------------------------------------- structures


class _Structure(abc.ABC):
    """What a curvature structure knows how to do. Stateless; state is passed in."""

    @abc.abstractmethod
    def estimate(self, rng_key, params, rest, x, y, apply_fn, likelihood, fisher: Fisher):
        """Curvature state at ``combine(params, rest)`` from data ``x, y``."""

    @abc.abstractmethod
    def log_det(self, curv, shift: jax.Array, kron_damping: str = "exact") -> jax.Array:
        """``log det(F + shift I)`` (``kron_damping`` matters for ``kfac`` only)."""

    @abc.abstractmethod
    def sample(self, rng_key, curv, shift: jax.Array, params, rest) -> PyTree:
        """One draw of ``delta ~ N(0, (F + shift I)^{-1})`` shaped like ``params``."""

    @abc.abstractmethod
    def dense(self, curv, params, rest) -> jax.Array:
        """``F`` as a dense ``[P, P]`` matrix in ``ravel_pytree(params)`` order (tests)."""


def _jacobian_terms(rng_key, params, rest, x, y, apply_fn, likelihood, fisher):
    """``M: [N, S, P]`` with ``F = sum_{n,s} M_ns M_ns^T``."""
    flat, unravel = ravel_pytree(params)
    fn = lambda v: _outputs(apply_fn, eqx.combine(unravel(v), rest))(x)
    f = fn(flat)
    jac = jax.jacrev(fn)(flat)  # [N, C, P]
    v = _cotangents(rng_key, likelihood, f, y, fisher)
    return jnp.einsum("ncp,ncs->nsp", jac, v)


class _Full(_Structure):
    def estimate(self, rng_key, params, rest, x, y, apply_fn, likelihood, fisher):
        if fisher == "hessian":
            flat, unravel = ravel_pytree(params)

            def nll(v):
                f = _outputs(apply_fn, eqx.combine(unravel(v), rest))(x)
                return -jnp.sum(likelihood(f).log_prob(y))

            # reverse over reverse: also through layers without forward mode (nets.cols_matmul)
            return FullCurvature(jax.jacrev(jax.jacrev(nll))(flat))
        m = _jacobian_terms(rng_key, params, rest, x, y, apply_fn, likelihood, fisher)
        return FullCurvature(jnp.einsum("nsp,nsq->pq", m, m))

    def log_det(self, curv, shift, kron_damping="exact"):
        p = curv.matrix.shape[0]
        chol = jnp.linalg.cholesky(curv.matrix + shift * jnp.eye(p, dtype=curv.matrix.dtype))
        return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))

    def sample(self, rng_key, curv, shift, params, rest):
        flat, unravel = ravel_pytree(params)
        p = flat.shape[0]
        chol = jnp.linalg.cholesky(curv.matrix + shift * jnp.eye(p, dtype=flat.dtype))
        z = jax.random.normal(rng_key, (p,), flat.dtype)
        # H = L L^T  =>  L^{-T} z ~ N(0, H^{-1})
        return unravel(jax.scipy.linalg.solve_triangular(chol, z, lower=True, trans="T"))

    def dense(self, curv, params, rest):
        return curv.matrix


class _Diag(_Structure):
    def estimate(self, rng_key, params, rest, x, y, apply_fn, likelihood, fisher):
        if fisher == "hessian":
            raise ValueError("fisher='hessian' is only available with structure='full'")
        m = _jacobian_terms(rng_key, params, rest, x, y, apply_fn, likelihood, fisher)
        return DiagCurvature(jnp.einsum("nsp,nsp->p", m, m))

    def log_det(self, curv, shift, kron_damping="exact"):
        return jnp.sum(jnp.log(curv.diagonal + shift))

    def sample(self, rng_key, curv, shift, params, rest):
        flat, unravel = ravel_pytree(params)
        z = jax.random.normal(rng_key, flat.shape, flat.dtype)
        return unravel(z * jax.lax.rsqrt(curv.diagonal + shift))

    def dense(self, curv, params, rest):
        return jnp.diag(curv.diagonal)


@jax.custom_jvp
def kron_log_det(a: jax.Array, g: jax.Array, count: jax.Array, shift: jax.Array) -> jax.Array:
    """``log det(kron(a, g) / count + shift I)`` from the eigenvalues of ``a`` and ``g``.

    The derivative is the spectral one, ``tr(U diag(c) U^T da)`` (and likewise for ``g``),
    which stays finite when eigenvalues repeat (a rank-deficient ``a`` from few examples),
    where differentiating ``eigh`` itself would divide by zero.
    """
    la = jnp.clip(jnp.linalg.eigvalsh(a), 0.0)
    lg = jnp.clip(jnp.linalg.eigvalsh(g), 0.0)
    return jnp.sum(jnp.log(jnp.outer(la, lg) / count + shift))


@kron_log_det.defjvp
def _kron_log_det_jvp(primals, tangents):
    a, g, count, shift = primals
    da, dg, dcount, dshift = tangents
    la, ua = jnp.linalg.eigh(a)
    lg, ug = jnp.linalg.eigh(g)
    la, lg = jnp.clip(la, 0.0), jnp.clip(lg, 0.0)
    prod = jnp.outer(la, lg) / count
    w = 1.0 / (prod + shift)  # [in, out]
    c_a = (w * lg[None, :]).sum(1) / count
    c_g = (w * la[:, None]).sum(0) / count
    da_eig = jnp.einsum("ji,jk,ki->i", ua, da, ua)  # u_i^T da u_i
    dg_eig = jnp.einsum("ji,jk,ki->i", ug, dg, ug)
    tangent = jnp.dot(c_a, da_eig) + jnp.dot(c_g, dg_eig) - jnp.sum(w * prod) * dcount / count + jnp.sum(w) * dshift
    return jnp.sum(jnp.log(prod + shift)), tangent


def factored_kron_log_det(a: jax.Array, g: jax.Array, count: jax.Array, shift: jax.Array) -> jax.Array:
    """``log det((a/sqrt(c) + pi sqrt(s) I) kron (g/sqrt(c) + sqrt(s)/pi I))`` by Cholesky.

    K-FAC's factored Tikhonov damping (Martens & Grosse 2015, section 6.3, with the
    trace-norm ``pi``): an upper bound on ``log det(kron(a, g)/c + s I)`` (it adds the
    cross terms ``sqrt(s) (pi I kron G' + A' kron I / pi)``) that needs no
    eigendecomposition, so it is cheap and smoothly differentiable. The exact value is
    :func:`kron_log_det`.
    """
    root = jnp.sqrt(count)
    a, g = a / root, g / root
    da, dg = a.shape[0], g.shape[0]
    tiny = jnp.finfo(a.dtype).tiny
    pi = jnp.sqrt((jnp.trace(a) / da + tiny) / (jnp.trace(g) / dg + tiny))
    s = jnp.sqrt(shift)

    def chol_log_det(m):
        return 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(m))))

    return dg * chol_log_det(a + pi * s * jnp.eye(da, dtype=a.dtype)) + da * chol_log_det(
        g + s / pi * jnp.eye(dg, dtype=g.dtype)
    )


class _KFAC(_Structure):
    def estimate(self, rng_key, params, rest, x, y, apply_fn, likelihood, fisher):
        if fisher == "hessian":
            raise ValueError("fisher='hessian' is only available with structure='full'")
        net = eqx.combine(params, rest)
        specs = _layers.block_specs(net, params)
        f = _outputs(apply_fn, net)(x)
        v = _cotangents(rng_key, likelihood, f, y, fisher)  # [N, C, S]
        dtype = jax.tree.leaves(params)[0].dtype
        probes = _layers.zero_probes(specs, dtype)

        def contract(probes, v_s):
            out = _outputs(apply_fn, _layers.tap_network(net, specs, probes))(x)
            return jnp.sum(out * v_s)

        grads = jax.vmap(jax.grad(contract), in_axes=(None, 2))(probes, v)
        blocks = []
        for spec, (ga, gg) in zip(specs, grads):
            a = ga[0]  # identical for every column s
            count = a[-1, -1]
            if not spec.has_bias:
                a = a[:-1, :-1]
            blocks.append(KFACBlock(a, gg.sum(0), count))
        return KFACCurvature(tuple(blocks))

    def log_det(self, curv, shift, kron_damping="exact"):
        if kron_damping not in ("exact", "factored"):
            raise ValueError(f"kron_damping must be 'exact' or 'factored', got {kron_damping!r}")
        fn = kron_log_det if kron_damping == "exact" else factored_kron_log_det
        return sum(fn(b.a, b.g, b.count, jnp.asarray(shift, b.a.dtype)) for b in curv.blocks)

    def sample(self, rng_key, curv, shift, params, rest):
        specs = _layers.block_specs(eqx.combine(params, rest), params)
        keys = jax.random.split(rng_key, len(curv.blocks))
        mats = []
        for key, b in zip(keys, curv.blocks):
            la, ua = jnp.linalg.eigh(b.a)
            lg, ug = jnp.linalg.eigh(b.g)
            lam = jnp.outer(jnp.clip(lg, 0.0), jnp.clip(la, 0.0)) / b.count + shift  # [out, in]
            z = jax.random.normal(key, lam.shape, b.a.dtype)
            # precision (A kron G) acts on vec(X) as G X A: rotate a standard normal drawn in
            # the joint eigenbasis back with U_g (.) U_a^T.
            mats.append(ug @ (z * jax.lax.rsqrt(lam)) @ ua.T)
        return _layers.matrices_to_params(mats, params, specs)

    def dense(self, curv, params, rest):
        specs = _layers.block_specs(eqx.combine(params, rest), params)
        flat, _ = ravel_pytree(params)
        out = jnp.zeros((flat.size, flat.size), flat.dtype)
        for idx, b in zip(_layers.flat_indices(params, specs), curv.blocks):
            out = out.at[jnp.ix_(idx, idx)].set(jnp.kron(b.a, b.g) / b.count)
        return out


STRUCTURES: dict[str, _Structure] = {"full": _Full(), "diag": _Diag(), "kfac": _KFAC()}


def structure_ops(structure: str) -> _Structure:
    """The operations of a structure named ``"full"``, ``"diag"`` or ``"kfac"``."""
    try:
        return STRUCTURES[structure]
    except KeyError:
        raise ValueError(f"structure must be one of {sorted(STRUCTURES)}, got {structure!r}") from None


def num_params(params: PyTree) -> int:
    """Number of scalar parameters in ``params``."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
