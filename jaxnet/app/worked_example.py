"""The worked example: one SGD step of the hand-worked 3-2-2 sigmoid network, computed by autodiff.

The network, its weights, input, target and learning rate are those of the hand-worked notes
(see ``docs/worked-example.md``, which also lists the notes' slips). Notation follows the notes:
``w_jk^l`` is the weight from input ``k`` (``a_k^{l-1}``, with ``a^0 = x``) to neuron ``j`` of
layer ``l``; layer 1 is the hidden layer and layer 2 the output layer. jaxnet's dense params
store ``w`` as ``(in, out)``, so ``w_jk^l`` is ``params[l-1]["w"][k, j]``.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnet import _checks as checks
from jaxnet.base import Model, Params
from jaxnet.layers import dense, get_activation, mlp, with_params
from jaxnet.losses import half_sum_squares
from jaxnet.step import init_state, make_update

SIZES = (3, 2, 2)
"""Layer sizes of the notes' network: 3 inputs, 2 hidden sigmoid units, 2 sigmoid outputs."""

NOTES_WEIGHTS = (
    ((0.1, 0.2, 0.5), (0.4, 0.1, 0.5)),  # layer 1 (hidden): w_jk^1, j = neuron, k = input
    ((0.6, 0.1), (0.5, 0.2)),  # layer 2 (output): w_jk^2
)
"""The notes' weights, ``NOTES_WEIGHTS[l-1][j-1][k-1] = w_jk^l``."""

NOTES_BIASES = ((0.2, 0.2), (0.2, 0.1))
"""The notes' biases, ``NOTES_BIASES[l-1][j-1] = b_j^l``."""

NOTES_X = (0.5, 0.5, 0.1)
"""The input the notes state (their forward-pass numbers come from ``(0.5, 0.5, 0.5)`` instead)."""

NOTES_TARGET = (0.9, 0.1)
"""The target (the notes call it y-hat)."""

NOTES_LR = 0.1
"""The learning rate (the notes' eta)."""

ACTIVATION = "sigmoid"


def notes_params(dtype=jnp.float32) -> Params:
    """The notes' weights and biases as jaxnet ``mlp`` params: ``[{"w": (in, out), "b": (out,)}, ...]``."""
    return [{"w": jnp.asarray(w, dtype).T, "b": jnp.asarray(b, dtype)} for w, b in zip(NOTES_WEIGHTS, NOTES_BIASES)]


def network(dtype=jnp.float32) -> Model:
    """The notes' network: ``mlp([3, 2, 2])``, sigmoid hidden and output units, the notes' weights.

    ``init`` ignores its key and returns :func:`notes_params`; ``apply`` maps ``(3,) -> (2,)``.
    """
    net = mlp(list(SIZES), activation=ACTIVATION, output_activation=ACTIVATION, dtype=dtype)
    return with_params(net, notes_params(dtype))


