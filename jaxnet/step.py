"""The compiled update step: ``jax.value_and_grad`` + an optax transformation + ``jax.jit``.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnet import _checks as checks
from jaxnet.base import Batch, Params, PRNGKey, TrainState
from jaxnet.forward import AnyModel, apply_batch, check_model, has_state, is_stateful
from jaxnet.losses import LossSpec, PerExample, batch_mean, get_loss, has_token_axis, loss_sums
from jaxnet.parts import accumulated, alone, invariant
from jaxnet.parts import unpack as _unpack
from jaxnet.sharding import one_device_mesh

Metrics = dict[str, jax.Array]
Update = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def check_optimizer(optimizer) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), got {optimizer!r}")


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _objective(model: AnyModel, loss, compute_dtype):
    """``(params, model_state, batch, key) -> (loss, (model_state, predictions))`` in training mode, any model."""
    spec = get_loss(loss)
    reduce = batch_mean(spec.fn)

    def objective(params: Params, model_state, batch: Batch, key):
        x, y, w = _unpack(batch)
        if compute_dtype is not None:
            params, x = _cast_floats(params, compute_dtype), _cast_floats(x, compute_dtype)
        predictions, model_state = apply_batch(model, params, model_state, x, train=True, key=key, weight=w)
        if compute_dtype is not None:
            predictions = predictions.astype(jnp.float32)  # the loss in float32, as the master params
        if not has_token_axis(y):
            return reduce(predictions, y, w), (model_state, predictions, None)
        total, count = loss_sums(spec.fn, predictions, y, w)  # the mean over the batch's real tokens
        return jnp.where(count > 0, total / jnp.maximum(count, 1e-30), 0.0), (model_state, predictions, count)

    return objective


def make_loss_fn(model: AnyModel, loss: str | PerExample | LossSpec, *, compute_dtype=None) -> Callable:
    """The batch loss: the weighted mean of the per-example loss, in training mode.

    Args:
      model: the model; its ``apply`` is vmapped over the batch.
      loss: a loss name, per-example callable or :class:`LossSpec`.
      compute_dtype: if given (e.g. ``jnp.bfloat16``), params and inputs are cast to it for the
        forward and backward pass; predictions are cast back to float32 before the loss, and the
        gradient arrives in the params' own dtype (float32 master weights).

    Returns:
      For a plain :class:`Model`, ``(params, batch) -> scalar``. For a :class:`StatefulModel`,
      ``(params, batch, state, key=None) -> (scalar, state)``: ``key`` drives dropout (None: none).
    """
    check_model(model)
    objective = _objective(model, loss, compute_dtype)
    if is_stateful(model):
        return lambda params, batch, state, key=None: _loss_and_state(objective(params, state, batch, key))
    return lambda params, batch: objective(params, None, batch, None)[0]


def _loss_and_state(value):
    loss, (model_state, *_) = value
    return loss, model_state


def step_key(model: AnyModel, state: TrainState) -> PRNGKey | None:
    """The key of the step that ``state`` is about to take: ``fold_in(state.key, state.step)`` for a
    stateful model (distinct per step, exactly resumable), None for a plain one (which draws none)."""
    return jax.random.fold_in(state.key, state.step) if is_stateful(model) else None


def init_state(params: Params, optimizer: optax.GradientTransformation, key: PRNGKey, model_state=None) -> TrainState:
    """A fresh :class:`TrainState` at step 0: ``params`` (a pytree), ``optimizer.init(params)``,
    ``key`` (a scalar PRNG key), ``step`` (an int32 scalar) and a stateful model's ``model_state``.
    The state holds copies of ``params``, ``key`` and ``model_state``: a step that donates the
    state (:func:`make_train_step`) never deletes the caller's arrays."""
    check_optimizer(optimizer)
    params, key, model_state = jax.tree.map(jnp.copy, (params, key, model_state))
    return TrainState(params, optimizer.init(params), key, jnp.zeros((), jnp.int32), model_state)


