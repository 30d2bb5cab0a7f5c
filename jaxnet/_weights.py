"""Example weights for training: per-example ``sample_weight`` and per-class ``class_weight``.

Both weigh each example's term of the training loss (each batch's loss is the weighted mean of its
examples'); validation and evaluation stay unweighted. Class weights are applied on the device from
each example's label, so they work with any data (in memory or streamed); sample weights travel
with resident arrays. ``"balanced"`` is scikit-learn's ``n / (classes * count(class))``.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.forward import apply_batch
from jaxnet.lm import GPT
from jaxnet.losses import IGNORE_INDEX, LossSpec


def output_shape(model, params, model_state, x_row: jax.ShapeDtypeStruct, name: str = "x") -> tuple:
    """The shape of the model's outputs for one example of shape ``x_row`` (from shapes only). A
    ValueError or TypeError of the model's is raised again naming the input ``name`` and its shape."""
    batch = jax.ShapeDtypeStruct((1, *x_row.shape), x_row.dtype)
    try:
        return jax.eval_shape(lambda p, s, x: apply_batch(model, p, s, x)[0], params, model_state, batch).shape[1:]
    except (ValueError, TypeError) as e:
        kind = ValueError if isinstance(e, ValueError) else TypeError
        raise kind(f"{name}: the model fails on an example of shape {x_row.shape} ({x_row.dtype}): {e}") from e


def check_class_id_shape(name: str, y_row: tuple, outputs: tuple) -> None:
    """Refuses class ids of shape ``y_row`` per example for outputs of shape ``outputs``: one id
    per row of class scores, ``outputs[:-1]``."""
    if tuple(y_row) != tuple(outputs[:-1]):
        want = "(n,)" if len(outputs) <= 1 else f"({', '.join(['n', *map(str, outputs[:-1])])})"
        raise ValueError(
            f"{name} has targets of shape {tuple(y_row)} per example, but the model's outputs are {tuple(outputs)} "
            f"(class scores): give one class id per row of scores, {name} of shape {want}"
        )


def check_target_shape(name: str, y_row: tuple, outputs: tuple) -> None:
    """Refuses targets of shape ``y_row`` per example for a loss that compares them with outputs
    of shape ``outputs`` element by element (``mse``, ``half_sse``, binary cross-entropy): they
    would broadcast silently. ``()`` and ``(1,)`` stand for each other."""
    if math.prod(y_row) != math.prod(outputs) or (tuple(y_row) != tuple(outputs) and math.prod(y_row) != 1):
        want = f"({', '.join(['n', *map(str, outputs)])})"
        raise ValueError(
            f"{name} has targets of shape {tuple(y_row)} per example, but the model's outputs are {tuple(outputs)}: "
            f"give {name} of shape {want}, one target per output"
        )


def check_binary_targets(name: str, y) -> None:
    """Refuses resident binary cross-entropy targets outside [0, 1]."""
    xp = jnp if isinstance(y, jax.Array) else np
    if y.size and not (float(xp.min(y)) >= 0 and float(xp.max(y)) <= 1):
        at, _ = first_place((y < 0) | (y > 1))
        raise ValueError(
            f"{name} holds {float(y[at])} at row {at[0]}: binary cross-entropy takes targets in [0, 1] (the "
            "probability of the positive class)"
        )


def num_classes(model, params, model_state, x_row: jax.ShapeDtypeStruct, spec: LossSpec) -> int:
    """The classes a classification model predicts: its outputs (2 for a one-output binary loss)."""
    shape = (1, *output_shape(model, params, model_state, x_row))
    outputs = shape[-1] if len(shape) > 1 else 1
    return 2 if spec.name == "sigmoid_binary_cross_entropy" and outputs == 1 else outputs


def check_class_targets(name: str, y, outputs: tuple) -> None:
    """Refuses resident class ids ``y`` ``(n, ...)`` that do not fit outputs of shape ``outputs``
    (:func:`check_class_id_shape`, :func:`check_class_ids`)."""
    check_class_id_shape(name, np.shape(y)[1:], outputs)
    check_class_ids(name, y, outputs[-1] if outputs else 1)


def check_class_dtype(name: str, dtype) -> None:
    """Refuses class-id targets that are not integers: a float id (0.5) would be truncated to a
    class silently, and float padding could not be told from a label."""
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise TypeError(
            f"{name} holds {np.dtype(dtype)} targets, but the loss takes integer class ids: give integer ids "
            f"({name}.astype(np.int32)), or a loss for {np.dtype(dtype)} targets (mse, sigmoid_binary_cross_entropy)"
        )


