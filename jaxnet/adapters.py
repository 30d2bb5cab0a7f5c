"""Models from Flax (linen and NNX), Equinox and Haiku as jaxnet models.

Each adapter returns a :class:`jaxnet.StatefulModel` whose params are the library's own trainable
arrays and whose state is its non-trainable ones (batch statistics), so that ``fit``, member runs,
checkpoints and ``predict`` treat them like jaxnet's own layers. The train/eval switch and the
PRNG keys come from jaxnet's :class:`~jaxnet.Context`. Each library is an optional extra,
imported when its adapter is called.

- Flax (linen and NNX) and Haiku modules are written for batches: their apply gets the whole
  batch (``batched=True``), as in their own training loops.
- Equinox models are called per example under jaxnet's ``vmap``, whose batch axis is named
  :data:`jaxnet.BATCH_AXIS` (``"batch"``): give ``eqx.nn.BatchNorm(..., axis_name="batch")``,
  as Equinox's own examples do.
- A library's batch norm cannot be told example weights, so the padding of a final partial batch
  (copies of real rows, weight 0) would count in its statistics: ``fit`` refuses a partial batch
  for such a model (an Equinox model holding ``eqx.nn.BatchNorm``, a Flax or Haiku model with
  state; ``StatefulModel.batch_statistics``) unless ``drop_remainder=True``, or a batch size that
  divides the training rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax

from jaxnet.base import Context, StatefulModel

TRAIN_ARGUMENTS = {"train": True, "training": True, "is_training": True, "deterministic": False}
"""Keyword arguments that switch a module between training and evaluation, and their value in
training (``deterministic`` is the reverse)."""


def _need(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"this adapter needs {module}, which is not installed: pip install '{extra}'") from None


def _train_kwargs(name: str | None) -> Callable[[bool], dict]:
    if name is None:
        return lambda train: {}
    if name not in TRAIN_ARGUMENTS:
        raise ValueError(f"train_argument must be one of {', '.join(TRAIN_ARGUMENTS)} or None, got {name!r}")
    return lambda train: {name: train if TRAIN_ARGUMENTS[name] else not train}


def _detect_train_argument(function) -> str | None:
    """The first keyword of ``TRAIN_ARGUMENTS`` that ``function`` accepts, or None."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in TRAIN_ARGUMENTS if name in parameters), None)


def _keys(key, collections) -> dict:
    """One key per named random stream, folded from ``key`` (none without a key)."""
    return {} if key is None else {c: jax.random.fold_in(key, i) for i, c in enumerate(collections)}


def from_flax(module, example, *, train_argument: str | None = "auto", rng_collections=("dropout",)) -> StatefulModel:
    """A Flax linen module (written for batches) as a jaxnet model.

    Args:
      module: a ``flax.linen.Module``; its ``__call__(x, ...)`` takes a batch.
      example: one input example (no batch axis), to initialize the module with.
      train_argument: the keyword of ``__call__`` that switches training mode (one of
        ``TRAIN_ARGUMENTS``: ``train``, ``training``, ``is_training``, or ``deterministic``, the
        reverse); "auto" finds it in the signature, None passes none.
      rng_collections: the random streams the module draws in training (``self.make_rng``).

    Returns:
      A batched :class:`StatefulModel`: params the ``"params"`` collection, state every other
      collection (``batch_stats``...), updated in training through ``mutable``.
    """
    _need("flax.linen", "flax")
    name = _detect_train_argument(module.__call__) if train_argument == "auto" else train_argument
    kwargs = _train_kwargs(name)

    def init(key):
        params_key, rng_key = jax.random.split(key)
        rngs = {"params": params_key, **_keys(rng_key, rng_collections)}
        variables = dict(module.init(rngs, jax.tree.map(lambda a: a[None], example), **kwargs(False)))
        return variables.pop("params", {}), variables

    def apply(params, state, x, ctx: Context):
        variables = {"params": params, **state}
        if not ctx.train:
            return module.apply(variables, x, **kwargs(False)), state
        rngs = _keys(ctx.key, rng_collections)
        if not state:
            return module.apply(variables, x, rngs=rngs, **kwargs(True)), state
        y, updated = module.apply(variables, x, rngs=rngs, mutable=list(state), **kwargs(True))
        return y, {**state, **updated}

    return StatefulModel(init, apply, batched=True)