def learning_rate_of(opt_state) -> jax.Array | None:
    """The learning rate an ``optax.inject_hyperparams`` optimizer applied in its last update (its
    state's ``hyperparams["learning_rate"]``, times ``lr_scale`` when it injects one as
    :mod:`jaxnet.app.recipes` does, anywhere in a chain), or None when it has none."""
    found = [
        node.hyperparams["learning_rate"] * node.hyperparams.get("lr_scale", 1.0)
        for node in jax.tree.leaves(
            opt_state, is_leaf=lambda node: isinstance(getattr(node, "hyperparams", None), dict)
        )
        if isinstance(getattr(node, "hyperparams", None), dict) and "learning_rate" in node.hyperparams
    ]
    return found[0] if found else None


def make_update(
    model: AnyModel,
    loss: str | PerExample | LossSpec,
    optimizer: optax.GradientTransformation,
    *,
    compute_dtype=None,
    outputs: bool = False,
    gradients: bool = False,
    per_example: bool = False,
    accumulate: int = 1,
    device_invariant: int | None = None,
    mesh=None,
) -> Update:
    """The pure, un-jitted update ``(state, batch) -> (state, metrics)``.

    One step of ``optimizer`` on the batch loss; ``metrics`` is ``{"loss": scalar}`` (the loss
    before the update), plus the batch's training-mode ``predictions`` with ``outputs``, and with
    ``gradients`` the ``grads`` (a pytree like the params) and, for an ``optax.inject_hyperparams``
    optimizer, the ``learning_rate`` this step applied. Use it inside ``lax.scan`` or ``vmap``;
    :func:`make_train_step` jits it. A :class:`StatefulModel` runs in training mode with the key
    :func:`step_key` (split per example) and its state, updated by the step, is carried in
    ``state.model_state``.

    With an optimizer from :func:`skip_nonfinite_updates`, a step whose loss is not finite is
    skipped like one whose gradients are not finite. ``per_example``: the optimizer receives
    per-example gradients (:func:`make_per_example_update`).

    ``accumulate=k`` computes the gradient over k microbatches of ``b / k`` examples, one after
    the other (``lax.scan``; microbatch ``m`` holds rows ``m, m + k, ...``, so that each device's
    rows stay on it), and applies one update: the weighted sums of the loss and gradients and
    their weights (examples, or real tokens) are summed in float32 and divided once, so the update
    equals the whole batch's (up to rounding) in the memory of a microbatch's activations plus one
    gradient-sized sum. A stateful model's state is threaded through the microbatches, and each
    draws its own dropout key (``fold_in(step_key, m)``).

    ``device_invariant=k`` computes the gradient over k parts of ``b / k`` consecutive rows, each
    device its own parts, added in one fixed binary tree (:mod:`jaxnet.parts`): the update is then
    bitwise the same on ``mesh`` (default: one device) as on any other number of batch devices
    dividing ``k``, so a run continues to the bit on another mesh (docs/sharding.md).
    """
    check_optimizer(optimizer)
    check_model(model)
    optimizer = optax.with_extra_args_support(optimizer)  # update(..., value=loss) reaches those that read it
    objective = _objective(model, loss, compute_dtype)
    apply = functools.partial(_apply, optimizer)
    if device_invariant is not None:
        if per_example or accumulate != 1:
            taken = "per_example" if per_example else "accumulate"
            raise ValueError(f"device_invariant already splits the batch into parts: drop {taken}")
        mesh = mesh or one_device_mesh()
        value_and_grad = invariant(objective, device_invariant, mesh)
        return _batch_update(model, value_and_grad, _alone(apply), outputs, gradients)  # alike on any device count
    if accumulate != 1:
        if per_example:
            raise ValueError("accumulate: per-example gradients (DP-SGD) are clipped per example: drop accumulate")
        return _batch_update(model, accumulated(objective, accumulate), apply, outputs, gradients)
    if per_example:
        return _per_example_update(model, objective, optimizer, outputs, gradients)
    return _batch_update(model, jax.value_and_grad(objective, has_aux=True), apply, outputs, gradients)