def check_class_ids(name: str, y, classes: int) -> None:
    """Refuses class-id targets ``y`` (resident, ``(n,)`` or ``(n, T)``) that are not integers
    (:func:`check_class_dtype`) or lie outside the model's ``classes``,
    :data:`~jaxnet.losses.IGNORE_INDEX` allowed where ``y`` has a token axis: a negative id would
    silently index from the end, one past it would give a NaN loss."""
    xp = jnp if isinstance(y, jax.Array) else np
    check_class_dtype(name, y.dtype)
    if y.size == 0 or (int(xp.min(y)) >= 0 and int(xp.max(y)) < classes):
        return
    tokens = y.ndim >= 2
    bad = (y < 0) | (y >= classes)
    if tokens:
        bad = bad & (y != IGNORE_INDEX)
    if not bool(xp.any(bad)):
        return
    at, where = first_place(bad)
    allowed = f"0 to {classes - 1}" + (f", or IGNORE_INDEX ({IGNORE_INDEX}) for padding" if tokens else "")
    raise ValueError(
        f"{name} holds the label {int(y[at])} at {where}, outside the model's {classes} classes: give class ids "
        f"{allowed}"
    )


def first_place(bad) -> tuple[tuple, str]:
    """``(index, "row r[, position p]")`` of the first True of ``bad`` ``(n, ...)``."""
    at = tuple(int(i) for i in np.argwhere(np.asarray(bad))[0])
    return at, f"row {at[0]}" + (f", position {', '.join(map(str, at[1:]))}" if len(at) > 1 else "")


def check_token_ids(name: str, ids, vocab: int) -> None:
    """Refuses resident input token ids ``(n, T)`` that are not integers or lie outside a
    vocabulary of ``vocab``: one outside it reads no embedding row (a NaN loss, which would blame
    the learning rate)."""
    xp = jnp if isinstance(ids, jax.Array) else np
    if not xp.issubdtype(ids.dtype, xp.integer):
        raise TypeError(f"{name} holds {ids.dtype} values: a GPT reads integer token ids ({name}.astype(np.int32))")
    if ids.size and (int(xp.min(ids)) < 0 or int(xp.max(ids)) >= vocab):
        at, where = first_place((ids < 0) | (ids >= vocab))
        raise ValueError(
            f"{name} holds the id {int(ids[at])} at {where}, outside the GPT's vocabulary of {vocab} ids: give "
            f"ids 0 to {vocab - 1}"
        )


def chunk_check(spec: LossSpec, model, outputs: tuple | None, row, target) -> Callable | None:
    """``check(prefix, arrays)`` of a streamed chunk's host arrays ``(x, y, ...)`` as it is read,
    ``row`` and ``target`` one example's shapes and ``outputs`` the model's for it
    (:func:`output_shape`; needed for cross-entropy): a GPT's input ids in its vocabulary
    (:func:`check_token_ids`), class ids in the model's classes (:func:`check_class_ids`), each
    named as ``a streamed chunk of {prefix}x``; None when there is nothing to check. Resident data
    is checked whole instead."""
    gpt = getattr(model, "apply", None)
    vocab = gpt.config.vocab_size if isinstance(gpt, GPT) else None
    classes = None
    if spec.name == "softmax_cross_entropy":
        classes = outputs[-1] if outputs else 1
    if vocab is None and classes is None:
        return None

    def check(prefix: str, arrays: tuple) -> None:
        if vocab is not None:
            check_token_ids(f"a streamed chunk of {prefix}x", arrays[0].reshape(-1, *row.shape), vocab)
        if classes is not None:
            check_class_ids(f"a streamed chunk of {prefix}y", arrays[1].reshape(-1, *target.shape), classes)

    return check


def integer_labels(y) -> np.ndarray:
    """Integer labels of targets ``(n,)`` or ``(n, 1)`` (0/1 floats of a binary loss included)."""
    y = np.asarray(y).reshape(len(y), -1)[:, 0]
    if not np.issubdtype(y.dtype, np.integer):
        y = np.round(y)
    return y.astype(np.int64)


