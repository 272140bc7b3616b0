"""The one meta-training loop: jit-compiled Optax steps, atomic checkpoints, resume.

Every method in the library reduces meta-training to a scalar objective
``loss_fn(params, rng_key, batch)``: an ELBO for the NumPyro models, the query NLL
after inner-loop adaptation for MAML, and so on. This module turns that function
and an Optax optimizer into pure ``init`` / ``step`` functions over a
:class:`MetaState` (BlackJAX / Optax style) and runs them with :func:`fit`.

Randomness is explicit and position-based: step ``i`` uses
``jax.random.fold_in(rng_key, i)``. A run stopped after a checkpoint and resumed
therefore ends with bit-for-bit the same parameters as one that was never stopped.

A run may also be limited by time (``fit(..., budget_s=...)``): it stops at the first
compiled call that ends past the budget, and the checkpoint records the seconds spent
and, once the budget is spent, the step it stopped at. A killed run resumes with the
time it had already spent; a finished one, run again, stops where it stopped. Either
way the parameters are those of an uninterrupted run of the same number of steps.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaprior._io import atomic_write_bytes, read_tagged_npz, remove_stale_temporaries

__all__ = [
    "MetaState",
    "MetaInfo",
    "MetaLearner",
    "FitResult",
    "NonFiniteLossError",
    "meta_learner",
    "fit",
    "save_checkpoint",
    "load_checkpoint",
    "TrainingClock",
    "load_clock",
    "progress_enabled",
]

PyTree = Any

_clock = time.perf_counter  # the training clock of ``budget_s`` (a test replaces it)


class MetaState(NamedTuple):
    """Carried state of meta-training.

    Attributes:
        step: number of completed steps (int32 scalar).
        params: the meta-parameters (any pytree of arrays).
        opt_state: the Optax optimizer state.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree


class MetaInfo(NamedTuple):
    """Diagnostics of one step (not carried between steps).

    Attributes:
        loss: the objective at the parameters before the update.
        grad_norm: global L2 norm of the gradient.
        aux: whatever ``loss_fn`` returned as auxiliary output (``None`` if nothing).
    """

    loss: jax.Array
    grad_norm: jax.Array
    aux: PyTree


class MetaLearner(NamedTuple):
    """A pair of pure functions: ``init(params) -> MetaState`` and
    ``step(rng_key, state, batch) -> (MetaState, MetaInfo)``."""

    init: Callable[[PyTree], MetaState]
    step: Callable[[jax.Array, MetaState, PyTree], tuple[MetaState, MetaInfo]]


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
        state: the final :class:`MetaState` (``state.step``: the steps done).
        losses: ``[steps]`` loss per step over the whole run (resumed runs included).
        train_time_s: seconds spent in training steps over the whole run (compilation
            included; resumed runs add the time their checkpoint recorded).
        budget_spent: whether the run stopped because ``budget_s`` ran out.
    """

    state: MetaState
    losses: np.ndarray
    train_time_s: float = 0.0
    budget_spent: bool = False


class TrainingClock(NamedTuple):
    """What a checkpoint records of a run's time (:func:`load_clock`).

    Attributes:
        train_time_s: seconds spent in training steps up to the checkpoint.
        budget_spent: the run's ``budget_s`` ran out at the checkpoint's step, which is
            then where a rerun stops.
    """

    train_time_s: float = 0.0
    budget_spent: bool = False


class NonFiniteLossError(FloatingPointError):
    """Meta-training produced a NaN or infinite loss; the last good checkpoint is intact."""


def meta_learner(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
) -> MetaLearner:
    """Build pure ``init`` / ``step`` functions from an objective and an Optax optimizer.

    Args:
        loss_fn: ``loss_fn(params, rng_key, batch) -> loss`` (a scalar), or
            ``-> (loss, aux)`` when ``has_aux``. Must be jit-able.
        optimizer: any Optax ``GradientTransformation`` (compose clipping, schedules...
            with ``optax.chain`` rather than flags here).
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
        A :class:`MetaLearner`. ``step`` is not jitted here; :func:`fit` jits once at the
        boundary (and so can the caller).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def init(params: PyTree) -> MetaState:
        return MetaState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    def step(rng_key: jax.Array, state: MetaState, batch: PyTree) -> tuple[MetaState, MetaInfo]:
        if has_aux:
            (loss, aux), grads = grad_fn(state.params, rng_key, batch)
        else:
            loss, grads = grad_fn(state.params, rng_key, batch)
            aux = None
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        info = MetaInfo(loss, optax.tree.norm(grads), aux)
        return MetaState(state.step + 1, params, opt_state), info

    return MetaLearner(init, step)


