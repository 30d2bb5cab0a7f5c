"""Data parallelism across devices and processes with JAX's own runtime.

A one-axis device mesh (``"data"``) carries the batch axis of every step; parameters and optimizer
state are replicated on it, so XLA inserts the all-reduce of the gradients. Across machines,
:func:`initialize_distributed` starts ``jax.distributed``; each process then holds its own rows of
the data (:func:`process_rows`) and :func:`global_rows` joins them into one global array.

Only public JAX APIs are used: ``jax.make_mesh``, ``NamedSharding``,
``jax.make_array_from_process_local_data``, ``jax.make_array_from_callback``,
``jax.distributed`` and ``jax.experimental.multihost_utils``.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import inspect
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet import _checks as checks
from jaxnet import sharding as shardinglib
from jaxnet._checks import ArgumentError
from jaxnet.sharding import replicated

DATA_AXIS = "data"
PEER_TIMEOUT = 30
"""Seconds a multi-process run waits for a peer (to join, to answer its heartbeat, at shutdown)
before every process stops (``initialize_distributed(timeout=)``, ``jaxnet train --peer-timeout``)."""

# jax.distributed.initialize() reads JAX_COORDINATOR_ADDRESS itself and gets the process count and
# index from the cluster managers it detects (SLURM, Open MPI, Cloud TPU, ...); the other two names
# let a plain launcher (or a shell loop) give them too.
_JAX_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def make_data_mesh(devices=None) -> Mesh:
    """A one-axis mesh named ``"data"`` over the devices that share each batch.

    The axis is ``AxisType.Auto`` on purpose: the data-parallel step is written for one device and
    only its inputs carry shardings (batch on ``"data"``, parameters replicated); with Auto axes
    XLA's sharding propagation partitions the whole step from those and inserts the gradient
    all-reduce itself. ``Explicit`` axes would put shardings into the types of every intermediate
    and make ops such as the epoch's permutation gather demand explicit sharding rules.

    Args:
      devices: None or ``"all"`` for every device (of all processes), an int ``n`` for the first
        ``n`` of ``jax.devices()``, or a sequence of devices.

    Returns:
      A :class:`jax.sharding.Mesh` of shape ``(n,)``.
    """
    available = jax.devices()
    if devices is None or devices == "all":
        chosen = available
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if devices <= 0:
            raise ValueError(f"the number of devices must be a positive integer, got {devices}")
        if jax.process_count() > 1 and devices != len(available):
            raise ArgumentError(
                f"a multi-process run trains on all {len(available)} devices of its processes: use {{0}} all", "devices"
            )
        if devices > len(available):
            raise ValueError(
                f"{devices} devices requested but {len(available)} available ({available[0].platform}); "
                "on CPU, emulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N"
            )
        chosen = available[:devices]
    elif isinstance(devices, str):
        raise ValueError(f"devices must be a positive integer or 'all', got {devices!r}")
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices is empty: give at least one device")
    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((len(chosen),), (DATA_AXIS,), axis_types=auto, devices=chosen)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over the mesh's ``"data"`` and ``"fsdp"`` axes (those it has:
    :func:`jaxnet.sharding.batch_axes`); other axes whole."""
    return NamedSharding(mesh, P(shardinglib.batch_axes(mesh)))


def check_batch_size(batch_size: int, n_devices: int) -> None:
    """Raises ValueError unless ``batch_size`` divides evenly over ``n_devices``."""
    if batch_size % n_devices:
        suggestion = math.ceil(batch_size / n_devices) * n_devices
        raise ValueError(
            f"batch size {batch_size} does not divide evenly over {n_devices} devices: "
            f"use a multiple of {n_devices} (e.g. {suggestion})"
        )


def put_replicated(tree, mesh: Mesh):
    """Places every array of ``tree`` whole on every device of ``mesh`` (see
    :func:`jaxnet.sharding.put`; every process must pass the same values). A global array (of
    every process, :func:`global_rows`) keeps its own sharding: its rows stay split."""

    def placement(a):
        kept = isinstance(a, jax.Array) and not a.is_fully_addressable
        return a.sharding if kept else replicated(mesh)

    return shardinglib.put(tree, jax.tree.map(placement, tree))


