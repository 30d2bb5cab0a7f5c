"""A step's gradient from parts of its batch: microbatches one after the other, or parts summed in
a fixed order whatever the number of devices.

Both split a batch of ``b`` examples into ``k`` parts, take each part's mean loss and gradient
(``value_and_grad`` of the step's objective), weigh them by the part's weight (its examples, or its
real tokens) and divide the sums by the total weight once: the batch's mean, from parts.

- :func:`accumulated` (``accumulate=k``) runs the ``k`` microbatches one after the other in a
  ``lax.scan`` and keeps one float32 sum: the memory of one microbatch's activations.
- :func:`invariant` (``device_invariant=k``) makes the result the same to the bit on any number
  ``n`` of devices that divides ``k``: in one process, and across processes that start JAX with the
  same CPU threads (:func:`same_cpu_threads`).

Why a data-parallel step is not bitwise the same on another device count, and what
``device_invariant`` does about each cause (all measured on XLA's CPU backend):

1. The gradient's sums run in another order: each device sums its rows inside its matmuls, then
   XLA's all-reduce sums the devices' partials. Here each device computes the gradients of its own
   ``k / n`` parts one at a time, in a loop over parts of ``b / k`` rows (``shard_map``: the same
   computation on the same shapes on every device count), and the ``k`` gradients are added in one
   binary tree (part 0 + part 1, part 2 + part 3, then those sums, ...): each device adds the
   subtree of its parts after its loop, and the devices' subtrees are added by elementwise
   additions of slices, which no partitioner reorders.
2. XLA compiles the same arithmetic differently in another program: it fuses operations with their
   neighbours, and its CPU backend contracts a multiplication and an addition in one fusion into a
   fused multiply-add, which rounds once instead of twice. So the parts' loop has a trip count XLA
   cannot see (a count of one would be inlined into the program around it), and the optimizer's
   update runs :func:`alone`, as the body of a loop that runs once: XLA fuses nothing across a
   loop's body.
3. Across processes, XLA's CPU runtime runs one compiled matmul with other bits: its intra-op
   thread pool has ``max(NPROC or the cores, devices)`` threads, and Eigen splits a long sum over
   them by their number. :func:`same_cpu_threads` gives every process the same pool.
4. In shards, the optimizer's update is partitioned by XLA, with the global norm of gradient
   clipping summed per shard and then across devices. So a ``device_invariant`` fit keeps the
   params and the optimizer state whole on every device (:func:`jaxnet.fit`), and the gradient is
   replicated before the update.

The cost: parts of ``b / k`` rows (smaller matmuls), a replicated gradient (an all-gather of the
devices' partial gradients where XLA would reduce-scatter one) and a replicated state: a mesh's
``fsdp`` axis still splits each batch, but no longer the params.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnet import sharding as shardinglib
from jaxnet._checks import ArgumentError, literal
from jaxnet.base import Batch
from jaxnet.losses import has_token_axis

ValueAndGrad = Callable  # (params, model_state, batch, key) -> ((loss, (model_state, predictions, count)), grads)


def unpack(batch: Batch):
    """``(x, y)`` or ``(x, y, weights)`` -> ``(x, y, weights or None)``."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise TypeError("a batch is a tuple (x, y) or (x, y, weights) with a leading example axis")
    x, y, *rest = batch
    return x, y, (rest[0] if rest else None)


def _part_sums(value_and_grad: ValueAndGrad, params, model_state, part: tuple, key):
    """One part's weighted sums ``(loss * w, w, grads * w)`` (float32), its model state and
    predictions, where ``w`` is its weight: its real tokens, else its examples' weights or rows."""
    (mean, (model_state, predictions, count)), grads = value_and_grad(params, model_state, part, key)
    if count is None:  # examples: the part's weight is its rows' (or their weights')
        count = jnp.sum(part[2]) if len(part) == 3 else jnp.asarray(part[0].shape[0])
    count = jnp.asarray(count, jnp.float32)
    sums = (count * mean.astype(jnp.float32), count, jax.tree.map(lambda g: count * g.astype(jnp.float32), grads))
    return sums, model_state, predictions


def _mean(sums, params, y, model_state, predictions):
    """The batch's ``((loss, (model_state, predictions, count)), grads)`` from the summed parts."""
    total, weight, grads = sums
    scale = jnp.where(weight > 0, 1.0 / jnp.maximum(weight, 1e-30), 0.0)
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
    count = weight if has_token_axis(y) else None
    return (total * scale, (model_state, predictions, count)), grads