def _alone(apply: Callable) -> Callable:
    """``apply`` (``(state, grads, model_state, loss) -> (state, opt_state)``) compiled apart from the
    program around it (:func:`jaxnet.parts.alone`)."""
    step = alone(lambda state, *args: apply(state, *args)[0])

    def isolated(state: TrainState, *args):
        state = step(state, *args)
        return state, state.opt_state

    return isolated


def _batch_update(model: AnyModel, value_and_grad: Callable, apply: Callable, outputs: bool, gradients: bool) -> Update:
    """:func:`make_update`'s update: one step on the batch loss's gradient, from ``value_and_grad``
    (of the objective, or over parts of the batch: :mod:`jaxnet.parts`), applied by ``apply``
    (:func:`_apply` with the optimizer)."""

    def update(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = step_key(model, state)
        (loss_value, (model_state, predictions, count)), grads = value_and_grad(
            state.params, state.model_state, batch, key
        )
        if isinstance(state.opt_state, optax.ApplyIfFiniteState):  # a non-finite loss: skip the step too
            grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss_value), g, jnp.nan), grads)
        state, opt_state = apply(state, grads, model_state, loss_value)
        return state, _step_metrics(loss_value, count, predictions, grads, opt_state, outputs, gradients)

    return update


def _apply(optimizer, state: TrainState, grads, model_state, loss_value) -> tuple[TrainState, Any]:
    """``state`` after one ``optimizer`` step on ``grads`` (the step's loss passed as ``value``, for
    transformations that read it: :func:`skip_spikes`), with ``model_state``; and its opt state."""
    try:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=loss_value)
    except ValueError as e:  # optax's per-example clipping, given a batch's gradient
        if "batch dimension" not in str(e):
            raise
        raise ValueError(
            "the optimizer clips per-example gradients (DP-SGD, jaxnet.dp_optimizer), and this step gives it the "
            "batch's mean gradient: train with fit(..., per_example_grads=True) (or make_per_example_update)"
        ) from None
    params = optax.apply_updates(state.params, updates)
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1, model_state=model_state), opt_state


def _step_metrics(loss_value, count, predictions, grads, opt_state, outputs: bool, gradients: bool) -> Metrics:
    """A step's metrics: its loss (and with token targets the ``weight`` it averages over: the
    batch's real tokens), and its ``predictions`` and gradients when asked for."""
    metrics = {"loss": loss_value}
    if count is not None:
        metrics["weight"] = count
    if outputs:
        metrics["predictions"] = predictions
    if gradients:
        metrics.update(_gradients(grads, opt_state))
    return metrics


def _gradients(grads, opt_state) -> Metrics:
    out = {"grads": grads}
    rate = learning_rate_of(opt_state)
    if rate is not None:
        out["learning_rate"] = jnp.asarray(rate, jnp.float32)
    return out


def weigh_classes(update: Update, class_weights: jax.Array) -> Update:
    """``update`` with each example's weight times its class's: ``class_weights`` ``(classes,)``,
    indexed by the integer label (a 0/1 target of a binary loss counts as its label)."""

    def weighed(state: TrainState, batch: Batch):
        x, y, w = _unpack(batch)
        labels = jnp.reshape(y, (y.shape[0], -1))[:, 0]
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            labels = jnp.round(labels).astype(jnp.int32)
        per_example = class_weights[labels]
        w = per_example if w is None else w * per_example.astype(w.dtype)
        state, out = update(state, (x, y, w))
        if "weight" not in out:  # what the loss averaged over: the epoch's loss is the mean over it
            out = {**out, "weight": jnp.sum(w)}
        return state, out

    return weighed


