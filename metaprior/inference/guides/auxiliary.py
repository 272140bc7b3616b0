"""Auxiliary-variable guide for weights under an implicit (latent-variable) prior.

The model puts an implicit prior on a group of weights ``w`` (e.g. every 2-D kernel
of a conv layer, in a plate over kernels) through a latent variable::

    z ~ p(z),    w ~ p(w | z),    y ~ p(y | W).

The marginal ``p(w) = int p(w | z) p(z) dz`` has no closed form, so the usual ELBO,
with ``-KL(q(w) || p(w))``, cannot be evaluated. :class:`AuxiliaryGuide` samples, for
every weight site,

    w ~ q(w | theta) = N(loc, diag scale^2)    (fully factorised), then
    z ~ r(z | w; psi)                            (an auxiliary "reverse" model),

and the ELBO of this model/guide pair,

    E_{q(W) r(Z|W)} [ log p(Y | W) + log p(Z) + log p(W | Z) - log q(W) - log r(Z | W) ]

is exactly the auxiliary bound of the deep weight prior (Atanov et al. 2019, Sec. 3.2)::

    L_aux(theta, psi) = E_{q(W)} log p(Y | W)
        + sum_{kernels} ( -E_{q(w)} log q(w)
                          + E_{q(w)} E_{r(z|w)} [ log p(w | z) + log p(z) - log r(z | w) ] )

Because ``log p(w) = E_{r(z|w)}[log p(w | z) + log p(z) - log r(z | w)] +
KL(r(z | w) || p(z | w))``, ``L_aux = ELBO - E_{q(W)} sum KL(r(z|w) || p(z|w)) <= ELBO``,
with equality exactly when ``r(z | w)`` is the model's posterior ``p(z | w)``. It is
maximised over ``theta`` and ``psi`` together; ``psi`` starts at the prior VAE's
encoder. (To keep ``psi`` fixed instead, as the paper's code does, give its
``"{z}_encoder$params"`` site a zero update with ``optax.multi_transform``.)

So NumPyro's ``Trace_ELBO`` on this pair estimates ``L_aux`` directly. Its
observation term can also be estimated with the *local reparameterisation* trick
(Kingma et al. 2015): where a layer's output is linear in Gaussian weights, sample
the pre-activations, ``N(conv(x, loc), conv(x^2, scale^2))``, instead of the weights.
:func:`local_reparam_conv2d` does this for convolutions and :func:`latent_elbo` gives
the rest of the bound (the pair's ELBO with the observed sites left out), so that
``L_aux ~= E_LRT[log p(Y | W)] + latent_elbo``. For a dense layer, or a convolution
whose output is a single position, that estimator has exactly the same expectation
and a lower variance. For a convolution with many output positions the sampled
pre-activations are independent across positions, whereas the weights they stand for
are shared, so it estimates a slightly different (less correlated) likelihood term;
this is the approximation made for convolutions by Molchanov et al. (2017) and by the
deep weight prior's code, and why the plain pair ELBO is kept as the reference.

Which weights are inferred is the model's choice: weights that the model declares as
``param`` sites are point estimates and never appear here. In the deep-weight-prior
model (:func:`metaprior.models.dwp.dwp_model`) that is the dense layer and the biases,
as in the paper.

References:
    A. Atanov, A. Ashukha, K. Struminsky, D. Vetrov, M. Welling. "The Deep Weight
    Prior." ICLR 2019, Sec. 3.2 (the auxiliary bound, their L^aux).
    R. Ranganath, D. Tran, D. Blei. "Hierarchical Variational Models." ICML 2016
    (the same reverse-model bound, there for a hierarchical guide).
    D. Kingma, T. Salimans, M. Welling. "Variational Dropout and the Local
    Reparameterization Trick." NeurIPS 2015.
    D. Molchanov, A. Ashukha, D. Vetrov. "Variational Dropout Sparsifies Deep Neural
    Networks." ICML 2017 (the truncated-alpha parameterisation, LRT for convolutions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import eqx_module

from metaprior.inference.svi import OrderedTrace_ELBO

__all__ = [
    "AuxiliarySite",
    "AuxiliaryGuide",
    "local_reparam_conv2d",
    "latent_elbo",
]

ScaleParam = Literal["log_scale", "truncated_alpha"]


@dataclasses.dataclass(frozen=True)
class AuxiliarySite:
    """One group of Gaussian weights in a plate, with an optional auxiliary latent.

    Attributes:
        name: the model's weight site (e.g. ``"conv0_w"``), value ``[num, *event_shape]``.
        plate: the model's plate over the group (e.g. ``"conv0_kernels"``).
        num: the plate's size.
        event_shape: the shape of one member (e.g. ``(k, k)``).
        aux_name: the model's latent site ``z`` behind ``w`` (``None``: no auxiliary
            latent, the plain mean-field guide for a prior with a density).
        encoder: ``r(z | w)``: an Equinox module, ``w [num, *event_shape] -> (loc, scale)``
            each ``[num, latent_dim]``. Its arrays become the guide's
            ``"{aux_name}_encoder$params"`` site.
    """

    name: str
    plate: str
    num: int
    event_shape: tuple[int, ...]
    aux_name: str | None = None
    encoder: Any = None

    def __post_init__(self):
        if (self.aux_name is None) != (self.encoder is None):
            raise ValueError(f"site {self.name!r}: give both aux_name and encoder, or neither")


@dataclasses.dataclass(frozen=True)
class AuxiliaryGuide:
    """``w ~ N(loc, diag scale^2)`` for every site, then ``z ~ r(z | w)`` (final class).

    The guide program takes the model's arguments and ignores them. Parameters, per
    site ``name``:

    - ``{name}_loc`` ``[num, *event_shape]``;
    - ``{name}_log_scale`` (``scale_param="log_scale"``: ``scale = exp(.)``) or
      ``{name}_logit_alpha`` (``"truncated_alpha"``: ``scale^2 = sigmoid(.) loc^2``,
      the multiplicative-noise form with ``alpha <= 1`` used for the log-uniform prior,
      whose KL depends on ``alpha`` alone);
    - ``{aux_name}_encoder$params`` for sites with an auxiliary latent.

    All parameters are unconstrained, so an Optax optimizer can act on the dict as is.
    The weight sites are all sampled before the auxiliary ones (the order of the
    paper's bound, and it keeps the ``w`` draws the same as the plain guide's for a
    given key).

    Attributes:
        sites: the weight groups.
        scale_param: ``"log_scale"`` or ``"truncated_alpha"`` (see above).
        init_loc_scale: ``{name}_loc`` starts at ``N(0, init_loc_scale^2)`` draws
            (callers usually overwrite it, e.g. with Xavier or prior samples).
        init_log_scale: initial ``log scale`` (the paper's code: ``log var = -10``).
        init_logit_alpha: initial ``logit alpha`` (the paper's code: ``-2``).
    """

    sites: tuple[AuxiliarySite, ...]
    scale_param: ScaleParam = "log_scale"
    init_loc_scale: float = 0.1
    init_log_scale: float = -5.0
    init_logit_alpha: float = -2.0

    def __post_init__(self):
        if self.scale_param not in ("log_scale", "truncated_alpha"):
            raise ValueError(f"scale_param must be 'log_scale' or 'truncated_alpha', got {self.scale_param!r}")
        names = [s.name for s in self.sites] + [s.aux_name for s in self.sites if s.aux_name]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be distinct, got {names}")

    # ---- parameters

    def _scale_name(self, site: AuxiliarySite) -> str:
        suffix = "log_scale" if self.scale_param == "log_scale" else "logit_alpha"
        return f"{site.name}_{suffix}"

    def _site_init(self, rng_key: jax.Array, site: AuxiliarySite) -> dict[str, Any]:
        shape = (site.num, *site.event_shape)
        raw = self.init_log_scale if self.scale_param == "log_scale" else self.init_logit_alpha
        loc = self.init_loc_scale * jax.random.normal(rng_key, shape)
        # strongly typed, like the optimizer's updates: no recompilation after step one
        return {f"{site.name}_loc": loc, self._scale_name(site): jnp.full(shape, raw, dtype=loc.dtype)}

    def init_params(self, rng_key: jax.Array) -> dict[str, Any]:
        """All of this guide's parameters (see the class docstring for the names)."""
        params = {}
        for key, site in zip(jax.random.split(rng_key, len(self.sites)), self.sites):
            params.update(self._site_init(key, site))
            if site.encoder is not None:
                params[f"{site.aux_name}_encoder$params"] = _encoder_params(site.encoder)
        return params

    def _scale(self, loc: jax.Array, raw: jax.Array) -> jax.Array:
        if self.scale_param == "log_scale":
            return jnp.exp(raw)
        return jnp.sqrt(jax.nn.sigmoid(raw)) * jnp.abs(loc)

    def moments(self, params: dict[str, Any]) -> dict[str, tuple[jax.Array, jax.Array]]:
        """``{name: (loc, scale)}`` of ``q(w)`` for every site, each ``[num, *event_shape]``."""
        out = {}
        for site in self.sites:
            loc = params[f"{site.name}_loc"]
            out[site.name] = (loc, self._scale(loc, params[self._scale_name(site)]))
        return out

    # ---- the guide program

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        """The guide: same arguments as the model (ignored). Returns the ``w`` values."""
        values = {}
        for site in self.sites:
            init = self._site_init
            loc = numpyro.param(f"{site.name}_loc", lambda key, s=site: init(key, s)[f"{s.name}_loc"])
            raw = numpyro.param(self._scale_name(site), lambda key, s=site: init(key, s)[self._scale_name(s)])
            with numpyro.plate(site.plate, site.num):
                values[site.name] = numpyro.sample(
                    site.name, dist.Normal(loc, self._scale(loc, raw)).to_event(len(site.event_shape))
                )
        for site in self.sites:
            if site.encoder is None:
                continue
            encoder = eqx_module(f"{site.aux_name}_encoder", site.encoder)
            z_loc, z_scale = encoder(values[site.name])
            with numpyro.plate(site.plate, site.num):
                numpyro.sample(site.aux_name, dist.Normal(z_loc, z_scale).to_event(1))
        return values


def _encoder_params(encoder) -> Any:
    params, _ = eqx.partition(encoder, eqx.is_inexact_array)
    return params


def _lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def local_reparam_conv2d(
    rng_key: jax.Array,
    x: jax.Array,
    loc: jax.Array,
    scale: jax.Array,
    *,
    conv: Callable[[jax.Array, jax.Array], jax.Array] = _lax_conv,
    eps: float = 1e-12,
) -> jax.Array:
    """A convolution with Gaussian kernels, by the local reparameterisation trick.

    With independent kernels ``W ~ N(loc, scale^2)``, every output unit of
    ``conv(x, W)`` is Gaussian with mean ``conv(x, loc)`` and variance
    ``conv(x^2, scale^2)`` (Kingma et al. 2015, Sec. 2.3). This draws each output unit
    from that marginal, independently. Per unit the marginal is exact; across spatial
    positions of one example the true outputs are correlated (they share ``W``), which
    this ignores (see the module docstring).

    Args:
        rng_key: key for the output noise.
        x: input, e.g. ``[N, C_in, H, W]``.
        loc, scale: kernel mean and standard deviation, e.g. ``[C_out, C_in, k, k]``.
        conv: the (linear, bias-free) convolution ``conv(x, kernel)``; by default a
            'VALID', stride-1 ``lax.conv_general_dilated`` in NCHW / OIHW layout.
        eps: added to the variance before the square root (keeps its gradient finite).

    Returns:
        One sample of the pre-activations, the shape of ``conv(x, loc)``.
    """
    mean = conv(x, loc)
    var = conv(x * x, scale * scale)
    return mean + jnp.sqrt(var + eps) * jax.random.normal(rng_key, mean.shape, mean.dtype)


def latent_elbo(
    rng_key: jax.Array,
    params: dict[str, Any],
    model: Callable,
    guide: Callable,
    *args: Any,
    obs_sites: Sequence[str] = ("y",),
    num_particles: int = 1,
    **kwargs: Any,
) -> jax.Array:
    """The pair's ELBO with the observed sites left out.

    ``E_q[ log p(latents) - log q(latents) ]``: for :class:`AuxiliaryGuide` and a model
    with an implicit prior this is the prior part of ``L_aux``,
    ``sum E_{q(w) r(z|w)}[log p(w | z) + log p(z) - log r(z | w) - log q(w)]``, i.e. minus
    the auxiliary upper bound on ``KL(q(W) || p(W))``. Add an estimate of
    ``E_q log p(Y | W)`` (e.g. through :func:`local_reparam_conv2d`) to get ``L_aux``.

    Args:
        rng_key: key for the guide's (and the model's) randomness.
        params: values of the ``param`` sites of model and guide.
        model, guide: NumPyro programs called with ``*args, **kwargs``.
        obs_sites: the observed sites to hide from the model's trace.
        num_particles: samples averaged (NumPyro's ``Trace_ELBO``).

    Returns:
        A scalar estimate (higher is better).
    """
    hidden = handlers.block(model, hide=list(obs_sites))
    return -OrderedTrace_ELBO(num_particles=num_particles).loss(rng_key, params, hidden, guide, *args, **kwargs)
