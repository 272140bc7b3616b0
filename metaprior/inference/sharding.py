"""The tasks plate across devices and machines.

Meta-learning parallelises over tasks: every per-task quantity (a task's data, its
latent, its adapted parameters, its curvature factors, the per-task rows of a guide)
is independent of the other tasks given the global parameters. This module lays
those arrays out along one device-mesh axis named ``"tasks"`` with
:class:`jax.sharding.NamedSharding`, replicates everything else (the global
parameters, the optimizer's scalars), and lets JAX's SPMD partitioner split the
compiled step. Nothing in a model or a loss changes: a sharded array computes the
same numbers as an unsharded one, so the same step runs on one device and on many.

The rule for "per-task" is one line: a leaf is per-task when its leading axis has
length ``num_tasks`` (the size of the ``"tasks"`` plate, e.g. the number of
meta-training tasks, or the task batch inside a step). A global array whose leading
axis happens to have that length is sharded too; that changes its layout, never
its value.

Typical use (one process, several devices)::

    mesh = task_mesh()                       # all devices on one "tasks" axis
    result = fit(rng_key, learner, params, num_steps, data=train, mesh=mesh)

or by hand, with the same functions :func:`~metaprior.inference.meta.fit` uses::

    data = shard_tasks(train, mesh)          # [tasks, ...] rows spread over devices
    state = shard_tasks(learner.init(params), mesh, num_tasks=infer_num_tasks(train))
    step = jax.jit(learner.step)             # the partitioner follows the layouts

Several machines: call :func:`initialize_distributed` first thing in every process
(before any other JAX call); :func:`task_mesh` then spans the devices of all
processes and the code above runs unchanged (see ``docs/scaling.md``).

NumPyro models whose task batch is drawn inside the model
(``plate("tasks", N, subsample_size=B)``) can also pin the subsampled per-task
values to the mesh with the :class:`shard_plate` effect handler.

References:
    GSPMD: Xu et al. 2021, "GSPMD: General and Scalable Parallelization for ML
    Computation Graphs" (the partitioner behind ``jax.jit`` on sharded arrays).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpyro.primitives import Messenger

__all__ = [
    "TASKS",
    "DistributedInfo",
    "task_mesh",
    "infer_num_tasks",
    "task_shardings",
    "shard_tasks",
    "replicate",
    "constrain_tasks",
    "to_host",
    "MeshLayout",
    "place_on_mesh",
    "shard_plate",
    "initialize_distributed",
]

PyTree = Any

TASKS = "tasks"
"""The mesh axis (and plate) name along which per-task arrays are split."""


def task_mesh(devices: Sequence[jax.Device] | None = None, *, axis_name: str = TASKS) -> Mesh:
    """A one-dimensional device mesh with a single ``"tasks"`` axis.

    The axis is of the ``Auto`` type, so the SPMD partitioner propagates layouts
    through gathers, scatters and ``vmap``-ed per-task code without annotations.

    Args:
        devices: the devices to use, in order; default ``jax.devices()`` (every device
            of every process once :func:`initialize_distributed` has run).
        axis_name: the mesh axis name.

    Returns:
        A :class:`jax.sharding.Mesh` of shape ``[len(devices)]``.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("task_mesh: devices is empty")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,))


def infer_num_tasks(tree: PyTree) -> int | None:
    """The leading-axis length of the first array leaf with at least one axis.

    For a task batch (``TaskBatch(x [T, N, ...], y [T, N], mask [T, N])``) this is
    ``T``; ``None`` when no leaf has an axis.
    """
    for leaf in jax.tree.leaves(tree):
        shape = _shape(leaf)
        if len(shape) >= 1:
            return int(shape[0])
    return None


def _shape(leaf) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)  # arrays and jax.ShapeDtypeStruct
    return tuple(shape) if shape is not None else np.shape(leaf)


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(
            f"expected a one-axis mesh (from task_mesh), got axes {mesh.axis_names}; "
            "pass a mesh whose only axis is the tasks axis"
        )
    return mesh.axis_names[0]


def _resolve(tree: PyTree, mesh: Mesh, count: int | None, what: str) -> int | None:
    count = infer_num_tasks(tree) if count is None else int(count)
    size = mesh.devices.size
    if count is not None and count % size:
        raise ValueError(
            f"{what}: the tasks axis has length {count}, which is not a multiple of the "
            f"{size} devices of the mesh; choose num_tasks (and the task batch size) as a "
            f"multiple of {size}"
        )
    return count