def skip_nonfinite_updates(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` that skips updates whose gradients (or, in :func:`make_update`, loss) are not
    finite, keeping params and optimizer state; its state counts them in ``total_notfinite``
    (``optax.apply_if_finite``, never giving up)."""
    return optax.apply_if_finite(optimizer, max_consecutive_errors=2**31 - 1)


class SpikeState(NamedTuple):
    """:func:`skip_spikes`' state: the wrapped optimizer's, the last ``window`` accepted losses
    (a ring buffer), how many were seen, and the steps skipped as spikes."""

    inner: Any
    losses: jax.Array
    seen: jax.Array
    spikes: jax.Array


def skip_spikes(optimizer: optax.GradientTransformation, window: int, factor: float):
    """``optimizer`` that skips a step whose loss exceeds the mean of the last ``window`` accepted
    losses by more than ``factor`` of their standard deviations (once ``window`` losses were seen):
    the params and the wrapped optimizer's state stay as they were, the step is counted in
    ``spikes``, and the loss is not added to the window. The loss arrives as
    ``update(..., value=loss)``, which :func:`make_update` passes.

    Examples:
      >>> opt = skip_spikes(optax.sgd(1.0), window=3, factor=3.0)
      >>> state = opt.init({"w": jnp.zeros(())})
      >>> for loss in (1.0, 1.1, 0.9):
      ...     _, state = opt.update({"w": jnp.ones(())}, state, value=jnp.asarray(loss))
      >>> updates, state = opt.update({"w": jnp.ones(())}, state, value=jnp.asarray(100.0))
      >>> float(updates["w"]), int(state.spikes)
      (0.0, 1)
    """
    if not checks.is_int(window) or window < 2:
        raise ValueError(f"skip_spikes: the window must be an integer of at least 2 steps, got {window!r}")
    if not checks.is_real(factor) or not factor > 0:
        raise ValueError(f"skip_spikes: the factor (standard deviations) must be positive, got {factor!r}")
    window, factor = int(window), float(factor)
    inner = optax.with_extra_args_support(optimizer)

    def init(params):
        zero = jnp.zeros((), jnp.int32)
        return SpikeState(inner.init(params), jnp.zeros((window,), jnp.float32), zero, zero)

    def update(updates, state, params=None, *, value=None, **extra):
        if value is None:
            raise ValueError("skip_spikes needs the step's loss: update(..., value=loss)")
        loss = jnp.asarray(value, jnp.float32)
        mean, std = jnp.mean(state.losses), jnp.std(state.losses)
        spike = (state.seen >= window) & (loss > mean + factor * std)
        new_updates, new_inner = inner.update(updates, state.inner, params, value=value, **extra)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(spike, b, a), new, old)  # noqa: E731
        out = jax.tree.map(lambda u: jnp.where(spike, jnp.zeros_like(u), u), new_updates)
        losses = jnp.where(spike, state.losses, state.losses.at[state.seen % window].set(loss))
        seen = jnp.where(spike, state.seen, state.seen + 1)
        return out, SpikeState(keep(new_inner, state.inner), losses, seen, state.spikes + spike.astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init, update)


def spikes_of(opt_state) -> jax.Array | None:
    """The steps :func:`skip_spikes` skipped, from ``opt_state`` (None without it)."""
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_spike) if _is_spike(n)]
    return found[0].spikes if found else None


def _is_spike(node) -> bool:
    return isinstance(node, SpikeState)


def make_train_step(
    model: AnyModel,
    loss: str | PerExample | LossSpec,
    optimizer: optax.GradientTransformation,
    *,
    donate: bool = True,
    compute_dtype=None,
) -> Update:
    """A compiled update step ``step(state, batch) -> (state, metrics)``.

    Args:
      model, loss, optimizer: as in :func:`make_update`.
      donate: donate the input state's buffers to the output (the old state becomes unusable).

    Examples:
      >>> import jax, optax, jax.numpy as jnp
      >>> from jaxnet import mlp, init_state
      >>> net = mlp([2, 4, 1])
      >>> opt = optax.sgd(0.1)
      >>> state = init_state(net.init(jax.random.key(0)), opt, jax.random.key(1))
      >>> step = make_train_step(net, "mse", opt)
      >>> state, metrics = step(state, (jnp.ones((8, 2)), jnp.zeros((8, 1))))
      >>> int(state.step)
      1
    """
    update = make_update(model, loss, optimizer, compute_dtype=compute_dtype)
    return jax.jit(update, donate_argnums=(0,) if donate else ())


def make_eval_fn(model: AnyModel, loss: str | PerExample | LossSpec) -> Callable[..., Metrics]:
    """The pure evaluation ``(params, batch, model_state=None) -> {"loss", "accuracy"?}`` (weighted
    batch means), in eval mode (no randomness; a stateful model uses its ``model_state``).

    ``accuracy`` is present when the loss has a metric (classification losses).
    """
    check_model(model)
    spec = get_loss(loss)
    reduce_loss = batch_mean(spec.fn)
    reduce_metric = batch_mean(spec.metric) if spec.metric else None

    def evaluate(params: Params, batch: Batch, model_state=None) -> Metrics:
        x, y, w = _unpack(batch)
        predictions, _ = apply_batch(model, params, model_state, x, weight=w)
        out = {"loss": reduce_loss(predictions, y, w)}
        if reduce_metric is not None:
            out["accuracy"] = reduce_metric(predictions, y, w)
        return out

    return evaluate


def _single_example_batches(batch: Batch):
    """``batch`` as a tuple of arrays to vmap over: ``(x, y)`` or ``(x, y, weights)``."""
    x, y, w = _unpack(batch)
    return (x, y) if w is None else (x, y, w)


def per_example_grads(loss_fn: Callable[[Params, Batch], jax.Array], params: Params, batch: Batch) -> Params:
    """The gradient of ``loss_fn`` at each example of ``batch`` separately (``vmap`` of ``grad``).

    Args:
      loss_fn: a batch loss ``(params, batch) -> scalar``, e.g. ``make_loss_fn(model, "mse")``; it is
        applied to batches of one example.
      params: the params (a pytree).
      batch: ``(x: (n, ...), y: (n, ...))`` or ``(x, y, weights: (n,))``; an example of weight 0 has
        gradient 0.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis ``n``: leaf ``[i]`` is the gradient
      of the loss of example ``i`` alone. For an unweighted batch their mean is the batch gradient.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxnet import mlp, make_loss_fn
      >>> net = mlp([2, 3, 1])
      >>> g = per_example_grads(make_loss_fn(net, "mse"), net.init(jax.random.key(0)),
      ...                       (jnp.ones((5, 2)), jnp.zeros((5, 1))))
      >>> g[0]["w"].shape
      (5, 2, 3)
    """
    grad = jax.grad(lambda p, example: loss_fn(p, jax.tree.map(lambda a: a[None], example)))
    return jax.vmap(grad, in_axes=(None, 0))(params, _single_example_batches(batch))


def per_example_grad_norms(grads: Params) -> jax.Array:
    """The global L2 norm of each example's gradient: ``grads`` leaves ``(n, ...)`` -> ``(n,)``."""
    leaves = jax.tree.leaves(grads)
    if not leaves:
        raise ValueError("per_example_grad_norms needs a non-empty pytree of per-example gradients")
    squares = [
        jnp.sum(jnp.square(jnp.reshape(leaf, (leaf.shape[0], -1)).astype(jnp.float32)), axis=1) for leaf in leaves
    ]
    return jnp.sqrt(sum(squares))


def dp_aggregate(l2_norm_clip: float, noise_multiplier: float, key: PRNGKey) -> optax.GradientTransformation:
    """Per-example clipping plus Gaussian noise, averaged over the batch (the DP-SGD recipe).

    A thin, validated wrapper of ``optax.contrib.differentially_private_aggregate``: each example's
    gradient is scaled to global L2 norm at most ``l2_norm_clip``, the clipped gradients are summed,
    Gaussian noise of standard deviation ``l2_norm_clip * noise_multiplier`` is added, and the sum is
    divided by the batch size ``n`` (padding examples count in ``n``: use ``drop_remainder`` for exact
    accounting).

    Args:
      l2_norm_clip: the clipping bound ``C > 0`` on each per-example gradient norm.
      noise_multiplier: ``sigma >= 0``; the noise standard deviation is ``sigma * C`` (0: clipping only).
      key: PRNG key of the noise stream (kept in the transformation's state).

    Returns:
      An optax transformation whose ``update`` takes per-example gradients (leaves ``(n, ...)``, e.g.
      from :func:`per_example_grads`) and returns ordinary updates (leaves shaped like params). It must
      come first in a chain: see :func:`dp_optimizer`.
    """
    for name, value in (("l2_norm_clip", l2_norm_clip), ("noise_multiplier", noise_multiplier)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not jnp.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if l2_norm_clip <= 0:
        raise ValueError(f"l2_norm_clip must be greater than 0, got {l2_norm_clip!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be 0 or more, got {noise_multiplier!r}")
    checks.key("key", key)
    from optax import contrib

    return contrib.differentially_private_aggregate(l2_norm_clip, noise_multiplier, key)


def dp_optimizer(
    learning_rate: float,
    l2_norm_clip: float,
    noise_multiplier: float,
    key: PRNGKey,
    base: Callable[[float], optax.GradientTransformation] = optax.sgd,
) -> optax.GradientTransformation:
    """DP-SGD: :func:`dp_aggregate` chained with ``base(learning_rate)`` (plain SGD by default).

    Use it with :func:`make_per_example_update`, which feeds it per-example gradients.

    Args:
      learning_rate: passed to ``base``.
      l2_norm_clip, noise_multiplier, key: as in :func:`dp_aggregate`.
      base: an optax optimizer factory, e.g. ``optax.adam``.
    """
    return optax.chain(dp_aggregate(l2_norm_clip, noise_multiplier, key), base(learning_rate))


def make_per_example_update(
    model: AnyModel, loss: str | PerExample | LossSpec, optimizer: optax.GradientTransformation, **options
) -> Update:
    """Like :func:`make_update`, but ``optimizer`` receives per-example gradients (leading batch axis).

    For transformations that aggregate examples themselves, such as :func:`dp_optimizer`. The
    ``loss`` metric is the weighted batch mean of the per-example losses; it plugs into
    :func:`jaxnet.make_epoch` like any update. The keyword ``options`` (``compute_dtype``, ``outputs``,
    ``gradients``) are :func:`make_update`'s (``grads``: the batch mean of the per-example gradients, before any
    clipping).
    """
    return make_update(model, loss, optimizer, **options, per_example=True)


def _per_example_update(model: AnyModel, objective: Callable, optimizer, outputs: bool, gradients: bool) -> Update:
    """:func:`make_per_example_update`'s update: per-example gradients, vmapped over the batch."""

    def one(params, model_state, example, key):
        value, (_, predictions, count) = objective(params, model_state, jax.tree.map(lambda a: a[None], example), key)
        return value, (predictions[0], jnp.ones((), jnp.float32) if count is None else count)

    value_and_grad = jax.vmap(jax.value_and_grad(one, has_aux=True), in_axes=(None, None, 0, 0))

    def update(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if has_state(state.model_state):
            raise ValueError(
                "per-example gradients of a model with state (batch statistics) are meaningless: each example "
                "would be its own batch; use layer_norm instead of batch_norm, or train without per-example gradients"
            )
        example_batch = _single_example_batches(batch)
        n = example_batch[0].shape[0]
        key = step_key(model, state)
        keys = None if key is None else jax.random.split(key, n)
        (values, (predictions, counts)), grads = value_and_grad(state.params, state.model_state, example_batch, keys)
        w = example_batch[2] if len(example_batch) == 3 else None
        tokens = has_token_axis(example_batch[1])
        if w is None and not tokens:
            loss_value = jnp.mean(values)
        elif tokens:  # each example's mean weighted by its (weighted) count of real tokens
            w = counts.astype(values.dtype)
        else:
            w = w.astype(values.dtype)
        if w is not None:
            loss_value = jnp.where(jnp.sum(w) > 0, jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1e-30), 0.0)
        state, opt_state = _apply(optimizer, state, grads, state.model_state, loss_value)
        mean_grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads) if gradients else None
        count = jnp.sum(w) if tokens else None
        return state, _step_metrics(loss_value, count, predictions, mean_grads, opt_state, outputs, gradients)

    return update