def constrain_batch(update, mesh: Mesh):
    """Wraps a per-batch ``update(state, batch)`` so that the batch is split over the mesh's batch
    axes (``"data"``, ``"fsdp"``).

    The epoch gathers each minibatch from the whole (replicated or row-sharded) dataset; this
    constraint tells XLA to lay the gathered batch out on the mesh, which makes the forward and
    backward pass data parallel and the gradient mean an all-reduce.
    """
    sharding = batch_sharding(mesh)

    def sharded_update(state, batch):
        return update(state, jax.lax.with_sharding_constraint(batch, sharding))

    return sharded_update


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = PEER_TIMEOUT,
) -> bool:
    """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

    Call it before any other JAX use. Give all three arguments, or none: then the environment
    variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or JAX's
    cluster detection (a SLURM job of several tasks, Open MPI, Cloud TPU) supply them.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      timeout: seconds to wait for every process to join, for a peer's heartbeat and for the
        others at shutdown; past it JAX's runtime stops the process (:mod:`jaxnet.app.supervisor`
        turns that into one line).

    Returns:
      True if initialized from the arguments or the environment, False when there was nothing to
      join (no arguments, no JAX variables set): the run stays single-process.
    """
    how = distributed_request(coordinator, num_processes, process_id)
    checks.integer("timeout", timeout)
    if how is None:
        return False
    timeouts = dict(initialization_timeout=timeout, heartbeat_timeout_seconds=timeout, shutdown_timeout_seconds=timeout)
    accepted = inspect.signature(jax.distributed.initialize).parameters  # (older JAX lacks some of them)
    jax.distributed.initialize(*how, **{k: v for k, v in timeouts.items() if k in accepted})
    return True


def distributed_request(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple | None:
    """The arguments of the multi-process run asked for (``()``: JAX's cluster detection finds
    them), or None for a single-process run; see :func:`initialize_distributed`."""
    if coordinator is None and num_processes is None and process_id is None:
        env = [os.environ.get(name) for name in _JAX_ENV]
        if all(env[1:]):
            coordinator, num_processes, process_id = env[0], _env_int(_JAX_ENV[1]), _env_int(_JAX_ENV[2])
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ArgumentError(
            "multi-process training needs all of {0}, {1} and {2} "
            "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)",
            "coordinator",
            "num_processes",
            "process_id",
        )
    if all(given):
        if ":" not in coordinator:
            raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes <= 0 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"process id {process_id} is out of range for {num_processes} processes: use 0..{num_processes - 1}"
            )
        return coordinator, num_processes, process_id
    if any(os.environ.get(name) for name in _JAX_ENV) or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return ()
    return None


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from None


def is_primary() -> bool:
    """True in process 0, the one that prints and writes files."""
    return jax.process_index() == 0


def process_rows(n: int, process_index: int | None = None, process_count: int | None = None) -> slice:
    """This process's contiguous share of ``n`` rows: ``n // process_count`` rows each.

    The ``n % process_count`` rows left over are dropped, so that every process holds as many rows
    (global arrays are sharded evenly).

    Examples:
      >>> process_rows(10, 1, 3)
      slice(3, 6, None)
    """
    i = jax.process_index() if process_index is None else process_index
    p = jax.process_count() if process_count is None else process_count
    if not 0 <= i < p:
        raise ValueError(f"process index {i} is out of range for {p} processes")
    per = n // p
    if per == 0:
        raise ValueError(f"{n} rows cannot be shared by {p} processes: give at least one row per process")
    return slice(i * per, (i + 1) * per)


def global_rows(local, mesh: Mesh):
    """One global array from each process's rows (:func:`process_rows`), sharded on ``"data"``.

    Args:
      local: this process's ``(m, ...)`` rows; every process passes the same ``m``, divisible by
        its number of local devices in ``mesh``.

    Returns:
      A ``(m * process_count, ...)`` :class:`jax.Array`; the shares lie in the mesh's device
      order, which is process order on the usual meshes.
    """
    local = np.asarray(local)
    n_local = len(mesh.local_devices)
    if local.shape[0] % n_local:
        raise ValueError(
            f"{local.shape[0]} rows in this process do not divide evenly over its {n_local} devices: "
            "use a row count (or number of processes) that does"
        )
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def sync(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds in every process (each passes its own; all must call this together).
    ``ok`` itself in a single process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