def from_nnx(module) -> StatefulModel:
    """A Flax NNX module (written for batches) as a jaxnet model.

    Params are its ``nnx.Param`` variables, state its ``nnx.BatchStat`` ones; ``module.train()`` /
    ``module.eval()`` switch its mode, and its dropout streams are reseeded from jaxnet's key at
    every step. ``init`` returns the module's current values (its own initialization): for K
    differently initialized members build K modules.
    """
    nnx = _need("flax.nnx", "flax")
    graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)

    def init(key):
        return params, stats

    def apply(params, state, x, ctx: Context):
        model = nnx.merge(graphdef, params, state, rest, copy=True)  # fresh variables in this trace
        if ctx.train:
            model.train()
            if ctx.key is not None:
                nnx.reseed(model, dropout=ctx.key)
        else:
            model.eval()
        y = model(x)
        return y, nnx.split(model, nnx.Param, nnx.BatchStat, ...)[2]

    return StatefulModel(init, apply, batched=True)


def from_equinox(model, state=None) -> StatefulModel:
    """An Equinox model (called per example) as a jaxnet model.

    Args:
      model: an ``eqx.Module`` called as ``model(x, key=...)``, or ``model(x, state, key=...) ->
        (y, state)`` when ``state`` is given; or a function ``key -> model`` (or ``-> (model,
        state)``, e.g. ``eqx.nn.make_with_state(Model)``) so that ``init`` builds it from jaxnet's
        key (member runs then start from different initializations).
      state: its ``eqx.nn.State`` (batch norm statistics), or None.

    Params are the model's floating-point arrays (``eqx.is_inexact_array``); training and
    evaluation switch through ``eqx.nn.inference_mode``.
    """
    eqx = _need("equinox", "equinox")
    factory = None if isinstance(model, eqx.Module) else model
    built = factory(jax.random.key(0)) if factory is not None else (model if state is None else (model, state))
    first, first_state = built if isinstance(built, tuple) else (built, None)
    static = eqx.partition(first, eqx.is_inexact_array)[1]
    stateful = first_state is not None

    def init(key):
        made = factory(key) if factory is not None else (model if state is None else (model, state))
        m, s = made if isinstance(made, tuple) else (made, None)
        return eqx.partition(m, eqx.is_inexact_array)[0], (s if stateful else {})

    def apply(params, state, x, ctx: Context):
        m = eqx.nn.inference_mode(eqx.combine(params, static), value=not ctx.train)
        if stateful:
            return m(x, state, key=ctx.key)
        return m(x, key=ctx.key), state

    norms = jax.tree.leaves(first, is_leaf=lambda m: isinstance(m, eqx.nn.BatchNorm))
    return StatefulModel(init, apply, batch_statistics=any(isinstance(m, eqx.nn.BatchNorm) for m in norms))


def from_haiku(transformed, example, *, train_argument: str | None = None) -> StatefulModel:
    """A Haiku ``hk.transform`` or ``hk.transform_with_state`` (written for batches) as a jaxnet model.

    Args:
      transformed: the transformed function; its ``apply`` takes a batch.
      example: one input example (no batch axis), to initialize it with.
      train_argument: the keyword of the wrapped function that switches training mode (e.g.
        ``is_training``; see ``TRAIN_ARGUMENTS``), None if it has none.
    """
    hk = _need("haiku", "dm-haiku")
    kwargs = _train_kwargs(train_argument)
    with_state = isinstance(transformed, hk.TransformedWithState)

    def init(key):
        made = transformed.init(key, jax.tree.map(lambda a: a[None], example), **kwargs(True))
        return made if with_state else (made, {})

    def apply(params, state, x, ctx: Context):
        key = ctx.key if ctx.train else None
        if with_state:
            y, new_state = transformed.apply(params, state, key, x, **kwargs(ctx.train))
            return y, (new_state if ctx.train else state)
        return transformed.apply(params, key, x, **kwargs(ctx.train)), state

    return StatefulModel(init, apply, batched=True)
