"""What a model is and what a step costs: layers, output shapes, parameter counts, XLA's figures.

:func:`summary` needs no weights and allocates none: params come from ``jax.eval_shape`` of the
model's ``init`` (or are given), shapes from ``jax.eval_shape`` of each layer, and the costs from
compiling the forward pass (and the training step, with a loss) for one batch and asking XLA's cost
and memory analyses. jaxnet's :func:`jaxnet.serial` models (``mlp``, ``cnn``, your own stacks) are
listed layer by layer; any other model (Flax, Equinox, Haiku, a hand-written pair) as one row per
top-level entry of its params.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnet.base import Context
from jaxnet.forward import AnyModel, apply_batch, check_model, init_model
from jaxnet.layers import as_stateful
from jaxnet.losses import get_loss
from jaxnet.step import init_state, make_update


class Row(NamedTuple):
    """One layer: its name, the shape of its output for one example, and its parameter count."""

    name: str
    output_shape: tuple
    params: int


class Cost(NamedTuple):
    """XLA's figures for one compiled program (None where the backend gives none).

    Attributes:
      flops: floating-point operations of one call (XLA's cost analysis).
      bytes_accessed: bytes read and written by its operations.
      argument_bytes, output_bytes, temp_bytes: its buffers (XLA's memory analysis).
    """

    flops: float | None
    bytes_accessed: float | None
    argument_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None


class Summary(NamedTuple):
    """What :func:`summary` found; ``str()`` formats it as a table."""

    rows: list[Row]
    params: int
    state: int
    batch_size: int
    forward: Cost
    step: Cost | None

    def __str__(self) -> str:
        return format_summary(self)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _name(layer) -> str:
    """A layer's name from the function that builds it: ``dense``, ``conv``, ``dropout`` ..."""
    apply = layer.apply
    name = getattr(apply, "__qualname__", type(apply).__name__).split(".<locals>")[0]  # a class: GPT
    return re.sub(r"^_+", "", name.split(".")[-1]) or "layer"


def _rows(model: AnyModel, params, state, x) -> tuple[list[Row], jax.ShapeDtypeStruct]:
    """One row per layer of a :func:`jaxnet.serial` model (nested stacks expanded), else one row;
    and the output's shape and dtype."""
    layers = getattr(model.apply, "layers", None)  # a tuple on serial models
    if not isinstance(layers, tuple):
        out = jax.eval_shape(lambda p, s, e: _apply_one(model, p, s, e), params, state, x)
        return [Row(_name(model), tuple(out.shape), _count(params))], out
    rows = []
    if getattr(model.apply, "stacked", False):  # jaxnet.repeat: one tree, a leading axis of the layers
        params, states = ([_layer_of(tree)] * len(layers) for tree in (params, state or {}))
    else:
        states = state if isinstance(state, list) else [{}] * len(layers)
    for i, (layer, p, s) in enumerate(zip(layers, params, states)):
        inner, x = _rows(layer, p, s, x)
        rows.extend(r._replace(name=f"{i}.{r.name}") for r in inner)
    return rows, x


def _layer_of(stacked):
    """The shapes of one layer of ``stacked`` (every leaf with a leading axis of the layers)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stacked)


def _apply_one(model: AnyModel, params, state, x):
    layer = as_stateful(model)
    return layer.apply(params, state if state is not None else {}, x, Context(train=False))[0]


PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "V100": 125.0,
    "TPU v6 lite": 918.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
    "TPU v4": 275.0,
}
"""Dense bfloat16 (float16 for the V100) peak TFLOP/s of one device, from the vendors' data sheets,
by a part of JAX's ``device_kind`` (the first that matches: "H100 PCIe" before "H100")."""


def peak_tflops(device=None) -> float | None:
    """The :data:`PEAK_TFLOPS` of ``device`` (default: the first), None when it is not listed (CPUs)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in kind), None)


def _cost(compiled) -> Cost:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jaxlibs: one dict per program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    try:
        memory = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        memory = None

    def size(name):
        return None if memory is None else int(getattr(memory, name, 0))

    return Cost(
        analysis.get("flops"),
        analysis.get("bytes accessed"),
        size("argument_size_in_bytes"),
        size("output_size_in_bytes"),
        size("temp_size_in_bytes"),
    )


def _targets(loss, outputs: jax.ShapeDtypeStruct, batch_size: int) -> jax.ShapeDtypeStruct:
    if get_loss(loss).integer_labels:  # a label per example, or per token of a sequence's (T, V) logits
        return jax.ShapeDtypeStruct((batch_size, *outputs.shape[1:-1]), jnp.int32)
    return jax.ShapeDtypeStruct((batch_size, *outputs.shape[1:]), jnp.float32)


def summary(
    model: AnyModel,
    example,
    *,
    params=None,
    model_state=None,
    batch_size: int = 32,
    loss=None,
    optimizer: optax.GradientTransformation | None = None,
) -> Summary:
    """Layers, output shapes, parameter counts and XLA's costs of ``model`` on inputs like ``example``.

    Args:
      model: a :class:`jaxnet.Model` or :class:`jaxnet.StatefulModel`.
      example: one example (no batch axis): an array or a ``jax.ShapeDtypeStruct``.
      params, model_state: the model's (default: the shapes ``init`` gives, nothing allocated).
      batch_size: the batch of the programs whose costs are measured.
      loss: with a loss (a name, callable or :class:`jaxnet.LossSpec`), the training step's
        costs too: ``make_update(model, loss, optimizer)`` on a batch.
      optimizer: the step's optimizer (default ``optax.adam(1e-3)``).

    Returns:
      A :class:`Summary` (``print`` it for the table). FLOPs and bytes are XLA's estimates for the
      compiled program on the default device.
    """
    check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not hasattr(example, "shape") or not hasattr(example, "dtype"):
        raise TypeError(
            f"example must be one example as an array or jax.ShapeDtypeStruct, got {type(example).__name__}"
        )
    x = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
    if params is None:
        params, model_state = jax.eval_shape(lambda: init_model(model, jax.random.key(0)))
    rows, _ = _rows(model, params, model_state, x)
    batch = jax.ShapeDtypeStruct((batch_size, *x.shape), x.dtype)
    forward = jax.jit(lambda p, s, xs: apply_batch(model, p, s, xs)[0])
    outputs = jax.eval_shape(forward, params, model_state, batch)
    step = None
    if loss is not None:
        optimizer = optimizer if optimizer is not None else optax.adam(1e-3)
        state = jax.eval_shape(lambda p, s: init_state(p, optimizer, jax.random.key(0), s), params, model_state)
        update = jax.jit(make_update(model, loss, optimizer), donate_argnums=(0,))
        step = _cost(update.lower(state, (batch, _targets(loss, outputs, batch_size))).compile())
    return Summary(
        rows,
        _count(params),
        _count(model_state),
        batch_size,
        _cost(forward.lower(params, model_state, batch).compile()),
        step,
    )


def _human(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def _bytes(value) -> str:
    if value is None:
        return "n/a"
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.2f} {name}"
    return f"{value} B"


def format_summary(s: Summary) -> str:
    """The table of a :class:`Summary`: layers, then the programs' costs."""
    width = max([len("layer"), *(len(r.name) for r in s.rows)])
    shapes = [str(tuple(r.output_shape)) for r in s.rows]
    shape_width = max([len("output (one example)"), *(len(t) for t in shapes)])
    lines = [f"{'layer':<{width}}  {'output (one example)':<{shape_width}}  {'params':>10}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{r.name:<{width}}  {t:<{shape_width}}  {r.params:>10,}" for r, t in zip(s.rows, shapes)]
    lines.append("-" * len(lines[0]))
    lines.append(f"params: {s.params:,}" + (f"   state (not trained): {s.state:,}" if s.state else ""))
    for name, cost in (("forward", s.forward), ("train step", s.step)):
        if cost is None:
            continue
        lines.append(
            f"{name}, batch {s.batch_size}: {_human(cost.flops, 'FLOP')}, {_human(cost.bytes_accessed, 'B')} accessed; "
            f"buffers: arguments {_bytes(cost.argument_bytes)}, outputs {_bytes(cost.output_bytes)}, "
            f"temporaries {_bytes(cost.temp_bytes)}"
        )
    return "\n".join(lines)


def as_dict(s: Summary) -> dict:
    """A :class:`Summary` as plain JSON-ready values."""
    return {
        "layers": [{"name": r.name, "output_shape": list(r.output_shape), "params": r.params} for r in s.rows],
        "params": s.params,
        "state": s.state,
        "batch_size": s.batch_size,
        "forward": s.forward._asdict(),
        "train_step": None if s.step is None else s.step._asdict(),
    }