def progress_enabled(progress: bool | None) -> bool:
    """Resolve a ``progress`` argument: ``None`` means on unless ``METAPRIOR_PROGRESS=0``."""
    if progress is not None:
        return bool(progress)
    return os.environ.get("METAPRIOR_PROGRESS", "1") not in ("0", "false", "no")


def _step_key(rng_key: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(rng_key, step)


def fit(
    rng_key: jax.Array,
    learner: MetaLearner,
    params: PyTree,
    num_steps: int,
    *,
    data: PyTree = None,
    sample_batch: Callable[[jax.Array, PyTree], PyTree] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    steps_per_call: int = 1,
    progress: bool | None = None,
    desc: str = "meta-train",
    transform_batch: Callable[[PyTree], PyTree] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    budget_s: float | None = None,
    callback: Callable[[MetaState, float], None] | None = None,
) -> FitResult:
    """Run meta-training for ``num_steps`` steps, or until ``budget_s`` seconds are spent.

    Each step draws ``key_i = fold_in(rng_key, i)``, splits it into a batch key and a
    step key, forms the batch (``sample_batch(batch_key, data)`` inside the compiled
    step, or ``data`` itself when no sampler is given), and applies ``learner.step``.

    Args:
        rng_key: the run's PRNG key.
        learner: from :func:`meta_learner`.
        params: initial meta-parameters (ignored when resuming from a checkpoint).
        num_steps: total number of steps of the run (a resumed run stops here too).
        data: a pytree of arrays passed to every step (e.g. the meta-training set).
        sample_batch: optional jit-able ``(rng_key, data) -> batch`` (e.g. an episode
            sampler), run inside the compiled step, so there is no host round trip.
        checkpoint: a file path. If it exists, training resumes from it; it is
            rewritten atomically every ``checkpoint_every`` steps and at the end.
        checkpoint_every: steps between checkpoints (rounded up to ``steps_per_call``).
        steps_per_call: steps fused into one compiled call with ``lax.scan`` (fewer
            dispatches for small models; NaN checks and checkpoints happen between calls).
        progress: show a progress bar (steps, loss, steps/s); ``None`` means on unless
            the environment sets ``METAPRIOR_PROGRESS=0``.
        desc: the progress bar's label.
        transform_batch: optional host-side hook applied to ``data`` once before training
            (e.g. placing it on a device mesh with ``jax.device_put``).
        mesh: optional device mesh with one ``"tasks"`` axis
            (:func:`metaprior.inference.sharding.task_mesh`). ``data`` and the
            per-task leaves of the state (leading axis the number of tasks in ``data``:
            per-task guide rows and their optimizer moments) are split along it, the
            rest replicated; the batch a step works on is split along its tasks axis.
            The step is the same function; only the layout differs, so results agree
            with ``mesh=None`` up to floating-point reassociation. With several
            processes (``sharding.initialize_distributed``) every process calls ``fit``
            with the same arguments and process 0 writes the checkpoint.
        budget_s: optional training-time budget in seconds (compiled calls, compilation
            included; the clock is checked between calls of ``steps_per_call`` steps). The
            run stops at ``num_steps`` or at the first call that ends past the budget,
            whichever comes first, and checkpoints there. The checkpoint carries the time
            spent: a killed run resumes with what is left, and a run whose budget is spent
            is not trained further when rerun (the same result). ``result.state.step``
            says how many steps it ran; an uninterrupted run of that many steps gives the
            same parameters.
        callback: optional host-side ``callback(state, train_time_s)``, called with the state
            before the first step and after every compiled call (e.g. to keep snapshots of
            the parameters for a learning curve); its own time is not on the training clock.

    Returns:
        :class:`FitResult` with the final state and the per-step losses.

    Raises:
        ValueError: ``num_steps`` or ``steps_per_call`` is not a positive integer, or
            ``budget_s`` is not positive.
        NonFiniteLossError: a step's loss is NaN or infinite. Parameters from that step
            are never written; the checkpoint on disk stays the last good one.
    """
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    if int(steps_per_call) != steps_per_call or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be a positive integer, got {steps_per_call!r}")
    if budget_s is not None and not (np.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"budget_s must be a positive number of seconds or None, got {budget_s!r}")
    from tqdm import tqdm

    state = learner.init(params)
    losses: list[np.ndarray] = []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None:
        remove_stale_temporaries(ckpt_path)  # a run killed while writing its checkpoint
    clock = TrainingClock()
    if ckpt_path is not None and ckpt_path.exists():
        state, history = load_checkpoint(ckpt_path, like=state)
        losses.append(history)
        clock = load_clock(ckpt_path)
    elapsed, spent = clock.train_time_s, budget_s is not None and clock.budget_spent
    if transform_batch is not None and data is not None:
        data = transform_batch(data)
    layout = None
    if mesh is not None:
        from metaprior.inference import sharding

        data, state, layout = sharding.place_on_mesh(mesh, data, state)

    def one(state: MetaState, data: PyTree) -> tuple[MetaState, MetaInfo]:
        batch_key, step_key = jax.random.split(_step_key(rng_key, state.step))
        batch = sample_batch(batch_key, data) if sample_batch is not None else data
        if layout is None:
            return learner.step(step_key, state, batch)
        state, info = learner.step(step_key, state, layout.batch(batch))
        return jax.lax.with_sharding_constraint(state, layout.state), info

    def chunk(state: MetaState, data: PyTree, length: int):
        def body(s, _):
            s, info = one(s, data)
            return s, (info.loss, info.grad_norm)

        return jax.lax.scan(body, state, None, length=length)

    compiled = jax.jit(chunk, static_argnums=2)
    start = int(state.step)
    every = max(steps_per_call, int(np.ceil(checkpoint_every / steps_per_call)) * steps_per_call)
    bar = tqdm(
        total=num_steps,
        initial=min(start, num_steps),
        desc=desc,
        unit="step",
        disable=not progress_enabled(progress),
        mininterval=0.5,
        dynamic_ncols=True,
    )
    last_saved = start
    if callback is not None:
        callback(state, float(elapsed))
    try:
        while int(state.step) < num_steps and not spent:
            length = min(steps_per_call, num_steps - int(state.step))
            tic = _clock()
            new_state, (chunk_loss, chunk_gnorm) = compiled(state, data, length)
            chunk_loss = _inject_nan(np.asarray(chunk_loss), int(state.step))  # waits for the call
            elapsed += _clock() - tic
            if not np.all(np.isfinite(chunk_loss)):
                bad = int(state.step) + int(np.argmax(~np.isfinite(chunk_loss)))
                where = (
                    f"the last good checkpoint {ckpt_path} (step {last_saved}) is intact"
                    if ckpt_path is not None and ckpt_path.exists()
                    else "no checkpoint was written (pass checkpoint= to keep one)"
                )
                raise NonFiniteLossError(
                    f"{desc}: loss became {chunk_loss[bad - int(state.step)]} at step {bad}; "
                    f"stopped without saving that step's parameters; {where}. "
                    "Lower the learning rate, add optax.clip_by_global_norm, or check the data."
                )
            state = new_state
            losses.append(chunk_loss)
            if callback is not None:
                callback(state, float(elapsed))
            bar.update(length)
            bar.set_postfix(loss=f"{float(chunk_loss[-1]):.4g}", refresh=False)
            done = int(state.step)
            spent = budget_s is not None and elapsed >= budget_s and done < num_steps
            if ckpt_path is not None and (done - last_saved >= every or done == num_steps or spent):
                now = TrainingClock(elapsed, spent)
                if layout is None:
                    save_checkpoint(ckpt_path, state, np.concatenate(losses), clock=now)
                else:
                    layout.save(ckpt_path, state, np.concatenate(losses), clock=now)
                last_saved = done
    finally:
        bar.close()
    history = np.concatenate(losses) if losses else np.zeros((0,), np.float32)
    return FitResult(state, history, float(elapsed), bool(spent))


def _inject_nan(chunk_loss: np.ndarray, start: int) -> np.ndarray:
    """Test hook: ``METAPRIOR_TEST_NAN_AT_STEP=N`` makes step N's loss NaN, so every
    experiment's NaN stop can be tested end to end (``tests/test_nan_stop.py``)."""
    at = os.environ.get("METAPRIOR_TEST_NAN_AT_STEP")
    if at is None or not (start <= int(at) < start + len(chunk_loss)):
        return chunk_loss
    chunk_loss = chunk_loss.copy()
    chunk_loss[int(at) - start] = np.nan
    return chunk_loss


# --------------------------------------------------------------------------- checkpoints

_FORMAT = "metaprior-checkpoint-v1"


def _structure(treedef) -> str:
    # Static fields of Equinox modules (activation functions...) print with their memory
    # address, which differs between processes; the structure is the same.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(treedef))


def save_checkpoint(
    path: str | os.PathLike, state: MetaState, losses: np.ndarray | None = None, *, clock: TrainingClock | None = None
) -> None:
    """Write ``state`` (the loss history, and the run's :class:`TrainingClock`) to ``path`` atomically.

    The file is written to a temporary name in the same folder, flushed to disk and
    renamed over ``path``, so a crash leaves either the old checkpoint or the new one,
    never a half-written file.
    """
    leaves, treedef = jax.tree.flatten(state)
    arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["__format__"] = np.array(_FORMAT)
    arrays["__treedef__"] = np.array(_structure(treedef))
    arrays["__losses__"] = np.asarray(losses if losses is not None else np.zeros((0,)), np.float32)
    clock = clock or TrainingClock()
    arrays["__train_time_s__"] = np.asarray(clock.train_time_s, np.float64)
    arrays["__budget_spent__"] = np.asarray(clock.budget_spent)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_clock(path: str | os.PathLike) -> TrainingClock:
    """The :class:`TrainingClock` a checkpoint recorded (zero seconds, budget not spent,
    for a checkpoint written before clocks were recorded)."""
    arrays = read_tagged_npz(Path(path), _FORMAT, label="checkpoint", hint="; delete it to start over")
    seconds = arrays.get("__train_time_s__")
    spent = arrays.get("__budget_spent__")
    return TrainingClock(0.0 if seconds is None else float(seconds), False if spent is None else bool(spent))


def load_checkpoint(path: str | os.PathLike, like: MetaState) -> tuple[MetaState, np.ndarray]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        like: a state with the same structure (e.g. ``learner.init(params)``); its leaves
            give the expected shapes and dtypes.

    Returns:
        ``(state, losses)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a metaprior checkpoint, is corrupt, or does not
            match ``like`` (different model or optimizer); the message says which leaf.
    """
    path = Path(path)
    arrays = read_tagged_npz(path, _FORMAT, label="checkpoint", hint="; delete it to start over")
    like_leaves, treedef = jax.tree.flatten(like)
    if arrays["__treedef__"].item() != _structure(treedef):
        raise ValueError(
            f"checkpoint {path} has a different state structure than this run "
            "(another model, guide or optimizer?); use a new checkpoint path"
        )
    leaves = []
    for i, ref in enumerate(like_leaves):
        value = arrays.get(f"leaf_{i}")
        ref = np.asarray(ref)
        if value is None or value.shape != ref.shape or value.dtype != ref.dtype:
            got = "missing" if value is None else f"{value.shape} {value.dtype}"
            raise ValueError(f"checkpoint {path}: leaf {i} is {got}, this run expects {ref.shape} {ref.dtype}")
        leaves.append(jnp.asarray(value))
    return jax.tree.unflatten(treedef, leaves), arrays["__losses__"]