def accumulated(objective: Callable, k: int) -> ValueAndGrad:
    """``objective``'s value and gradient over ``k`` microbatches, one after the other (``lax.scan``):
    microbatch ``m`` holds rows ``m, m + k, ...``, so that each device's rows stay on it. A stateful
    model's state is threaded through them, and each draws its own key (``fold_in(key, m)``)."""
    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def split(a):  # (b, ...) -> (k, b / k, ...): microbatch m holds rows m, m + k, ...
        if a.shape[0] % k:
            raise ValueError(f"accumulate {k} does not divide the batch of {a.shape[0]} examples")
        return jnp.swapaxes(jnp.reshape(a, (a.shape[0] // k, k, *a.shape[1:])), 0, 1)

    def join(a):  # the inverse of split
        return jnp.reshape(jnp.swapaxes(a, 0, 1), (-1, *a.shape[2:]))

    def value_and_grads(params, model_state, batch, key):
        x, y, w = unpack(batch)
        parts = jax.tree.map(split, (x, y) if w is None else (x, y, w))

        def micro(carry, inputs):
            m, part = inputs
            sums, state = carry
            sub = None if key is None else jax.random.fold_in(key, m)
            more, state, predictions = _part_sums(value_and_grad, params, state, part, sub)
            return (jax.tree.map(jnp.add, sums, more), state), predictions

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), _zeros(params))
        (sums, model_state), predictions = jax.lax.scan(micro, (zeros, model_state), (jnp.arange(k), parts))
        return _mean(sums, params, y, model_state, jax.tree.map(join, predictions))

    return value_and_grads


def _zeros(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def check_parts(k, devices: int, mesh: Mesh | None = None) -> int:
    """``device_invariant``'s ``k``: a power of two that the ``devices`` splitting each batch divide,
    on a mesh without a ``"model"`` axis larger than one (whose matmuls sum across devices)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k & (k - 1):
        raise ArgumentError(f"{{0}} must be a power of two (1, 2, 4, 8, ...), got {literal(k)}", "device_invariant")
    if k % devices:
        counts = [str(1 << i) for i in range(k.bit_length())]
        counts = " or ".join(counts) if len(counts) < 3 else ", ".join(counts[:-1]) + " or " + counts[-1]
        new = f" (a new run may instead give {{0}} {devices})" if devices & (devices - 1) == 0 else ""
        raise ArgumentError(
            f"{{0}} {k} is not divisible by the {devices} devices that split each batch: split it over {counts} "
            f"device{'s' if k > 1 else ''}{new}",
            "device_invariant",
        )
    if mesh is not None and mesh.shape.get("model", 1) > 1:
        raise ArgumentError(
            "{0}: a 'model' axis splits each matmul's sums over devices, in an order that depends on its size: "
            "give {1} 'data' and 'fsdp' axes only",
            "device_invariant",
            "mesh",
        )
    return int(k)


THREADS_ENV = "NPROC"
"""Read by XLA's CPU client when JAX starts it: its intra-op thread pool has ``max(NPROC, devices)``
threads (``NPROC`` unset: the cores this process may run on)."""


def same_cpu_threads(k: int) -> bool:
    """Gives XLA's CPU runtime ``max(k, cores)`` intra-op threads in this process (``NPROC``), as
    in every other process of a ``device_invariant=k`` run on this machine, whatever its device
    count (at most ``k``): Eigen splits a matmul's long sums over the pool's threads by their
    number, so a process of 8 emulated devices (8 threads) and one of 1 (2 threads, on 2 cores)
    round some of the same matmul's sums differently. Call it before JAX's first use of a device
    (the CLI does); an ``NPROC`` the user set is kept. Returns whether the pool will have that size:
    False when JAX's backend had already started, or ``NPROC`` was set otherwise."""
    want = str(max(k, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    started = _backend_started()
    if not started:
        os.environ.setdefault(THREADS_ENV, want)
    return not started and os.environ[THREADS_ENV] == want


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another JAX: assume not (the docs say when to call)
        return False


def invariant(objective: Callable, k: int, mesh: Mesh) -> ValueAndGrad:
    """``objective``'s value and gradient over ``k`` parts of ``b / k`` consecutive rows, summed in one
    binary tree: bitwise the same on any number of ``mesh``'s batch devices dividing ``k`` (see the
    module docstring). Part ``j`` draws the key ``fold_in(key, j)``; a model with a state
    (batch norm's statistics) is refused, as its parts on different devices cannot
    thread it in order."""
    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    axes = shardinglib.batch_axes(mesh)
    check_parts(k, shardinglib.batch_devices(mesh), mesh)
    rows, whole = P(axes), NamedSharding(mesh, P())

    def local(params, model_state, key, ids, part):  # on one device: its g = k / n parts, ids (g,)
        def one(i, piece):  # part i of this device's: its weighted sums and predictions
            sub = None if key is None else jax.random.fold_in(key, ids[i])
            sums, _, predictions = _part_sums(value_and_grad, params, model_state, piece, sub)
            return sums, predictions

        g = ids.shape[0]
        pieces = jax.tree.map(lambda a: _at_least_two(jnp.reshape(a, (g, a.shape[0] // g, *a.shape[1:]))), part)
        sums, predictions = _loop(one, _at_least_two(ids), pieces, g)
        tree = jax.tree.map(lambda a: _tree_sum(a[:g])[None], sums)  # the subtree of this device's parts
        return tree, jax.tree.map(lambda a: _joined(a[:g]), predictions)

    def value_and_grads(params, model_state, batch, key):
        x, y, w = unpack(batch)
        if jax.tree.leaves(model_state):
            raise ValueError(
                "device_invariant: the model has a state (e.g. batch norm's statistics), which parts on different "
                "devices cannot thread in order: drop device_invariant"
            )
        part = (x, y) if w is None else (x, y, w)
        if x.shape[0] % k:
            raise ValueError(f"device_invariant {k} does not divide the batch of {x.shape[0]} examples")
        specs = (P(), P(), P(), rows, jax.tree.map(lambda _: rows, part))
        mapped = _shard_map(local, mesh, specs, (rows, rows))
        stacked, predictions = mapped(params, model_state, key, jnp.arange(k), part)
        total, weight, grads = jax.tree.map(_tree_sum, stacked)
        (loss, aux), grads = _mean((total, weight, grads), params, y, model_state, predictions)
        return (loss, aux), jax.lax.with_sharding_constraint(grads, jax.tree.map(lambda _: whole, grads))

    return value_and_grads


def _loop(one: Callable, ids, pieces, g: int):
    """``one(i, piece)``'s outputs for the parts ``i < g`` of ``pieces`` (a leading axis of at least
    2), stacked, from a ``while_loop`` whose trip count XLA cannot see.

    On every device count (g = 1, 2, 4, ...) XLA then compiles the same loop body: a known count of
    one would inline the part into the surrounding program, with other fusions and roundings. And
    each part's sums are stored as they are, then added after the loop: added inside it, XLA's CPU
    backend fuses the addition with the multiplication before it into one fused multiply-add,
    which rounds once where the device that adds nothing rounds twice."""
    first = jax.tree.map(lambda a: a[0], pieces)
    shapes = jax.eval_shape(lambda p: one(jnp.int32(0), p), first)
    size = ids.shape[0]
    out = jax.tree.map(lambda a: jnp.zeros((size, *a.shape), a.dtype), shapes)
    count = jax.lax.optimization_barrier(jnp.asarray(g, jnp.int32))  # not a constant to XLA's loop passes

    def body(carry):
        i, out = carry
        values = one(i, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), pieces))
        return i + 1, jax.tree.map(lambda o, v: jax.lax.dynamic_update_index_in_dim(o, v, i, 0), out, values)

    return jax.lax.while_loop(lambda carry: carry[0] < count, body, (jnp.int32(0), out))[1]


def _at_least_two(a: jax.Array) -> jax.Array:
    """``a`` with a leading axis of at least two (zeros after its own rows): see :func:`_loop`."""
    return a if a.shape[0] > 1 else jnp.concatenate([a, jnp.zeros_like(a)])


def _tree_sum(a: jax.Array) -> jax.Array:
    """``a`` ``(n, ...)`` summed over its leading axis (a power of two) in one binary tree:
    elementwise additions of its even and odd slices, whatever devices hold them."""
    while a.shape[0] > 1:
        a = a[0::2] + a[1::2]
    return a[0]


def _joined(a: jax.Array) -> jax.Array:
    return jnp.reshape(a, (-1, *a.shape[2:]))


def alone(fn: Callable) -> Callable:
    """``fn(state, *args) -> state`` compiled apart from the program around it: as the body of a
    ``while_loop`` that runs once, by a count that XLA cannot foresee (``state.step``'s sign).

    XLA fuses no operation across a loop's body, so the body compiles alike on every device count;
    inlined, the optimizer's update is fused with what comes before and after it, which the device
    count changes, and XLA's CPU backend contracts other multiplications and additions into fused
    multiply-adds, which round once instead of twice (measured: AdamW's moments after clipping).
    The state is carried, and the other arguments are selected by the loop's counter, so that XLA
    cannot hoist any of the body's work out of the loop."""

    def alone_fn(state, *args):
        once = jnp.where(state.step >= 0, 1, 0)  # 1; a step count is never negative

        def body(carry):
            i, state = carry
            fresh = i < once  # true, for all XLA knows only at run time
            given = jax.tree.map(lambda a: jnp.where(fresh, a, jnp.zeros_like(a)), args)
            return i + 1, fn(state, *given)

        return jax.lax.while_loop(lambda carry: carry[0] < once, body, (jnp.int32(0), state))[1]

    return alone_fn


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
    """``shard_map`` without the replication checks: a gradient taken inside must stay per device
    (with them, the gradient of a replicated input is summed over the devices by XLA's all-reduce)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # noqa: PLC0415 (JAX < 0.6.1)

    return shard_map(f, mesh, in_specs, out_specs, check_rep=False)
