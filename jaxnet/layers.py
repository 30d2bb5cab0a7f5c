"""Layers: initializers, activations, ``dense``, ``serial``, ``mlp`` and ``batched``.

Every layer is a :class:`jaxnet.Model`: ``init(key) -> params`` and ``apply(params, x) -> y``
for **one example**. Batches go through :func:`batched` (``jax.vmap``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxnet.base import Model, Params, PRNGKey

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
        return act(x @ params["w"] + params["b"])

    return Model(init, apply)


def activation_layer(activation: str | Activation) -> Model:
    """A parameter-free layer applying ``activation`` elementwise (params are ``{}``)."""
    act = get_activation(activation)
    return Model(lambda key: {}, lambda params, x: act(x))


def serial(*layers: Model) -> Model:
    """Composes layers in order, like ``stax.serial``; params are a list, one entry per layer.

    Each layer gets its own key, split from the key given to ``init``.
    """
    if not layers:
        raise ValueError("serial needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Model):
            raise TypeError(f"serial: layer {i} is a {type(layer).__name__}, not a jaxnet.Model")
    init_fns, apply_fns = zip(*layers)

    def init(key: PRNGKey) -> Params:
        keys = jax.random.split(key, len(init_fns))
        return [f(k) for f, k in zip(init_fns, keys)]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        for f, p in zip(apply_fns, params):
            x = f(p, x)
        return x

    return Model(init, apply)


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
    expected = jax.eval_shape(model.init, jax.random.key(0))
    given = jax.tree.map(jnp.asarray, params)
    if jax.tree.structure(expected) != jax.tree.structure(given):
        raise ValueError(
            f"params do not fit the model: expected structure {jax.tree.structure(expected)}, "
            f"got {jax.tree.structure(given)}"
        )
    for path, e, g in zip(
        (jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]),
        jax.tree.leaves(expected),
        jax.tree.leaves(given),
    ):
        if e.shape != g.shape:
            raise ValueError(f"params{path} has shape {g.shape}, the model expects {e.shape}")
    given = jax.tree.map(lambda e, g: g.astype(e.dtype), expected, given)
    return Model(lambda key: given, model.apply)


def batched(model: Model) -> Callable[[Params, jax.Array], jax.Array]:
    """``apply`` over a batch: ``(params, xs: (batch, ...)) -> ys: (batch, ...)`` via ``jax.vmap``."""
    return jax.vmap(model.apply, in_axes=(None, 0))
