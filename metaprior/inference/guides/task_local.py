"""Plate-aware guides for the local latents of a ``plate("tasks")``.

Every latent site inside the model's ``"tasks"`` plate is gathered, per task, into one
flat vector ``u_j`` of size ``D``; the guide gives each task its own distribution over
``u_j`` with its own parameters (stacked along a leading ``[num_tasks]`` axis):

- :class:`TaskNormalGuide`: ``q(u_j) = N(m_j, diag(s_j^2))``.
- :class:`TaskIAFGuide`: the same base followed by ``num_flows`` inverse autoregressive
  flows per task (Kingma et al. 2016), so ``q(u_j)`` can be correlated and skewed.

Unlike NumPyro's ``AutoIAFNormal``, which flattens all tasks into a single flow over
``num_tasks * D`` dimensions, the flows here are per task, which keeps the cost per step
proportional to the task batch and works with ``plate("tasks", N, subsample_size=B)``:
only the ``B`` subsampled tasks' parameters are read and receive gradients.

Guides are built explicitly from one trace of the model (no lazy set-up on first call)
and are then plain NumPyro programs: ``guide(*model_args, **model_kwargs)``. They read
``subsample_size`` from the call's keyword arguments, exactly as the model does.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers

__all__ = ["TaskNormalGuide", "TaskIAFGuide", "LocalSite"]

TASKS = "tasks"


@dataclasses.dataclass(frozen=True)
class LocalSite:
    """Layout of one local latent site: ``value`` has the tasks axis at ``task_axis``."""

    name: str
    shape: tuple[int, ...]  # full value shape with the tasks axis of size num_tasks
    task_axis: int
    event_dim: int
    size: int  # elements per task

    def per_task_shape(self) -> tuple[int, ...]:
        return self.shape[: self.task_axis] + self.shape[self.task_axis + 1 :]


@dataclasses.dataclass(frozen=True)
class _TaskGuideBase(abc.ABC):
    """Shared machinery; use :class:`TaskNormalGuide` or :class:`TaskIAFGuide`."""

    sites: tuple[LocalSite, ...]
    num_tasks: int
    plate_dim: int
    prefix: str
    init_scale: float
    init_loc_scale: float = 0.0
    # optional amortisation: a module ``encoder(x [N, D_x], y [N], mask [N]) -> [2 * D]``
    # whose output is added to each task's (loc, log_scale); see ``encoder_site``
    encoder: Any = None

    @property
    def encoder_site(self) -> str:
        """Name of the encoder's ``param`` site (shared by all tasks, not a per-task row)."""
        return f"{self.prefix}.encoder$params"

    @property
    def latent_dim(self) -> int:
        """``D``: the size of one task's flattened local latents."""
        return sum(s.size for s in self.sites)

    @classmethod
    def _layout(cls, rng_key, model, args, kwargs) -> tuple[tuple[LocalSite, ...], int, int]:
        kwargs = dict(kwargs)
        if "subsample_size" in kwargs:
            kwargs["subsample_size"] = None  # the prototype sees every task
        tr = handlers.trace(handlers.seed(model, rng_key)).get_trace(*args, **kwargs)
        frames = [s for s in tr.values() if s["type"] == "plate" and s["name"] == TASKS]
        if not frames:
            raise ValueError("the model has no plate named 'tasks'; these guides need one")
        sites, global_sites, num_tasks, plate_dim = [], [], None, None
        for name, site in tr.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            frame = next((f for f in site["cond_indep_stack"] if f.name == TASKS), None)
            if frame is None:
                global_sites.append(name)
                continue
            value = jnp.shape(site["value"])
            event_dim = site["fn"].event_dim
            axis = len(value) - event_dim + frame.dim
            num_tasks, plate_dim = frame.size, frame.dim
            sites.append(LocalSite(name, value, axis, event_dim, int(np.prod(value)) // frame.size))
        if global_sites:
            raise ValueError(
                f"latent site(s) {global_sites} are outside plate('tasks'); these guides cover "
                "local latents only. Combine with an AutoNormal over the globals through "
                "numpyro.infer.autoguide.AutoGuideList, or make them params."
            )
        if not sites:
            raise ValueError("the model has no latent sample sites inside plate('tasks')")
        return tuple(sites), num_tasks, plate_dim

    # ---- the per-task transform: base noise -> u, log q(u)

    @abc.abstractmethod
    def _flow_init(self, rng_key: jax.Array) -> dict[str, jax.Array]:
        """Initial flow parameters, each with a leading ``[num_tasks]`` axis."""

    @abc.abstractmethod
    def _flow(self, flow_params: dict[str, jax.Array], u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One task: ``u [D] -> (u' [D], log|det du'/du|)``."""

    @abc.abstractmethod
    def _inverse_flow(self, flow_params: dict[str, jax.Array], u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One task: ``u' [D] -> (u [D], log|det du'/du|)``, the inverse of :meth:`_flow`."""

    def _base_init(self, rng_key):
        d = self.latent_dim
        return {
            "loc": self.init_loc_scale * jax.random.normal(rng_key, (self.num_tasks, d)),
            "log_scale": jnp.full((self.num_tasks, d), math.log(self.init_scale)),
        }

    def init_params(self, rng_key: jax.Array) -> dict[str, jax.Array]:
        """All of this guide's parameters, keyed by site name (``prefix + '_' + name``)."""
        k_base, k_flow = jax.random.split(rng_key)
        raw = {**self._base_init(k_base), **self._flow_init(k_flow)}
        return {f"{self.prefix}_{k}": v for k, v in raw.items()}

    def _params(self) -> dict[str, jax.Array]:
        """Declare the param sites; NumPyro initialises them from a seeded key."""
        shapes = jax.eval_shape(self.init_params, jax.random.key(0))
        return {
            name.removeprefix(self.prefix + "_"): numpyro.param(name, lambda key, n=name: self.init_params(key)[n])
            for name in shapes
        }

    def sample_task(self, task_params: dict[str, jax.Array], eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One task: standard-normal ``eps [D]`` -> ``(u [D], log q(u))``."""
        scale = jnp.exp(task_params["log_scale"])
        u = task_params["loc"] + scale * eps
        log_q = jnp.sum(dist.Normal(0.0, 1.0).log_prob(eps)) - jnp.sum(task_params["log_scale"])
        u, log_det = self._flow(task_params, u)
        return u, log_q - log_det

    def log_prob_task(self, task_params: dict[str, jax.Array], u: jax.Array) -> jax.Array:
        """One task: ``log q(u)`` of a given ``u [D]`` (the flow inverted; see :meth:`sample_task`).

        Far out in the tails a saturated gate sends the inverse past float range; ``q``'s
        density there is below what the dtype holds, and ``-inf`` is returned, never NaN.
        """
        u0, log_det = self._inverse_flow(task_params, u)
        eps = (u0 - task_params["loc"]) * jnp.exp(-task_params["log_scale"])
        log_q = jnp.sum(dist.Normal(0.0, 1.0).log_prob(eps)) - jnp.sum(task_params["log_scale"]) - log_det
        return jnp.where(jnp.isnan(log_q) | (log_q == jnp.inf), -jnp.inf, log_q)

    def task_params(self, params: dict[str, jax.Array], *args: Any) -> dict[str, jax.Array]:
        """Every task's parameters as the guide program uses them: ``params`` (keyed by
        site name, leading ``[num_tasks]`` axis) with the encoder's offsets added when the
        guide has one (``args`` are then the model's arguments, the batch first)."""

        def program():
            task_params = self._params()
            if self.encoder is not None:
                task_params = self._encode(task_params, jnp.arange(self.num_tasks), args)
            return task_params

        return handlers.substitute(handlers.seed(program, jax.random.key(0)), data=params)()

    def sample(self, rng_key: jax.Array, params: dict[str, jax.Array], num_samples: int, *args: Any):
        """``num_samples`` draws of every task's flat latents: ``(u [S, T, D], log q(u) [S, T])``."""
        task_params = self.task_params(params, *args)
        eps = jax.random.normal(rng_key, (num_samples, self.num_tasks, self.latent_dim))
        return jax.vmap(lambda e: jax.vmap(self.sample_task)(task_params, e))(eps)

    def log_prob(self, params: dict[str, jax.Array], u: jax.Array, *args: Any) -> jax.Array:
        """``log q(u)`` of flat latents ``u [S, T, D]`` (e.g. another guide's draws): ``[S, T]``.

        Args:
            params: this guide's parameters for its ``T`` tasks (keyed by site name).
            u: ``[S, T, D]`` points, laid out as :meth:`join_sites` lays out site values.
            *args: the model's arguments (needed only with an encoder).
        """
        if u.ndim != 3 or u.shape[1:] != (self.num_tasks, self.latent_dim):
            raise ValueError(f"u must be [samples, {self.num_tasks}, {self.latent_dim}], got {u.shape}")
        task_params = self.task_params(params, *args)
        return jax.vmap(lambda v: jax.vmap(self.log_prob_task)(task_params, v))(u)

    def split_sites(self, u: jax.Array) -> dict[str, jax.Array]:
        """Flat latents ``u [S, T, D]`` -> ``{site: [S, *site shape]}`` (the model's layout)."""
        values, offset = {}, 0
        for site in self.sites:
            part = u[..., offset : offset + site.size]
            offset += site.size
            value = part.reshape(u.shape[:2] + site.per_task_shape())
            values[site.name] = jnp.moveaxis(value, 1, 1 + site.task_axis)
        return values

    def join_sites(self, values: dict[str, jax.Array]) -> jax.Array:
        """Inverse of :meth:`split_sites`: ``{site: [S, *site shape]}`` -> ``[S, T, D]``."""
        parts = []
        for site in self.sites:
            value = jnp.moveaxis(values[site.name], 1 + site.task_axis, 1)
            parts.append(value.reshape(value.shape[:2] + (site.size,)))
        return jnp.concatenate(parts, axis=-1)

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
        """The guide program: same arguments as the model."""
        subsample_size = kwargs.get("subsample_size")
        params = self._params()
        rows = params["loc"].shape[0]
        if rows != self.num_tasks:
            raise ValueError(f"guide parameters cover {rows} tasks, the guide was built for {self.num_tasks}")
        with numpyro.plate(TASKS, self.num_tasks, subsample_size=subsample_size, dim=self.plate_dim) as idx:
            task_params = jax.tree.map(lambda p: p[idx], params)
            if self.encoder is not None:
                task_params = self._encode(task_params, idx, args)
            key = numpyro.prng_key()
            if key is None:
                raise RuntimeError("the guide needs a PRNG key: run it under numpyro.handlers.seed")
            eps = jax.random.normal(key, (idx.shape[0], self.latent_dim))
            u, log_q = jax.vmap(self.sample_task)(task_params, eps)
            return self._emit(u, log_q)

    def _encode(self, task_params, idx, args):
        """Add the encoder's offsets of the drawn tasks' (loc, log_scale)."""
        from numpyro.contrib.module import eqx_module

        batch = args[0] if args else None
        if getattr(batch, "y", None) is None or getattr(batch, "x", None) is None:
            raise ValueError(
                "a guide with an encoder needs the observed batch (x, y, mask) as the first "
                "argument; got " + (type(batch).__name__ if args else "no arguments")
            )
        encoder = eqx_module(self.encoder_site.removesuffix("$params"), self.encoder)
        out = jax.vmap(encoder)(batch.x[idx], batch.y[idx], batch.mask[idx])
        d = self.latent_dim
        if out.shape[-1] != 2 * d:
            raise ValueError(f"the encoder returns {out.shape[-1]} numbers per task, expected 2 * {d}")
        return {
            **task_params,
            "loc": task_params["loc"] + out[:, :d],
            "log_scale": task_params["log_scale"] + out[:, d:],
        }

    def _emit(self, u: jax.Array, log_q: jax.Array) -> dict[str, jax.Array]:
        """Split ``u [B, D]`` into the model's sites as Delta samples.

        The joint ``log q(u_j)`` of a task is carried by one element of the first site
        (index 0 on every batch axis but the tasks axis), zeros elsewhere, so plate
        scaling applies to it once per task and nothing is counted twice.
        """
        batch = u.shape[0]
        values, offset = {}, 0
        for i, site in enumerate(self.sites):
            part = u[:, offset : offset + site.size]
            offset += site.size
            value = jnp.moveaxis(part.reshape((batch,) + site.per_task_shape()), 0, site.task_axis)
            batch_shape = value.shape[: value.ndim - site.event_dim]
            density = jnp.zeros(batch_shape)
            if i == 0:
                index = tuple(slice(None) if a == site.task_axis else 0 for a in range(len(batch_shape)))
                density = density.at[index].set(log_q)
            values[site.name] = numpyro.sample(
                site.name, dist.Delta(value, log_density=density, event_dim=site.event_dim)
            )
        return values


def _check_init(init_scale: float, init_loc_scale: float) -> None:
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    if not init_loc_scale >= 0:
        raise ValueError(f"init_loc_scale must be >= 0, got {init_loc_scale}")


def _made_masks(dim: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """MADE masks (Germain et al. 2015) for inputs ordered 0..D-1.

    Returns ``mask_in [hidden, D]`` and ``mask_out [D, hidden]`` such that output ``i``
    depends only on inputs ``< i``.
    """
    in_deg = np.arange(dim)
    hid_deg = np.arange(hidden) % max(dim - 1, 1)
    mask_in = (hid_deg[:, None] >= in_deg[None, :]).astype(np.float32)
    mask_out = (in_deg[:, None] > hid_deg[None, :]).astype(np.float32)
    if dim == 1:
        mask_in[:] = 0.0
    return mask_in, mask_out


@dataclasses.dataclass(frozen=True)
class TaskNormalGuide(_TaskGuideBase):
    """Per-task diagonal Normal over the task's local latents (final class).

    Build with :meth:`build`; parameters ``{prefix}_loc`` and ``{prefix}_log_scale`` are
    ``[num_tasks, D]``.
    """

    @classmethod
    def build(
        cls,
        rng_key: jax.Array,
        model: Callable,
        *args: Any,
        prefix: str = "q",
        init_scale: float = 0.1,
        init_loc_scale: float = 0.0,
        encoder: Any = None,
        **kwargs: Any,
    ) -> TaskNormalGuide:
        """Trace ``model(*args, **kwargs)`` once and lay out its local latents.

        Args:
            rng_key: key for the prototype trace.
            model: a NumPyro model with a ``plate("tasks")``.
            prefix: prefix of the param site names.
            init_scale: initial standard deviation of q.
            init_loc_scale: initial means are drawn from ``N(0, init_loc_scale^2)``; 0 starts
                every task at the origin. With many tasks visited rarely (subsampling),
                random codes (e.g. 1.0, the prior's scale) let the shared network tell tasks
                apart from the first step, as in auto-decoders.
            encoder: optional amortisation, e.g.
                :class:`~metaprior.inference.guides.SetEncoder`: a module
                ``encoder(x [N, D_x], y [N], mask [N]) -> [2 * D]`` applied to each task's
                examples (the model's first argument must then be a ``TaskBatch``-like
                ``(x, y, mask)``); its output is added to the task's ``loc`` and
                ``log_scale``. Its arrays are one shared ``param`` site,
                :attr:`encoder_site`.
        """
        _check_init(init_scale, init_loc_scale)
        sites, num_tasks, plate_dim = cls._layout(rng_key, model, args, kwargs)
        return cls(sites, num_tasks, plate_dim, prefix, init_scale, init_loc_scale, encoder=encoder)

    def _flow_init(self, rng_key):
        return {}

    def _flow(self, flow_params, u):
        return u, jnp.zeros(())

    def _inverse_flow(self, flow_params, u):
        return u, jnp.zeros(())


@dataclasses.dataclass(frozen=True)
class TaskIAFGuide(_TaskGuideBase):
    """Per-task inverse autoregressive flow over the task's local latents (final class).

    ``u_0 = m + s * eps``; then for ``k = 1..K`` with the order reversed between flows,
    ``[mu_k, g_k] = MADE_k(u_{k-1})``, ``sigma_k = sigmoid(g_k)``,
    ``u_k = sigma_k * u_{k-1} + (1 - sigma_k) * mu_k``, and
    ``log q(u_K) = log N(eps) - sum log s - sum_k sum log sigma_k``.

    References:
        Kingma et al. (2016), "Improved Variational Inference with Inverse Autoregressive
        Flow", eq. (10)-(14) (the numerically stable LSTM-style update).
    """

    num_flows: int = 2
    hidden_dim: int = 32

    @classmethod
    def build(
        cls,
        rng_key: jax.Array,
        model: Callable,
        *args: Any,
        num_flows: int = 2,
        hidden_dim: int = 32,
        prefix: str = "q",
        init_scale: float = 0.1,
        init_loc_scale: float = 0.0,
        encoder: Any = None,
        **kwargs: Any,
    ) -> TaskIAFGuide:
        """Trace ``model(*args, **kwargs)`` once and lay out its local latents.

        Args:
            rng_key: key for the prototype trace.
            model: a NumPyro model with a ``plate("tasks")``.
            num_flows: IAF steps per task (0 gives a diagonal Normal).
            hidden_dim: hidden units of each per-task MADE.
            prefix: prefix of the param site names.
            init_scale: initial standard deviation of the base Normal.
            init_loc_scale: spread of the initial base means (see :class:`TaskNormalGuide`).
            encoder: optional amortisation of the base Normal (see :class:`TaskNormalGuide`).
        """
        if num_flows < 0 or hidden_dim < 1:
            raise ValueError(f"need num_flows >= 0 and hidden_dim >= 1, got {num_flows}, {hidden_dim}")
        _check_init(init_scale, init_loc_scale)
        sites, num_tasks, plate_dim = cls._layout(rng_key, model, args, kwargs)
        return cls(
            sites,
            num_tasks,
            plate_dim,
            prefix,
            init_scale,
            init_loc_scale,
            encoder=encoder,
            num_flows=num_flows,
            hidden_dim=hidden_dim,
        )

    def _flow_init(self, rng_key):
        d, h, k, t = self.latent_dim, self.hidden_dim, self.num_flows, self.num_tasks
        if k == 0:
            return {}
        k1, k2 = jax.random.split(rng_key)
        return {
            "iaf_w1": 0.01 * jax.random.normal(k1, (t, k, h, d)),
            "iaf_b1": jnp.zeros((t, k, h)),
            "iaf_w2": 0.01 * jax.random.normal(k2, (t, k, 2 * d, h)),
            # gate bias 2: sigma ~ 0.88 at start, close to the identity (Kingma et al. 2016)
            "iaf_b2": jnp.concatenate([jnp.zeros((t, k, d)), jnp.full((t, k, d), 2.0)], axis=-1),
        }

    def _made(self, p, k: int, u):
        """Flow ``k``'s MADE: ``(mu [D], gate [D])``; output ``i`` depends on ``u[:i]`` only."""
        d = self.latent_dim
        m_in, m_out = _made_masks(d, self.hidden_dim)
        m_out2 = np.concatenate([m_out, m_out], axis=0)
        h = jax.nn.elu((p["iaf_w1"][k] * m_in) @ u + p["iaf_b1"][k])
        out = (p["iaf_w2"][k] * m_out2) @ h + p["iaf_b2"][k]
        return out[:d], out[d:]

    def _flow(self, p, u):
        log_det = jnp.zeros(())
        for k in range(self.num_flows):
            if k % 2 == 1:
                u = u[::-1]
            mu, gate = self._made(p, k, u)
            sigma = jax.nn.sigmoid(gate)
            u = sigma * u + (1.0 - sigma) * mu
            log_det = log_det + jnp.sum(jax.nn.log_sigmoid(gate))
            if k % 2 == 1:
                u = u[::-1]
        return u, log_det

    def _inverse_flow(self, p, u):
        """Invert the flows last to first. Within a flow, ``u_i = mu_i + (u'_i - mu_i) /
        sigma_i`` where ``mu_i, sigma_i`` depend on ``u_{<i}`` only, so the entries are
        solved in order, one MADE pass each (Kingma et al. 2016, sec. 4). Entries not yet
        solved are held at zero, so a masked-out infinity never meets a zero weight."""
        log_det = jnp.zeros(())
        for k in reversed(range(self.num_flows)):
            if k % 2 == 1:
                u = u[::-1]
            v = jnp.zeros_like(u)
            for i in range(self.latent_dim):
                mu, gate = self._made(p, k, v)
                v = v.at[i].set(mu[i] + (u[i] - mu[i]) * jnp.exp(-jax.nn.log_sigmoid(gate[i])))
            _, gate = self._made(p, k, v)
            log_det = log_det + jnp.sum(jax.nn.log_sigmoid(gate))
            u = v[::-1] if k % 2 == 1 else v
        return u, log_det