def class_weights(class_weight, spec: LossSpec, classes: int, y=None) -> jax.Array | None:
    """The ``(classes,)`` weight of every class from ``class_weight``: None, ``"balanced"`` (needs
    the training targets ``y`` in memory) or a mapping ``{class: weight}`` (others weigh 1)."""
    if class_weight is None:
        return None
    if not (spec.integer_labels or spec.name == "sigmoid_binary_cross_entropy"):
        raise ValueError(f"class_weight needs a classification loss (integer labels), not {spec.name!r}")
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight must be 'balanced' or a mapping {{class: weight}}, got {class_weight!r}")
        if y is None:
            raise ValueError(
                "class_weight='balanced' counts the classes of y in memory: for streamed data give a mapping "
                "{class: weight}"
            )
        labels = integer_labels(y)
        check_class_ids("y", labels, classes)
        counts = np.bincount(labels, minlength=classes).astype(np.float64)
        present = counts > 0
        weights = np.ones(classes)
        weights[present] = len(labels) / (present.sum() * counts[present])
        return jnp.asarray(weights, jnp.float32)
    if not isinstance(class_weight, Mapping):
        raise TypeError(f"class_weight must be 'balanced' or a mapping {{class: weight}}, got {class_weight!r}")
    weights = np.ones(classes)
    for label, weight in class_weight.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < classes:
            raise ValueError(
                f"class_weight: class {label!r} is not one of the model's {classes} classes 0..{classes - 1}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
            raise ValueError(f"class_weight: the weight of class {label} must be a finite number >= 0, got {weight!r}")
        weights[int(label)] = weight
    if y is not None:
        check_class_ids("y", integer_labels(y), classes)
    return jnp.asarray(weights, jnp.float32)


def check_sample_weight(sample_weight, num_examples: int, tokens: tuple | None = None) -> jax.Array | None:
    """``sample_weight`` as a float32 ``(n,)`` array (or ``(n, T)``, one weight per token, where
    the targets have a token axis: ``tokens`` is their shape): finite, at least 0, not all 0."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight)
    if w.dtype == object or not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise TypeError(f"sample_weight must be an array of numbers, got dtype {w.dtype}")
    if w.shape != (num_examples,) and (tokens is None or w.shape != tuple(tokens)):
        per_token = f" or {tuple(tokens)}, one per token of y" if tokens is not None else ""
        raise ValueError(
            f"sample_weight must have shape ({num_examples},), one weight per example of x{per_token}; got {w.shape}"
        )
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("sample_weight must be finite and at least 0")
    if not (w > 0).any():
        raise ValueError("sample_weight is 0 for every example: nothing would train")
    return jnp.asarray(w, jnp.float32)


def weighed(weight, sample_weight, index):
    """The batches' weights ``weight`` ``(..., nb, b)`` (1 for a real row, 0 for padding) times
    the sample weights of their rows ``index``: ``(..., nb, b)``, or ``(..., nb, b, T)`` with a
    weight per token (``sample_weight`` ``(n, T)``)."""
    rows = sample_weight[index].astype(weight.dtype)
    return weight.reshape(weight.shape + (1,) * (rows.ndim - weight.ndim)) * rows


def parse_class_weight(text: str | None, classes=None) -> str | dict[int, float] | None:
    """``"balanced"``, or ``"0:1,1:5"`` as ``{0: 1.0, 1: 5.0}`` (the command line's spelling); a
    class may be named (``"snow:10,drizzle:5"``) when ``classes``, the class names in label order,
    are given (without them a name is kept as text, to be resolved once they are known)."""
    if text is None or text == "balanced":
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected 'balanced' or 'class:weight,...', got {text!r}")
    mapping: dict = {}
    for part in text.split(","):
        label, sep, weight = part.rpartition(":")
        label = label.strip()
        try:
            if not sep or not label:
                raise ValueError
            value = float(weight)
        except ValueError:
            raise ValueError(f"expected 'balanced' or 'class:weight,...' such as '0:1,1:5', got {text!r}") from None
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"the weight of class {label} must be a finite number >= 0, got {weight!r}")
        key = _class_key(label, classes, text)
        if key in mapping:
            raise ValueError(f"class {label} is given twice in {text!r}")
        mapping[key] = value
    return mapping


def _class_key(label: str, classes, text: str):
    if classes is not None and label in classes:
        return list(classes).index(label)
    if label.isascii() and label.isdigit():
        return int(label)
    if classes is None:
        return label  # a name, resolved when the class names are known
    raise ValueError(f"class-weight {text!r} names the class {label!r}, which the data lacks: its classes are "
                     + ", ".join(map(str, classes)))  # fmt: skip