def task_shardings(tree: PyTree, mesh: Mesh, *, num_tasks: int | None = None) -> PyTree:
    """The :class:`NamedSharding` of every leaf of ``tree`` (same structure).

    Args:
        tree: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
        mesh: from :func:`task_mesh`.
        num_tasks: the tasks-axis length; leaves whose leading axis has this length are
            split along the mesh axis, the rest replicated. ``None``: inferred with
            :func:`infer_num_tasks` (right for a task batch, not for a parameter pytree).

    Raises:
        ValueError: the mesh has more than one axis, or ``num_tasks`` is not a multiple
            of the number of devices.
    """
    axis = _axis(mesh)
    count = _resolve(tree, mesh, num_tasks, "task_shardings")
    split, whole = NamedSharding(mesh, PartitionSpec(axis)), NamedSharding(mesh, PartitionSpec())

    def one(leaf):
        shape = _shape(leaf)
        return split if count is not None and len(shape) >= 1 and shape[0] == count else whole

    return jax.tree.map(one, tree)


def _put(leaf, sharding: NamedSharding):
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
        return leaf
    if sharding.is_fully_addressable:
        return jax.device_put(leaf, sharding)
    # Several processes: every process holds the same host value (keyed generators make
    # that free) and contributes only the rows its devices own.
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_tasks(tree: PyTree, mesh: Mesh, *, num_tasks: int | None = None) -> PyTree:
    """Place ``tree`` on ``mesh``: per-task leaves split along ``"tasks"``, the rest replicated.

    Use it on the meta-training set (``[tasks, ...]`` arrays), on a task batch, and on
    a :class:`~metaprior.inference.meta.MetaState` (with ``num_tasks`` the size of the
    tasks plate, so the per-task guide rows and their optimizer moments are split and
    the global parameters replicated).

    In a multi-process run every process passes the same value; each one keeps only
    the rows of its own devices (``jax.make_array_from_callback``).

    Args:
        tree: a pytree of arrays (host NumPy or JAX).
        mesh: from :func:`task_mesh`.
        num_tasks: see :func:`task_shardings`.

    Returns:
        The same pytree of global :class:`jax.Array`.
    """
    return jax.tree.map(_put, tree, task_shardings(tree, mesh, num_tasks=num_tasks))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every leaf of ``tree`` on every device of ``mesh`` (global parameters)."""
    whole = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda leaf: _put(leaf, whole), tree)


def constrain_tasks(tree: PyTree, mesh: Mesh, *, num_tasks: int | None = None) -> PyTree:
    """Inside a traced function: pin per-task leaves to the ``"tasks"`` axis.

    :func:`jax.lax.with_sharding_constraint` on every leaf with the layout of
    :func:`task_shardings`. Use it on values the partitioner cannot see are per-task,
    e.g. a task batch gathered from the meta-training set by an episode sampler, so
    the ``vmap`` over tasks that follows (inner loops, adapted parameters, curvature
    factors) is split across devices instead of replicated.

    Raises:
        ValueError: as :func:`task_shardings`.
    """
    return jax.lax.with_sharding_constraint(tree, task_shardings(tree, mesh, num_tasks=num_tasks))


def to_host(tree: PyTree) -> PyTree:
    """Every leaf as a whole NumPy array on this host (e.g. to write a checkpoint).

    With several processes an array is split over machines; this gathers it
    (``multihost_utils.process_allgather``), so every process must call it.
    """
    from jax.experimental import multihost_utils

    def one(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(one, tree)


class MeshLayout(NamedTuple):
    """How :func:`~metaprior.inference.meta.fit` lays a run out on a mesh.

    Attributes:
        mesh: the device mesh.
        state: the :class:`NamedSharding` of every leaf of the carried state; the
            compiled step pins its output state to it, so the layout never drifts.
    """

    mesh: Mesh
    state: PyTree

    def batch(self, batch: PyTree) -> PyTree:
        """Inside the step: split the task batch along ``"tasks"`` (see :func:`constrain_tasks`).

        A batch whose tasks axis is not a multiple of the device count is left to the
        partitioner (correct, but each device then works on every task).
        """
        count = infer_num_tasks(batch)
        if count is None:
            return batch
        if count % self.mesh.devices.size:
            warnings.warn(
                f"task batch of {count} tasks is not a multiple of the {self.mesh.devices.size} "
                "devices; it is not split across them",
                stacklevel=2,
            )
            return batch
        return constrain_tasks(batch, self.mesh, num_tasks=count)

    def save(self, path: str | os.PathLike, state: PyTree, losses: np.ndarray, clock=None) -> None:
        """Write a checkpoint of ``state``: every process gathers it, process 0 writes."""
        from metaprior.inference.meta import save_checkpoint

        host = to_host(state)
        if jax.process_index() == 0:
            save_checkpoint(path, host, losses, clock=clock)


def place_on_mesh(mesh: Mesh, data: PyTree, state: PyTree) -> tuple[PyTree, PyTree, MeshLayout]:
    """Place the meta-training set and the carried state of a run on ``mesh``.

    The number of tasks is the leading-axis length of ``data``
    (:func:`infer_num_tasks`). ``data`` is split along it, and so is every leaf of
    ``state`` with that leading length (per-task guide rows and their optimizer
    moments); the rest is replicated. Leaves of ``data`` that already live on ``mesh``
    (placed by the caller, e.g. an image set kept whole with :func:`replicate`) are
    left as they are. When the number of tasks is not a multiple of the device count,
    everything is replicated, with a warning.

    Returns:
        ``(data, state, layout)``.
    """
    count = infer_num_tasks(data)
    if count is not None and count % mesh.devices.size:
        warnings.warn(
            f"the meta-training set has {count} tasks, not a multiple of the "
            f"{mesh.devices.size} devices; per-task arrays are replicated, not split",
            stacklevel=3,
        )
        count = None
    if data is not None:
        target = (
            task_shardings(data, mesh, num_tasks=count)
            if count is not None
            else jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), data)
        )
        data = jax.tree.map(lambda leaf, where: leaf if _on_mesh(leaf, mesh) else _put(leaf, where), data, target)
    state = shard_tasks(state, mesh, num_tasks=count) if count is not None else replicate(state, mesh)
    return data, state, MeshLayout(mesh, jax.tree.map(lambda leaf: leaf.sharding, state))


def _on_mesh(leaf, mesh: Mesh) -> bool:
    sharding = getattr(leaf, "sharding", None)
    return isinstance(sharding, NamedSharding) and sharding.mesh == mesh


class shard_plate(Messenger):
    """Effect handler: split the values of a plate's sample sites across a mesh.

    For every sample site inside ``plate(name)`` (latents, and observed sites whose
    data was subsampled by that plate), the value is constrained with
    :func:`jax.lax.with_sharding_constraint` to be split along the plate's batch
    dimension. Everything computed from those values (the network applied per task,
    log-densities) then runs split across devices, also when the task batch is drawn
    inside the model by ``plate("tasks", N, subsample_size=B)``. Values whose plate
    dimension is not a multiple of the device count are left alone.

    Usage::

        loss_fn = elbo_loss(shard_plate(model, mesh), guide)

    Args:
        fn: the model (or guide) to wrap.
        mesh: from :func:`task_mesh`.
        name: the plate to split; ``"tasks"`` by default.
    """

    def __init__(self, fn=None, mesh: Mesh | None = None, name: str = TASKS):
        if mesh is None:
            raise ValueError("shard_plate needs a mesh (from task_mesh)")
        self.mesh = mesh
        self.axis = _axis(mesh)
        self.name = name
        super().__init__(fn)

    def postprocess_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg.get("value") is None:
            return
        frame = next((f for f in msg.get("cond_indep_stack", ()) if f.name == self.name), None)
        if frame is None:
            return
        value = msg["value"]
        shape = _shape(value)
        dim = len(shape) - _event_dim(msg) + frame.dim
        if not 0 <= dim < len(shape) or shape[dim] % self.mesh.devices.size or shape[dim] == 1:
            return
        spec = [None] * len(shape)
        spec[dim] = self.axis
        msg["value"] = jax.lax.with_sharding_constraint(value, NamedSharding(self.mesh, PartitionSpec(*spec)))


def _event_dim(msg: dict) -> int:
    fn = msg.get("fn")
    return len(getattr(fn, "event_shape", ()))


class DistributedInfo(NamedTuple):
    """Where this process stands after :func:`initialize_distributed`.

    Attributes:
        process_index: this process (0 is the coordinator and writes checkpoints).
        process_count: number of processes.
        local_device_count: devices attached to this process.
        device_count: devices of all processes (the size of :func:`task_mesh`).
    """

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> DistributedInfo:
    """Join a multi-process (multi-machine) run: :func:`jax.distributed.initialize`.

    Call it first thing in every process, before any other JAX call. Arguments left
    ``None`` are read from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``, and otherwise detected by JAX on SLURM, Open MPI, Kubernetes
    and Cloud TPU. On CPU the processes talk through Gloo (JAX's default CPU
    collectives).

    Args:
        coordinator_address: ``"host:port"`` of process 0, reachable from every process.
        num_processes: the number of processes.
        process_id: this process's index, ``0 <= process_id < num_processes``.
        **kwargs: passed to :func:`jax.distributed.initialize` (``local_device_ids``,
            ``initialization_timeout`` ...).

    Returns:
        A :class:`DistributedInfo`.
    """
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    return DistributedInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
