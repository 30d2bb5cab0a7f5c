"""Layers: initializers, activations, ``dense``, ``serial``, ``mlp`` and ``batched``.

Every layer is a :class:`jaxnet.Model`: ``init(key) -> params`` and ``apply(params, x) -> y``
for **one example**. Batches go through :func:`batched` (``jax.vmap``).

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxnet.base import Context, Model, Params, PRNGKey, StatefulModel
from jaxnet.forward import check_params

Activation = Callable[[jax.Array], jax.Array]
Initializer = Callable[..., jax.Array]


def identity(x: jax.Array) -> jax.Array:
    """The identity activation (a linear layer)."""
    return x


ACTIVATIONS: dict[str, Activation] = {
    "identity": identity,
    "linear": identity,
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}
"""Activations by name. ``identity`` and ``linear`` are the same function."""

# He (Kaiming) scaling suits rectifiers; Glorot (Xavier) suits symmetric/saturating units.
_HE = ("relu", "leaky_relu", "elu", "gelu", "silu", "softplus")


def get_activation(activation: str | Activation | None) -> Activation:
    """Returns the activation function for a name (see ``ACTIVATIONS``), a callable, or None (identity)."""
    if activation is None:
        return identity
    if callable(activation):
        return activation
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation]
    raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(sorted(ACTIVATIONS))}")


def default_initializer(activation: str | Activation | None) -> Initializer:
    """The default weight initializer for a layer followed by ``activation``.

    He normal (variance 2/fan_in) for rectifier-like units (relu, leaky_relu, elu, gelu, silu,
    softplus); Glorot normal (variance 2/(fan_in+fan_out)) for sigmoid, tanh, identity and
    custom callables. Biases start at zero.
    """
    if isinstance(activation, str) and activation in _HE:
        return jax.nn.initializers.he_normal()
    return jax.nn.initializers.glorot_normal()


def _check_size(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def dense(
    in_dim: int,
    out_dim: int,
    activation: str | Activation | None = None,
    *,
    w_init: Initializer | None = None,
    b_init: Initializer = jax.nn.initializers.zeros,
    dtype=jnp.float32,
) -> Model:
    """A fully connected layer ``activation(x @ w + b)``.

    Args:
      in_dim: number of input features.
      out_dim: number of output units.
      activation: a name from ``ACTIVATIONS``, a callable, or None for identity.
      w_init: weight initializer ``(key, shape, dtype)``; default from :func:`default_initializer`.
      b_init: bias initializer; zeros by default.
      dtype: parameter dtype.

    Returns:
      A :class:`Model` with params ``{"w": (in_dim, out_dim), "b": (out_dim,)}`` and
      ``apply(params, x)``: ``(in_dim,) -> (out_dim,)``.

    Examples:
      >>> import jax
      >>> layer = dense(3, 2, "sigmoid")
      >>> params = layer.init(jax.random.key(0))
      >>> layer.apply(params, jax.numpy.ones(3)).shape
      (2,)
    """
    in_dim = _check_size(in_dim, "in_dim")
    out_dim = _check_size(out_dim, "out_dim")
    act = get_activation(activation)
    w_init = w_init or default_initializer(activation)

    def init(key: PRNGKey) -> Params:
        wkey, bkey = jax.random.split(key)
        return {"w": w_init(wkey, (in_dim, out_dim), dtype), "b": b_init(bkey, (out_dim,), dtype)}

    def apply(params: Params, x: jax.Array) -> jax.Array:
        if jnp.shape(x)[-1:] != (in_dim,):
            raise ValueError(
                f"input has shape {jnp.shape(x)} but the layer expects {in_dim} features: "
                f"pass one example of shape ({in_dim},), or use jaxnet.batched for a batch"
            )
        y = x @ params["w"]
        return act(y + _along_last(params["b"], y))

    return Model(init, apply)


def activation_layer(activation: str | Activation) -> Model:
    """A parameter-free layer applying ``activation`` elementwise (params are ``{}``)."""
    act = get_activation(activation)
    return Model(lambda key: {}, lambda params, x: act(x))


def as_stateful(layer: Model | StatefulModel) -> StatefulModel:
    """``layer`` in the :class:`StatefulModel` form: a plain layer gets state ``{}`` and ignores the context."""
    if isinstance(layer, StatefulModel):
        return layer
    init, apply = layer

    def stateful(params, state, x, ctx):
        return apply(params, x), state

    stateful.__qualname__ = getattr(apply, "__qualname__", stateful.__qualname__)  # named as the layer (summary)
    return StatefulModel(lambda key: (init(key), {}), stateful)


def _check_layers(layers, where: str) -> None:
    if not layers:
        raise ValueError(f"{where} needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (Model, StatefulModel)):
            raise TypeError(f"{where}: layer {i} is a {type(layer).__name__}, not a jaxnet.Model or StatefulModel")
        if isinstance(layer, StatefulModel) and layer.batched:
            raise ValueError(
                f"{where}: layer {i} is applied to whole batches (batched=True); compose per-example layers"
            )


def serial(*layers: Model | StatefulModel) -> Model | StatefulModel:
    """Composes layers in order, like ``stax.serial``; params are a list, one entry per layer.

    Each layer gets its own key, split from the key given to ``init``. If any layer is a
    :class:`StatefulModel` (dropout, batch norm), so is the composition: its state is a list
    with one entry per layer (``{}`` for the plain ones), and layer ``i`` sees the context
    folded with ``i`` (its own random stream). Otherwise it is a plain :class:`Model`.
    """
    _check_layers(layers, "serial")
    if any(isinstance(layer, StatefulModel) for layer in layers):
        return _serial_stateful([as_stateful(layer) for layer in layers])
    init_fns, apply_fns = zip(*layers)

    def init(key: PRNGKey) -> Params:
        keys = jax.random.split(key, len(init_fns))
        return [f(k) for f, k in zip(init_fns, keys)]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        for f, p in zip(apply_fns, params):
            x = f(p, x)
        return x

    apply.layers = layers  # read by jaxnet.summary to list the layers
    return Model(init, apply)


def _serial_stateful(layers: list[StatefulModel]) -> StatefulModel:
    def init(key: PRNGKey):
        pairs = [layer.init(k) for layer, k in zip(layers, jax.random.split(key, len(layers)))]
        return [p for p, _ in pairs], [s for _, s in pairs]

    def apply(params, state, x, ctx: Context):
        new_state = []
        for i, (layer, p, s) in enumerate(zip(layers, params, state)):
            x, s = layer.apply(p, s, x, ctx.fold(i))
            new_state.append(s)
        return x, new_state

    apply.layers = tuple(layers)  # read by jaxnet.summary to list the layers
    return StatefulModel(init, apply, batch_statistics=any(layer.batch_statistics for layer in layers))


REMAT = ("none", "dots", "full")


def rematted(fn: Callable, remat: str) -> Callable:
    """``fn`` under ``jax.checkpoint`` with the policy ``remat`` names: ``"none"`` (``fn`` itself),
    ``"dots"`` (keep the matmul outputs, recompute the rest in the backward pass) or ``"full"``
    (keep only ``fn``'s inputs). For the body of a ``lax.scan`` (no CSE to prevent there)."""
    if remat not in REMAT:
        raise ValueError(f"unknown remat {remat!r}: use one of {', '.join(REMAT)}")
    if remat == "none":
        return fn
    saveable = jax.checkpoint_policies
    policy = saveable.dots_saveable if remat == "dots" else saveable.nothing_saveable
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def repeat(block: Model | StatefulModel, n: int, *, remat: str = "none") -> Model | StatefulModel:
    """``n`` copies of ``block`` in sequence, each with its own params, run as one ``lax.scan``.

    The params are the block's stacked: every leaf gets a leading axis of ``n`` (a
    :class:`StatefulModel`'s state likewise), so the step compiles the block once and compile
    time does not grow with ``n``. The block must map its input to an output of the same shape
    and dtype (a transformer block, a residual MLP block). ``remat`` recomputes each block's
    activations in the backward pass (:func:`rematted`): with a scan, only each block's input is
    kept (``"full"``).

    Examples:
      >>> net = repeat(dense(4, 4, "tanh"), 3)
      >>> params = net.init(jax.random.key(0))
      >>> params["w"].shape, net.apply(params, jnp.ones(4)).shape
      ((3, 4, 4), (4,))
    """
    _check_layers([block], "repeat")
    n = _check_size(n, "n")
    if isinstance(block, StatefulModel):
        return _repeat_stateful(block, n, remat)

    def init(key: PRNGKey) -> Params:
        return jax.vmap(block.init)(jax.random.split(key, n))

    def apply(params: Params, x: jax.Array) -> jax.Array:
        body = rematted(lambda h, p: (block.apply(p, h), None), remat)
        return jax.lax.scan(body, x, params)[0]

    apply.layers, apply.stacked = (block,) * n, True  # (jaxnet.summary: one stacked tree of params)
    return Model(init, apply)


def _repeat_stateful(block: StatefulModel, n: int, remat: str) -> StatefulModel:
    def init(key: PRNGKey):
        return jax.vmap(block.init)(jax.random.split(key, n))

    def apply(params, state, x, ctx: Context):
        def body(h, layer):
            p, s, i = layer
            return block.apply(p, s, h, ctx.fold(i))

        x, new_state = jax.lax.scan(rematted(body, remat), x, (params, state, jnp.arange(n)))
        return x, new_state

    apply.layers, apply.stacked = (block,) * n, True  # (jaxnet.summary: one stacked tree of params)
    return block._replace(init=init, apply=apply)


def mlp(
    sizes: Sequence[int],
    activation: str | Activation = "relu",
    output_activation: str | Activation | None = None,
    *,
    dtype=jnp.float32,
) -> Model:
    """A multilayer perceptron: dense layers of the given sizes.

    Args:
      sizes: ``[in_dim, hidden..., out_dim]``, at least two positive integers.
      activation: activation after every hidden layer.
      output_activation: activation after the last layer (None: identity, i.e. logits).
      dtype: parameter dtype.

    Returns:
      A :class:`Model` whose params are a list of ``{"w", "b"}`` dicts, one per layer, and whose
      ``apply`` maps ``(in_dim,) -> (out_dim,)``.

    Examples:
      >>> import jax
      >>> net = mlp([3, 2, 2], activation="sigmoid", output_activation="sigmoid")
      >>> [p["w"].shape for p in net.init(jax.random.key(0))]
      [(3, 2), (2, 2)]
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a sequence of layer sizes, got {sizes!r}")
    if len(sizes) < 2:
        raise ValueError(f"sizes needs an input and an output size, got {list(sizes)!r}")
    sizes = [_check_size(s, f"layer size {i}") for i, s in enumerate(sizes)]
    get_activation(activation)
    get_activation(output_activation)
    acts = [activation] * (len(sizes) - 2) + [output_activation]
    return serial(*(dense(a, b, act, dtype=dtype) for a, b, act in zip(sizes[:-1], sizes[1:], acts)))


def with_params(model: Model, params: Params) -> Model:
    """The same model, whose ``init`` ignores its key and returns ``params`` (e.g. given weights).

    The given params are checked against the structure and shapes that ``model.init`` produces.
    """
    check_params(model, params)
    expected = jax.eval_shape(model.init, jax.random.key(0))
    given = jax.tree.map(jnp.asarray, params)
    if jax.tree.structure(expected) != jax.tree.structure(given):  # the same paths in other containers
        raise ValueError(
            f"params do not fit the model: expected structure {jax.tree.structure(expected)}, "
            f"got {jax.tree.structure(given)}"
        )
    given = jax.tree.map(lambda e, g: g.astype(e.dtype), expected, given)
    return Model(lambda key: given, model.apply)


def batched(model: Model) -> Callable[[Params, jax.Array], jax.Array]:
    """``apply`` over a batch: ``(params, xs: (batch, ...)) -> ys: (batch, ...)`` via ``jax.vmap``."""
    return jax.vmap(model.apply, in_axes=(None, 0))


# ---- layers for images and sequences: inputs are one example, channels (features) last ----


def _tuple(value, n: int, what: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, numbers.Integral) and not isinstance(value, bool) else tuple(value)
    if len(values) != n:
        raise ValueError(f"{what} needs {n} values, one per spatial axis, got {value!r}")
    return tuple(_check_size(v, what) for v in values)


def _padding(padding, n: int):
    """``"SAME"``, ``"VALID"``, an int (both sides of every axis), ``n`` ints (both sides of each
    axis) or ``n`` ``(low, high)`` pairs (one pair when ``n`` is 1)."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or (low, high) pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool) and padding >= 0:
        return [(int(padding), int(padding))] * n
    padding = list(padding)
    if n == 1 and len(padding) == 2 and all(isinstance(p, numbers.Integral) for p in padding):
        padding = [tuple(padding)]  # one axis: (low, high)
    pairs = [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding]
    if len(pairs) != n or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(f"padding needs {n} (low, high) pairs of non-negative ints, got {padding!r}")
    return [(int(a), int(b)) for a, b in pairs]


def _along_last(v: jax.Array, like: jax.Array) -> jax.Array:
    """A ``(features,)`` vector shaped to broadcast along ``like``'s last axis (explicit rank)."""
    return jnp.reshape(v, (1,) * (like.ndim - 1) + v.shape)


def _check_input(x: jax.Array, ndim: int, channels: int | None, name: str) -> None:
    if x.ndim != ndim or (channels is not None and x.shape[-1] != channels):
        want = f"{ndim - 1} spatial axes and {channels} channels last" if channels else f"{ndim} axes"
        raise ValueError(
            f"{name}: input has shape {x.shape}, expected one example with {want}; "
            "use jaxnet.batched (vmap) for a batch"
        )


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    activation: str | Activation | None = None,
    *,
    ndim: int = 2,
    stride: int | Sequence[int] = 1,
    padding="SAME",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    w_init: Initializer | None = None,
    dtype=jnp.float32,
) -> Model:
    """An N-d convolution (cross-correlation, as in PyTorch and ``lax.conv``) of one example.

    Args:
      in_channels, out_channels: channels of the input and the output; both divisible by ``groups``.
      kernel_size: the window, one int for every axis or one per spatial axis.
      activation: applied after the bias (a name, a callable or None).
      ndim: number of spatial axes (1 for sequences, 2 for images); :func:`conv1d` and
        :func:`conv2d` set it.
      stride, dilation: per spatial axis (or one int).
      padding: ``"SAME"`` (output size ``ceil(size / stride)``), ``"VALID"``, an int added on both
        sides of every axis, or ``(low, high)`` pairs.
      groups: feature groups (``groups == in_channels`` is a depthwise convolution).

    Returns:
      A :class:`Model` with params ``{"w": (*kernel_size, in_channels // groups, out_channels),
      "b": (out_channels,)}`` and ``apply``: ``(*spatial, in_channels) -> (*spatial', out_channels)``.
    """
    in_channels, out_channels = _check_size(in_channels, "in_channels"), _check_size(out_channels, "out_channels")
    groups = _check_size(groups, "groups")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be divisible by groups")
    kernel = _tuple(kernel_size, ndim, "kernel_size")
    strides, dilations = _tuple(stride, ndim, "stride"), _tuple(dilation, ndim, "dilation")
    pad, act = _padding(padding, ndim), get_activation(activation)
    w_init = w_init or default_initializer(activation)
    if ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")

    def init(key: PRNGKey) -> Params:
        shape = (*kernel, in_channels // groups, out_channels)
        return {"w": w_init(key, shape, dtype), "b": jnp.zeros((out_channels,), dtype)}

    layout = (strides, pad, dilations, groups)

    def apply(params: Params, x: jax.Array) -> jax.Array:
        _check_input(x, ndim + 1, in_channels, "conv")
        cpu, default = (functools.partial(f, layout=layout) for f in (_conv_by_shifts, _conv_by_library))
        y = jax.lax.platform_dependent(x, params["w"], cpu=cpu, default=default)
        return act(y + _along_last(params["b"], y))

    return Model(init, apply)


def _conv_by_library(x, w, layout):
    """The convolution of one example ``(*spatial, c)`` by ``lax.conv_general_dilated`` (cuDNN on GPU)."""
    strides, padding, dilations, groups = layout
    spatial = "DHW"[-(x.ndim - 1) :]
    numbers_ = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    y = jax.lax.conv_general_dilated(
        x[None], w, strides, padding, rhs_dilation=dilations, dimension_numbers=numbers_, feature_group_count=groups
    )
    return y[0]


def _conv_by_shifts(x, w, layout):
    """The convolution of one example ``(*spatial, c)`` with ``w: (*kernel, c // groups, out)`` as
    shifted strided slices and one contraction (im2col). On CPU, XLA runs this several times
    faster than its own convolution inside the epoch's loop, whose kernel gradient it computes
    slowly there (bench/README.md, "Convolutions on CPU")."""
    strides, padding, dilations, groups = layout
    kernel, (c_in, out) = w.shape[:-2], w.shape[-2:]
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pads = jax.lax.padtype_to_pads(x.shape[:-1], dilated, strides, padding) if isinstance(padding, str) else padding
    x = jnp.pad(x, [*pads, (0, 0)])
    sizes = [(n - k) // s + 1 for n, k, s in zip(x.shape[:-1], dilated, strides)]
    columns = [
        x[tuple(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in zip(offset, dilations, sizes, strides))]
        for offset in itertools.product(*(range(k) for k in kernel))
    ]
    patches = jnp.stack(columns, axis=-2)  # (*sizes, taps, c)
    taps = len(columns)
    patches = jnp.reshape(patches, (*sizes, taps, groups, c_in))
    w = jnp.reshape(w, (taps, c_in, groups, out // groups))
    return jnp.reshape(jnp.einsum("...tgc,tcgo->...go", patches, w), (*sizes, out))


def conv1d(in_channels: int, out_channels: int, kernel_size: int, activation=None, **options) -> Model:
    """A 1-D convolution: ``(length, in_channels) -> (length', out_channels)``; see :func:`conv`."""
    return conv(in_channels, out_channels, kernel_size, activation, ndim=1, **options)


def conv2d(in_channels: int, out_channels: int, kernel_size, activation=None, **options) -> Model:
    """A 2-D convolution: ``(height, width, in_channels) -> (height', width', out_channels)``; see :func:`conv`."""
    return conv(in_channels, out_channels, kernel_size, activation, ndim=2, **options)


def _pool(reduce, init_value, window, stride, padding, ndim, mean: bool) -> Model:
    window = _tuple(window, ndim, "window")
    strides = window if stride is None else _tuple(stride, ndim, "stride")
    pad = _padding(padding, ndim)
    pad = pad if isinstance(pad, str) else [*pad, (0, 0)]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        _check_input(x, ndim + 1, None, "pooling")
        y = jax.lax.reduce_window(x, init_value(x.dtype), reduce, (*window, 1), (*strides, 1), pad)
        return y / math.prod(window) if mean else y

    return Model(lambda key: {}, apply)


def max_pool(window, stride=None, padding="VALID", *, ndim: int = 2) -> Model:
    """Max pooling of one example ``(*spatial, channels)`` over ``window`` (stride: the window)."""
    return _pool(jax.lax.max, lambda dtype: -jnp.inf, window, stride, padding, ndim, False)


def avg_pool(window, stride=None, padding="VALID", *, ndim: int = 2) -> Model:
    """Average pooling of one example ``(*spatial, channels)`` over ``window`` (stride: the window).

    Padded cells count as zeros in the average (``count_include_pad``, as PyTorch and Flax by default)."""
    return _pool(jax.lax.add, lambda dtype: jnp.zeros((), dtype), window, stride, padding, ndim, True)


def global_avg_pool() -> Model:
    """The mean over every axis but the last: ``(*spatial, channels) -> (channels,)``."""
    return Model(lambda key: {}, lambda params, x: jnp.mean(x, axis=tuple(range(x.ndim - 1))))


def global_max_pool() -> Model:
    """The maximum over every axis but the last: ``(*spatial, channels) -> (channels,)``."""
    return Model(lambda key: {}, lambda params, x: jnp.max(x, axis=tuple(range(x.ndim - 1))))


def flatten() -> Model:
    """One example as a vector: ``(...) -> (prod(...),)``."""
    return Model(lambda key: {}, lambda params, x: jnp.reshape(x, (-1,)))


def reshape(shape: Sequence[int]) -> Model:
    """One example reshaped to ``shape`` (one entry may be -1), e.g. ``(64,) -> (8, 8, 1)``."""
    shape = tuple(int(d) for d in shape)
    return Model(lambda key: {}, lambda params, x: jnp.reshape(x, shape))


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
    return float(rate)


def dropout(rate: float) -> StatefulModel:
    """Inverted dropout: in training each unit is zeroed with probability ``rate`` and the rest are
    scaled by ``1 / (1 - rate)``; in eval mode the identity. Any shape; no params, state ``{}``.

    Its random mask comes from the context's key (distinct per example and step)."""
    rate = _check_rate(rate)

    def apply(params, state, x, ctx: Context):
        if not ctx.train or rate == 0.0:
            return x, state
        if ctx.key is None:
            raise ValueError("dropout in training mode needs a PRNG key: train through jaxnet, or give the context one")
        keep = jax.random.bernoulli(ctx.key, 1.0 - rate, jnp.shape(x))
        return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)), state

    return StatefulModel(lambda key: ({}, {}), apply)


def batch_norm(features: int, *, momentum: float = 0.9, epsilon: float = 1e-5, dtype=jnp.float32) -> StatefulModel:
    """Batch normalization over the batch (and the spatial axes) of one example's features (last axis).

    In training it normalizes with the statistics of the batch that jaxnet vmaps over (the
    context's batch axis; padding examples are left out) and updates running statistics
    ``running = momentum * running + (1 - momentum) * batch`` (the biased variance); in eval mode
    it uses the running statistics. Under data parallelism the batch is the global batch.

    Returns:
      A :class:`StatefulModel`: params ``{"scale": (features,), "bias": (features,)}``, state
      ``{"mean": (features,), "var": (features,)}``; ``apply``: ``(..., features) -> (..., features)``.
    """
    features = _check_size(features, "features")
    if isinstance(momentum, bool) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")

    def init(key):
        ones, zeros = jnp.ones((features,), dtype), jnp.zeros((features,), dtype)
        return {"scale": ones, "bias": zeros}, {"mean": zeros, "var": ones}

    def apply(params, state, x, ctx: Context):
        if x.shape[-1:] != (features,):
            raise ValueError(f"batch_norm: input has shape {x.shape}, expected {features} features last")
        axes = tuple(range(x.ndim - 1))
        if ctx.train:
            mean = ctx.mean(jnp.mean(x, axis=axes))
            var = ctx.mean(jnp.mean(jnp.square(x - _along_last(mean, x)), axis=axes))
            state = {
                "mean": momentum * state["mean"] + (1 - momentum) * jax.lax.stop_gradient(mean),
                "var": momentum * state["var"] + (1 - momentum) * jax.lax.stop_gradient(var),
            }
        else:
            mean, var = state["mean"], state["var"]
        scale = params["scale"] * jax.lax.rsqrt(var + epsilon)
        y = (x - _along_last(mean, x)) * _along_last(scale, x) + _along_last(params["bias"], x)
        return y, state

    return StatefulModel(init, apply)


def layer_norm(features: int, *, epsilon: float = 1e-5, dtype=jnp.float32) -> Model:
    """Layer normalization over the last axis: ``(..., features) -> (..., features)``, params
    ``{"scale": (features,), "bias": (features,)}`` (ones and zeros)."""
    features = _check_size(features, "features")

    def apply(params, x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + epsilon)
        return y * _along_last(params["scale"], y) + _along_last(params["bias"], y)

    return Model(lambda key: {"scale": jnp.ones((features,), dtype), "bias": jnp.zeros((features,), dtype)}, apply)


def embedding(vocab_size: int, dim: int, *, dtype=jnp.float32) -> Model:
    """A lookup table: integer ids ``(...)`` -> vectors ``(..., dim)``; params ``{"table": (vocab_size, dim)}``
    (normal, variance ``1 / dim``). An id outside ``[0, vocab_size)`` gives NaN (a non-finite loss
    in training), never a silently clamped row."""
    vocab_size, dim = _check_size(vocab_size, "vocab_size"), _check_size(dim, "dim")

    def init(key):
        return {"table": jax.random.normal(key, (vocab_size, dim), dtype) / math.sqrt(dim)}

    def apply(params, ids):
        if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
            raise TypeError(f"embedding: ids must be integers, got {jnp.asarray(ids).dtype}")
        table = params["table"]
        ids = jnp.where(ids < 0, table.shape[0], ids)  # (take would count a negative id from the end)
        return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)

    return Model(init, apply)


def embed_features(width: int, features: Sequence[int], rows: Sequence[int], dim: int) -> Model:
    """One example's features ``(width,)`` with the code features at ``features`` (integer-valued
    floats, feature ``features[i]`` in ``[0, rows[i])``) replaced by learned vectors ``(dim,)``
    each: out ``(width + len(features) * (dim - 1),)``, the other features first, in order, then
    the vectors. Params: one :func:`embedding` table per code feature."""
    width, dim = _check_size(width, "width"), _check_size(dim, "dim")
    features = [int(j) for j in features]
    keep = [j for j in range(width) if j not in set(features)]
    tables = [embedding(int(v), dim) for v in rows]

    def init(key):
        return [t.init(k) for t, k in zip(tables, jax.random.split(key, len(tables)))]

    def apply(params, x):
        vectors = [t.apply(p, x[j].astype(jnp.int32)) for t, p, j in zip(tables, params, features)]
        return jnp.concatenate([x[jnp.asarray(keep, jnp.int32)], *vectors])

    return Model(init, apply)


def residual(*layers: Model | StatefulModel) -> Model | StatefulModel:
    """``x + serial(*layers)(x)``: a skip connection around the layers (same output shape as input)."""
    body = serial(*layers)
    if isinstance(body, StatefulModel):

        def apply(params, state, x, ctx: Context):
            y, state = body.apply(params, state, x, ctx)
            return x + y, state

        return body._replace(apply=apply)
    return Model(body.init, lambda params, x: x + body.apply(params, x))


def multi_head_attention(dim: int, num_heads: int, *, causal: bool = False, dtype=jnp.float32) -> Model:
    """Multi-head self-attention of one sequence: ``(length, dim) -> (length, dim)``.

    ``softmax(q k^T / sqrt(dim / num_heads)) v`` per head, the heads concatenated and projected,
    computed by :func:`attention`. With ``causal``, position ``i`` attends to positions ``<= i`` only.

    Returns:
      A :class:`Model` with params ``{"q", "k", "v", "o"}``, each ``{"w": (dim, dim), "b": (dim,)}``
      (as :func:`dense`; PyTorch's ``in_proj_weight`` is the transposed ``q``, ``k``, ``v`` weights).
    """
    dim, num_heads = _check_size(dim, "dim"), _check_size(num_heads, "num_heads")
    if dim % num_heads:
        raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
    projection = dense(dim, dim, w_init=jax.nn.initializers.glorot_uniform(), dtype=dtype)

    def init(key):
        return {name: projection.init(k) for name, k in zip("qkvo", jax.random.split(key, 4))}

    def apply(params, x):
        _check_input(x, 2, dim, "multi_head_attention")
        q, k, v = (split_heads(projection.apply(params[n], x), num_heads) for n in "qkv")
        out = attention(q, k, v, causal=causal)
        return projection.apply(params["o"], jnp.reshape(out, (x.shape[0], dim)))

    return Model(init, apply)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, mask=None) -> jax.Array:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(h)) v`` per head: queries ``q``
    ``(..., T, heads, h)`` over keys and values ``(..., S, heads, h)`` -> ``(..., T, heads, h)``
    (``...``: none, or a batch axis).

    ``causal``: position ``i`` attends to positions ``<= i`` (``T == S``); ``mask``: a boolean array
    broadcasting to ``(..., heads, T, S)``, True where a query may attend. The softmax runs in
    float32 for lower-precision inputs.

    On GPUs and TPUs it is ``jax.nn.dot_product_attention`` (cuDNN's fused kernel on NVIDIA GPUs).
    On the CPU it is the same computation with the heads laid out before the positions, which XLA's
    CPU backend runs as plain batched matmuls: the training step of nanoGPT's CPU-sized GPT is
    10-12% faster so. ``jax.lax.platform_dependent`` picks one when the program is compiled.
    """

    def fused(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

    def heads_first(q, k, v):
        return _heads_first_attention(q, k, v, causal, mask)

    return jax.lax.platform_dependent(q, k, v, cpu=heads_first, default=fused)


def _heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, mask) -> jax.Array:
    """:func:`attention` with the heads before the positions, ``(..., heads, T, h)``: the scores in
    float32 (as ``jax.nn.dot_product_attention`` computes them), masked with -1e30."""
    q, k, v = (jnp.swapaxes(a, -3, -2) for a in (q, k, v))
    scores = jnp.einsum("...th,...sh->...ts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    masks = [jnp.tril(jnp.ones(scores.shape[-2:], bool))] if causal else []
    for visible in masks + ([] if mask is None else [mask]):
        visible = jnp.reshape(visible, (1,) * (scores.ndim - jnp.ndim(visible)) + jnp.shape(visible))
        scores = jnp.where(visible, scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("...ts,...sh->...th", weights, v), -3, -2)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``(T, dim) -> (T, num_heads, dim / num_heads)``: the layout of ``jax.nn.dot_product_attention``."""
    return jnp.reshape(x, (x.shape[0], num_heads, x.shape[-1] // num_heads))


def transformer_block(
    dim: int, num_heads: int, mlp_dim: int, *, causal: bool = False, dropout_rate: float = 0.0, dtype=jnp.float32
) -> Model | StatefulModel:
    """A pre-norm transformer block of one sequence, ``(length, dim) -> (length, dim)``:
    ``x + attention(layer_norm(x))`` then ``x + mlp(layer_norm(x))`` (a GELU MLP of width
    ``mlp_dim``), each branch followed by dropout when ``dropout_rate > 0`` (then the block is a
    :class:`StatefulModel`). Params: ``[attention branch, mlp branch]`` as :func:`serial` lists."""
    extra = [dropout(dropout_rate)] if _check_rate(dropout_rate) > 0 else []
    attention = residual(layer_norm(dim, dtype=dtype), multi_head_attention(dim, num_heads, causal=causal), *extra)
    feed_forward = residual(
        layer_norm(dim, dtype=dtype), dense(dim, mlp_dim, "gelu", dtype=dtype), dense(mlp_dim, dim, dtype=dtype), *extra
    )
    return serial(attention, feed_forward)