def _vector(value: Any, size: int, name: str) -> np.ndarray:
    """``value`` as a float64 vector of ``size`` finite numbers, or a ValueError/TypeError saying why not."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be {size} numbers, got the string {value!r}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a flat list of {size} numbers, got {value!r}") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be {size} numbers, got {value!r}")
    if arr.shape != (size,):
        got = f"{arr.size} numbers" if arr.ndim == 1 else f"shape {arr.shape}"
        net = "-".join(map(str, SIZES))
        raise ValueError(f"{name} must have {size} numbers (the network is {net}), got {got}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite numbers, got {arr.tolist()}")
    return arr


def check_inputs(x=None, target=None, lr=None) -> tuple[np.ndarray, np.ndarray, float]:
    """Validates the worked example's inputs; None selects the notes' value.

    Returns:
      ``(x: (3,), target: (2,), lr)`` as float64 numpy values.

    Raises:
      ValueError / TypeError: ``x`` is not 3 finite numbers, ``target`` not 2 finite numbers, or
        ``lr`` not a finite number greater than 0.
    """
    x = _vector(NOTES_X if x is None else x, SIZES[0], "x")
    target = _vector(NOTES_TARGET if target is None else target, SIZES[-1], "target")
    lr = NOTES_LR if lr is None else lr
    if isinstance(lr, (bool, str, bytes)) or np.ndim(lr) != 0:
        raise TypeError(f"lr must be a number, got {lr!r}")
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        raise TypeError(f"lr must be a number, got {lr!r}") from None
    return x, target, checks.number("lr", lr, 0.0, strict=True)


def _forward(params: Params, x: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """``[(z^l, a^l), ...]`` for every layer: ``z^l = W^l a^{l-1} + b^l``, ``a^l = sigma(z^l)``."""
    act = get_activation(ACTIVATION)
    out, a = [], x
    for p in params:
        in_dim, out_dim = p["w"].shape
        z = dense(in_dim, out_dim, dtype=p["w"].dtype).apply(p, a)  # the affine part of jaxnet's dense
        a = act(z)
        out.append((z, a))
    return out


def _matrix_jk(w: jax.Array) -> list[list[float]]:
    """jaxnet's ``(in, out)`` weight as the notes' ``w[j][k]`` (neuron j, input k) nested lists."""
    return np.asarray(w, np.float64).T.tolist()


def _layers_json(params: Params) -> list[dict[str, Any]]:
    return [{"w": _matrix_jk(p["w"]), "b": np.asarray(p["b"], np.float64).tolist()} for p in params]


def worked_example(x=None, target=None, lr=None, *, dtype=jnp.float64) -> dict[str, Any]:
    """The notes' network after one SGD step on one example, all derivatives by ``jax.grad``.

    The loss is ``C = 1/2 sum_i (a_i^2 - t_i)^2`` (:func:`jaxnet.half_sum_squares`); the step is
    jaxnet's :func:`~jaxnet.make_update` with ``optax.sgd(lr)`` on a batch of that one example.
    The default dtype is float64 (the computation runs under ``jax.enable_x64``), so the numbers
    are a reference for checking the notes; float32 gives the same to about 1e-7.

    Args:
      x: 3 input numbers; None for the notes' ``[0.5, 0.5, 0.1]``.
      target: 2 target numbers; None for the notes' ``[0.9, 0.1]``.
      lr: learning rate > 0; None for the notes' 0.1.
      dtype: ``jnp.float64`` or ``jnp.float32``.

    Returns:
      A JSON-ready dict of Python floats: ``x``, ``target``, ``lr``; ``layers``: per layer
      ``{"z", "a"}``; ``loss``; ``params`` (before the step), ``grads`` (dC/dw, dC/db) and
      ``updated`` (after the step): per layer ``{"w": w[j][k], "b": b[j]}``, where ``w[j][k]`` is
      the weight from input k to neuron j (the notes' ``w_jk``).

    Raises:
      ValueError / TypeError: bad ``x``, ``target``, ``lr`` or ``dtype`` (see :func:`check_inputs`).

    Examples:
      >>> r = worked_example(x=[0.5, 0.5, 0.5])
      >>> [round(v, 3) for v in r["layers"][0]["a"]]
      [0.646, 0.668]
    """
    x_np, t_np, lr = check_inputs(x, target, lr)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    with jax.enable_x64(dtype == jnp.float64):
        return _compute(x_np, t_np, lr, dtype)


@jax.jit
def _one_step(params: Params, x: jax.Array, t: jax.Array, lr: jax.Array):
    """Forward pass, loss, gradients and one SGD step, compiled as one program (shapes as in the notes)."""
    model = mlp(list(SIZES), activation=ACTIVATION, output_activation=ACTIVATION, dtype=x.dtype)
    loss, grads = jax.value_and_grad(lambda p: half_sum_squares(model.apply(p, x), t))(params)
    optimizer = optax.sgd(lr)
    update = make_update(model, half_sum_squares, optimizer)
    state, _ = update(init_state(params, optimizer, jax.random.key(0)), (x[None], t[None]))
    return _forward(params, x), loss, grads, state.params


def _compute(x_np: np.ndarray, t_np: np.ndarray, lr: float, dtype) -> dict[str, Any]:
    params = network(dtype).init(jax.random.key(0))  # the notes' weights; the key is ignored
    x, t = jnp.asarray(x_np, dtype), jnp.asarray(t_np, dtype)
    layers, loss, grads, updated = _one_step(params, x, t, jnp.asarray(lr, dtype))
    return {
        "x": x_np.tolist(),
        "target": t_np.tolist(),
        "lr": lr,
        "layers": [
            {"z": np.asarray(z, np.float64).tolist(), "a": np.asarray(a, np.float64).tolist()} for z, a in layers
        ],
        "loss": float(loss),
        "params": _layers_json(params),
        "grads": _layers_json(grads),
        "updated": _layers_json(updated),
    }


def _n(v: float) -> str:
    return f"{v:.6g}"


def _f(v: float) -> str:
    """A factor in a product: negative numbers in parentheses."""
    return f"({v:.6g})" if v < 0 else f"{v:.6g}"


def format_worked_example(result: dict[str, Any]) -> str:
    """The result of :func:`worked_example` as readable text in the notes' notation.

    Per layer: ``z_j^l`` (as the weighted sum it is), ``a_j^l``; then ``delta_j^l = dC/dz_j^l``
    by the chain rule, and for every weight and bias its gradient and value after the step.
    """
    x, target, lr = result["x"], result["target"], result["lr"]
    layers, params, grads, updated = result["layers"], result["params"], result["grads"], result["updated"]
    n = len(layers)
    name = {1: "hidden"} if n == 2 else {}
    name[n] = "output"

    def title(l):
        return f"Layer {l}" + (f" ({name[l]})" if l in name else "")

    inputs = [x] + [layer["a"] for layer in layers]  # inputs[l-1] = a^{l-1}
    lines = [
        f"Worked example: {'-'.join(str(len(v)) for v in inputs)} sigmoid network, "
        "C = 1/2 sum_j (a_j^2 - t_j)^2, one SGD step",
        f"x = {[_n(v) for v in x]}  target t = {[_n(v) for v in target]}  eta = {_n(lr)}".replace("'", ""),
        "w_jk^l: weight from input k (a_k^(l-1), a^0 = x) to neuron j of layer l; sigma(z) = 1/(1 + e^-z)",
        "",
        "Forward pass",
    ]
    for l, layer in enumerate(layers, start=1):
        lines.append(f"  {title(l)}")
        w, b, a_in = params[l - 1]["w"], params[l - 1]["b"], inputs[l - 1]
        for j, (z, a) in enumerate(zip(layer["z"], layer["a"]), start=1):
            terms = " + ".join(f"{_n(w[j - 1][k])}*{_n(a_in[k])}" for k in range(len(a_in)))
            lines.append(f"    z_{j}^{l} = {terms} + {_n(b[j - 1])} = {_n(z)}")
            lines.append(f"    a_{j}^{l} = sigma(z_{j}^{l}) = {_n(a)}")
    lines.append(f"  y = a^{n} = [{', '.join(_n(v) for v in layers[-1]['a'])}]")
    lines.append(f"  C = {_n(result['loss'])}")
    lines += ["", "Backward pass: delta_j^l = dC/dz_j^l (weights before the update)"]
    for l in range(n, 0, -1):
        a = layers[l - 1]["a"]
        delta = grads[l - 1]["b"]  # dC/db_j^l = delta_j^l since dz_j^l/db_j^l = 1
        lines.append(f"  {title(l)}")
        for j in range(len(a)):
            s = f"{_n(a[j])}*(1 - {_n(a[j])})"
            if l == n:
                back = f"({_n(a[j])} - {_n(target[j])})"
            else:
                w_next = params[l]["w"]
                back = " + ".join(f"{_n(w_next[i][j])}*{_f(grads[l]['b'][i])}" for i in range(len(w_next)))
                back = f"({back})"
            lines.append(f"    delta_{j + 1}^{l} = {back} * {s} = {_n(delta[j])}")
    lines += ["", f"Gradients and SGD step: dC/dw_jk^l = delta_j^l * a_k^(l-1), w' = w - {_n(lr)} * dC/dw"]
    for l in range(1, n + 1):
        lines.append(f"  {title(l)}")
        w, gw, uw = params[l - 1]["w"], grads[l - 1]["w"], updated[l - 1]["w"]
        a_in, delta = inputs[l - 1], grads[l - 1]["b"]
        for j in range(len(w)):
            for k in range(len(w[j])):
                lines.append(
                    f"    w_{j + 1}{k + 1}^{l} = {_n(w[j][k])}   dC/dw_{j + 1}{k + 1}^{l} = "
                    f"{_n(delta[j])}*{_n(a_in[k])} = {_n(gw[j][k])}   "
                    f"w_{j + 1}{k + 1}^{l}' = {_n(w[j][k])} - {_n(lr)}*{_f(gw[j][k])} = {_n(uw[j][k])}"
                )
        b, gb, ub = params[l - 1]["b"], grads[l - 1]["b"], updated[l - 1]["b"]
        for j in range(len(b)):
            lines.append(
                f"    b_{j + 1}^{l} = {_n(b[j])}   dC/db_{j + 1}^{l} = delta_{j + 1}^{l} = {_n(gb[j])}   "
                f"b_{j + 1}^{l}' = {_n(b[j])} - {_n(lr)}*{_f(gb[j])} = {_n(ub[j])}"
            )
    return "\n".join(lines)


__all__: Sequence[str] = [
    "NOTES_BIASES",
    "NOTES_LR",
    "NOTES_TARGET",
    "NOTES_WEIGHTS",
    "NOTES_X",
    "SIZES",
    "check_inputs",
    "format_worked_example",
    "network",
    "notes_params",
    "worked_example",
]
