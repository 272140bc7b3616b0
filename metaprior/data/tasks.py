"""Keyed generators of synthetic regression tasks, as fixed-shape arrays with masks.

Everything here is a pure function of an explicit ``rng_key``; counts are static
(Python ints), so the generators are jit-able and can run inside a training step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TaskBatch",
    "HarmonicParams",
    "SinusoidParams",
    "harmonic_tasks",
    "harmonic_fn",
    "harmonic_second_moment",
    "sinusoid_tasks",
    "sinusoid_fn",
    "sinusoid_support_query",
    "sinusoid_meta_batch",
    "SupportQuery",
    "split_support_query",
    "check_task_batch",
]


class TaskBatch(NamedTuple):
    """A batch of regression tasks with a fixed number of example slots.

    Attributes:
        x: inputs ``[tasks, examples, features]``.
        y: targets ``[tasks, examples]``, or ``None`` (the model then samples them).
        mask: ``[tasks, examples]`` bool; ``False`` marks padding slots of tasks with
            fewer examples. Padding never enters a likelihood.
    """

    x: jax.Array
    y: jax.Array | None
    mask: jax.Array

    @property
    def num_tasks(self) -> int:
        return self.x.shape[0]

    @property
    def num_examples(self) -> int:
        return self.x.shape[1]


class SupportQuery(NamedTuple):
    """A batch of tasks, each with a support and a query set.

    Attributes:
        support_x: ``[tasks, support, ...]``.
        support_y: ``[tasks, support, ...]``.
        query_x: ``[tasks, query, ...]``.
        query_y: ``[tasks, query, ...]``.
    """

    support_x: jax.Array
    support_y: jax.Array
    query_x: jax.Array
    query_y: jax.Array


class HarmonicParams(NamedTuple):
    """True parameters of harmonic tasks, each ``[tasks]``."""

    omega: jax.Array
    b1: jax.Array
    b2: jax.Array
    a1: jax.Array
    a2: jax.Array
    mu_x: jax.Array


class SinusoidParams(NamedTuple):
    """True parameters of sinusoid tasks, each ``[tasks]``."""

    amplitude: jax.Array
    phase: jax.Array


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _count_mask(rng_key: jax.Array, num_tasks: int, num_examples: int, min_examples: int | None) -> jax.Array:
    if min_examples is None:
        return jnp.ones((num_tasks, num_examples), bool)
    if not 1 <= min_examples <= num_examples:
        raise ValueError(f"min_examples must be in [1, num_examples={num_examples}], got {min_examples}")
    counts = jax.random.randint(rng_key, (num_tasks,), min_examples, num_examples + 1)
    return jnp.arange(num_examples)[None, :] < counts[:, None]


def harmonic_fn(params: HarmonicParams, x: jax.Array) -> jax.Array:
    """``f(x) = a1 sin(w x + b1) + a2 sin(2 w x + b2)``; ``x: [tasks, n]`` -> ``[tasks, n]``."""
    w = params.omega[:, None]
    return params.a1[:, None] * jnp.sin(w * x + params.b1[:, None]) + params.a2[:, None] * jnp.sin(
        2 * w * x + params.b2[:, None]
    )


def harmonic_second_moment(noise_std: float = 0.05) -> float:
    """``E[y^2]`` at any input of :func:`harmonic_tasks`, exactly: the zero predictor's expected MSE.

    With the phases ``b1, b2 ~ U(0, 2 pi)`` independent, ``E[sin^2(w x + b)] = 1/2`` and the
    cross term vanishes at every ``x`` and ``w``, so ``E[f(x)^2] = (E a1^2 + E a2^2) / 2 = 1``;
    the noise adds ``noise_std^2``.
    """
    return 1.0 + noise_std**2


def harmonic_tasks(
    rng_key: jax.Array,
    num_tasks: int,
    num_examples: int,
    *,
    min_examples: int | None = None,
    noise_std: float = 0.05,
) -> tuple[TaskBatch, HarmonicParams]:
    """Harmonic signals of "Learning a Rich Prior" (Lacoste et al. 2018, section 4.1).

    ``f(x) = a1 sin(w x + b1) + a2 sin(2 w x + b2)`` with ``w ~ U(5, 7)``,
    ``(b1, b2) ~ U(0, 2 pi)^2``, ``(a1, a2) ~ N(0, 1)^2``; inputs ``x ~ N(mu_x, 1)`` with
    ``mu_x ~ U(-4, 4)`` per task; ``y ~ N(f(x), noise_std^2)``.

    Args:
        rng_key: PRNG key.
        num_tasks: number of tasks.
        num_examples: example slots per task (the maximum count).
        min_examples: if given, each task has a uniform count in
            ``[min_examples, num_examples]`` and the rest is masked (the paper's
            meta-training set uses 4 to 50).
        noise_std: observation noise (the paper does not state it; 0.05 sits inside the
            model's noise range ``[0.001, 0.101]``).

    Returns:
        ``(TaskBatch(x [T, N, 1], y [T, N], mask [T, N]), HarmonicParams)``.
    """
    _check_counts(num_tasks=num_tasks, num_examples=num_examples)
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    k = jax.random.split(rng_key, 8)
    t = (num_tasks,)
    params = HarmonicParams(
        omega=jax.random.uniform(k[0], t, minval=5.0, maxval=7.0),
        b1=jax.random.uniform(k[1], t, maxval=2 * math.pi),
        b2=jax.random.uniform(k[2], t, maxval=2 * math.pi),
        a1=jax.random.normal(k[3], t),
        a2=jax.random.normal(k[4], t),
        mu_x=jax.random.uniform(k[5], t, minval=-4.0, maxval=4.0),
    )
    x = params.mu_x[:, None] + jax.random.normal(k[6], (num_tasks, num_examples))
    y = harmonic_fn(params, x) + noise_std * jax.random.normal(k[7], x.shape)
    mask = _count_mask(jax.random.fold_in(rng_key, 1), num_tasks, num_examples, min_examples)
    return TaskBatch(x[..., None], y, mask), params


def sinusoid_fn(params: SinusoidParams, x: jax.Array) -> jax.Array:
    """``f(x) = A sin(x - phase)``; ``x: [tasks, n]`` -> ``[tasks, n]`` (Finn et al. 2017)."""
    return params.amplitude[:, None] * jnp.sin(x - params.phase[:, None])


def sinusoid_tasks(
    rng_key: jax.Array,
    num_tasks: int,
    num_examples: int,
    *,
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
    noise_std: float = 0.0,
) -> tuple[TaskBatch, SinusoidParams]:
    """The sinusoid family of MAML (Finn et al. 2017, section 5.1).

    Amplitude ``U(0.1, 5)``, phase ``U(0, pi)``, ``x ~ U(-5, 5)``, noiseless by default.

    Returns:
        ``(TaskBatch(x [T, N, 1], y [T, N], mask [T, N] all True), SinusoidParams)``.
    """
    _check_counts(num_tasks=num_tasks, num_examples=num_examples)
    k = jax.random.split(rng_key, 4)
    params = SinusoidParams(
        amplitude=jax.random.uniform(k[0], (num_tasks,), minval=amplitude[0], maxval=amplitude[1]),
        phase=jax.random.uniform(k[1], (num_tasks,), minval=phase[0], maxval=phase[1]),
    )
    x = jax.random.uniform(k[2], (num_tasks, num_examples), minval=x_range[0], maxval=x_range[1])
    y = sinusoid_fn(params, x) + noise_std * jax.random.normal(k[3], x.shape)
    return TaskBatch(x[..., None], y, jnp.ones(x.shape, bool)), params


def sinusoid_support_query(
    rng_key: jax.Array,
    num_tasks: int,
    num_support: int,
    num_query: int,
    *,
    support_range: tuple[float, float] = (-5.0, 5.0),
) -> tuple[SupportQuery, SinusoidParams]:
    """New sinusoid tasks: ``num_support`` noiseless support points drawn from
    ``support_range`` and ``num_query`` query points from the whole range ``[-5, 5]``
    (a narrower ``support_range`` makes ambiguous tasks, Grant et al. 2018 Figure 5)."""
    k_task, k_sup = jax.random.split(rng_key)
    batch, params = sinusoid_tasks(k_task, num_tasks, num_query)
    sx = jax.random.uniform(k_sup, (num_tasks, num_support, 1), minval=support_range[0], maxval=support_range[1])
    return SupportQuery(sx, sinusoid_fn(params, sx[..., 0]), batch.x, batch.y), params


def sinusoid_meta_batch(rng_key: jax.Array, num_tasks: int, num_support: int) -> SupportQuery:
    """MAML's training batch: ``num_tasks`` sinusoid tasks of ``2 * num_support`` points,
    the first half support and the second query."""
    batch, _ = sinusoid_tasks(rng_key, num_tasks, 2 * num_support)
    k = num_support
    return SupportQuery(batch.x[:, :k], batch.y[:, :k], batch.x[:, k:], batch.y[:, k:])


def split_support_query(batch: TaskBatch, num_support: int) -> tuple[TaskBatch, TaskBatch]:
    """Split every task's example slots into the first ``num_support`` and the rest."""
    n = batch.num_examples
    if not 1 <= num_support < n:
        raise ValueError(f"num_support must be in [1, {n - 1}] for {n} example slots, got {num_support}")

    def part(sl):
        return TaskBatch(batch.x[:, sl], None if batch.y is None else batch.y[:, sl], batch.mask[:, sl])

    return part(slice(0, num_support)), part(slice(num_support, n))


def check_task_batch(
    batch: TaskBatch, *, name: str = "batch", x_dim: int | None = None, require_y: bool = False
) -> None:
    """Validate a :class:`TaskBatch` eagerly; raise ``ValueError`` naming what is wrong.

    Checks shapes (``x [T, N, D]``, ``y [T, N]``, ``mask [T, N]``), that no task is empty
    (every task has at least one unmasked example), and that no unmasked value is NaN or
    infinite. Skipped automatically under tracing (values are unknown then).
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"{name} must be a TaskBatch, got {type(batch).__name__}")
    x, y, mask = batch
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"{name}.x must have shape [tasks, examples, features], got {getattr(x, 'shape', x)}")
    if x_dim is not None and x.shape[-1] != x_dim:
        raise ValueError(f"{name}.x has {x.shape[-1]} features, the model expects {x_dim}")
    if mask is None:
        raise ValueError(
            f"{name}.mask is None: pass a boolean [tasks, examples] mask of the observed slots "
            f"(jnp.ones({tuple(x.shape[:2])}, bool) when every example is observed)"
        )
    if getattr(mask, "shape", None) != x.shape[:2]:
        raise ValueError(
            f"{name}.mask must have shape {x.shape[:2]}, got {getattr(mask, 'shape', type(mask).__name__)}"
        )
    if y is None:
        if require_y:
            raise ValueError(f"{name}.y is None but observations are required here")
    elif y.shape != x.shape[:2]:
        raise ValueError(f"{name}.y must have shape {x.shape[:2]} (tasks, examples), got {y.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: x has shape {x.shape}")
    if isinstance(x, jax.core.Tracer) or isinstance(mask, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
        return
    m = np.asarray(mask, bool)
    empty = np.flatnonzero(~m.any(axis=1))
    if empty.size:
        raise ValueError(f"{name}: task(s) {empty[:5].tolist()} have an empty support set (mask all False)")
    bad_x = ~np.isfinite(np.asarray(x)).all(axis=-1) & m
    if bad_x.any():
        t, n = np.argwhere(bad_x)[0]
        raise ValueError(
            f"{name}.x contains NaN or infinite values (first at task {t}, example {n}: {np.asarray(x)[t, n].tolist()})"
        )
    if y is not None:
        bad_y = ~np.isfinite(np.asarray(y)) & m
        if bad_y.any():
            t, n = np.argwhere(bad_y)[0]
            raise ValueError(
                f"{name}.y contains NaN or infinite values (first at task {t}, example {n}: "
                f"{float(np.asarray(y)[t, n])})"
            )
