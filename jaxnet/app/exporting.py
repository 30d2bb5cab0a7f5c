"""A trained model as one portable program: ``jax.export`` of its whole prediction.

:func:`export` serializes ``predict(x_raw: (n, c) float32) -> (n, out) float32``: a table's
preprocessing (gaps filled, their indicators, dates as their calendar, categories one-hot or embedded:
:func:`jaxnet.app.tables.encode`), the training split's feature standardization, every member's
forward pass (an ensemble averages them), and the output as ``jaxnet predict`` gives it (class
probabilities, or regression outputs in the target's units), with the weights inside and a batch
dimension ``n`` that varies. Running it needs jax alone:

    import jax, json, numpy as np
    program = jax.export.deserialize(open("model.jaxexport", "rb").read())
    predictions = np.asarray(program.call(np.asarray(x, np.float32)))   # x: (n, c) raw matrix

``x`` has one column per input column, in the order of ``columns`` in ``model.jaxexport.json``
(written beside the program): numbers as they are, NaN for a gap, a categorical column's value as
its index in that column's ``categories`` (-1 for a value not among them), a date as its days
since 1970-01-01 (:func:`jaxnet.app.tables.raw_matrix`). For a model trained
on arrays, the columns are its features. The JSON also holds ``classes`` (the names of the
probabilities' columns, when the labels were names). The program's platform is the one it was
exported on, unless ``platforms`` names others (``("cpu", "cuda")``).

A language model (``--task lm``) exports ``predict(ids: (n, C) int32) -> (n, C, V) float32``: the
probabilities of the next token after each position of ``n`` windows of the context ``C`` (an
ensemble's average). The model is causal, so a window shorter than ``C`` is padded on the right
with any id and read at its last real position. The JSON holds ``context``, ``vocab_size`` and
the ``tokenizer`` (:func:`jaxnet.text.tokenizer_from_json` reads it).

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import _atomic as atomic
from jaxnet.app import files, saved, tables
from jaxnet.forward import apply_batch


def prediction_function(model: files.SavedModel, arch: str | None = None):
    """``predict(x_raw: (n, d)) -> (n, out)`` of a saved model, pure jax, the weights closed over
    (a language model's: :func:`next_tokens_function`)."""
    if model.meta.get("task") == "lm":
        return next_tokens_function(model, arch)
    bound = saved.bind_saved(model, arch)
    encoder = saved.encoder_of(model)
    mean, std = (jnp.asarray(a, jnp.float32)[None] for a in (model.mean, model.std))
    loss, regression = model.meta["loss"], model.meta["task"] == "regression"
    target = None if model.target_mean is None else (np.asarray(model.target_mean), np.asarray(model.target_std))

    def predict(x):
        xs = (tables.encode(x.astype(jnp.float32), encoder, jnp) - mean) / std
        outputs = _combined(bound, xs, loss)
        if regression:
            if target is None:
                return outputs
            return outputs * target[1].astype(np.float32)[None] + target[0].astype(np.float32)[None]
        if loss == "softmax_cross_entropy":
            return jax.nn.softmax(outputs, axis=-1)
        return jax.nn.sigmoid(outputs) if loss == "sigmoid_binary_cross_entropy" else outputs

    return predict


def next_tokens_function(model: files.SavedModel, arch: str | None = None):
    """``predict(ids: (n, C) int32) -> (n, C, V)`` of a saved language model: each position's
    next-token probabilities, the members' average."""
    bound = saved.bind_saved(model, arch)

    def predict(ids):
        return jax.nn.softmax(_combined(bound, ids, "softmax_cross_entropy"), axis=-1)

    return predict


def _combined(bound, xs, loss: str):
    """The saved members' outputs on the batch ``xs``, as one model's (:func:`saved.combine`)."""
    outputs = jax.vmap(lambda p, s: apply_batch(bound.model, p, s, xs)[0])(bound.params, bound.state)
    return saved.combine(outputs, loss)


def _inputs(model: files.SavedModel) -> tuple:
    """``(shape (n, ...) with n symbolic, dtype, description for the JSON)`` of the exported program."""
    (n,) = jax.export.symbolic_shape("n")
    if model.meta.get("task") == "lm":
        gpt = model.meta["gpt"]
        about = {"task": "lm", "context": gpt["context"], "vocab_size": gpt["vocab_size"],
                 "tokenizer": json.loads(model.meta["tokenizer"])}  # fmt: skip
        return jax.ShapeDtypeStruct((n, gpt["context"]), jnp.int32), about
    encoder = saved.encoder_of(model)
    about = {**encoder.to_json(), "classes": model.meta.get("classes"), "task": model.meta["task"]}
    return jax.ShapeDtypeStruct((n, len(encoder.columns)), jnp.float32), about


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ImportError(
            f"{what} needs {module}, which is not installed: pip install 'jaxnet-trainer[export]'"
        ) from None


def tensors(model: files.SavedModel) -> dict[str, np.ndarray]:
    """A saved model's arrays by the names ``model.npz`` uses: ``params/<path>``, ``state/<path>``,
    ``norm/mean``, ``norm/std`` (and ``norm/target_mean``/``norm/target_std`` for a regression)."""
    named = {f"params/{k}": v for k, v in model.params.items()}
    named.update({f"state/{k}": v for k, v in model.state.items()})
    named.update({"norm/mean": model.mean, "norm/std": model.std})
    if model.target_mean is not None:
        named.update({"norm/target_mean": model.target_mean, "norm/target_std": model.target_std})
    return {k: np.ascontiguousarray(v) for k, v in named.items()}


def export_safetensors(model_dir, out) -> Path:
    """Writes the model's weights (:func:`tensors`) as a safetensors file, its JSON metadata under
    the ``jaxnet`` key of the header, for tools that read weights without jaxnet (atomically)."""
    _require("safetensors", "a safetensors export")
    from safetensors.numpy import save_file

    model = files.load_model(model_dir)
    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        save_file(tensors(model), str(tmp), metadata={"jaxnet": json.dumps(model.meta, sort_keys=True)})
    return out


def export(model_dir, out, *, arch: str | None = None, platforms: tuple[str, ...] | None = None) -> Path:
    """Writes the serialized prediction program of the model in ``model_dir`` to ``out`` (atomically);
    an ``out`` ending in ``.safetensors`` gets the weights instead (:func:`export_safetensors`).

    Returns:
      ``out``.
    """
    if str(out).endswith(".safetensors"):
        return export_safetensors(model_dir, out)
    _require("flatbuffers", "jaxnet export")  # jax.export serializes with it
    model = files.load_model(model_dir)
    shape, inputs = _inputs(model)
    program = jax.export.export(jax.jit(prediction_function(model, arch)), platforms=platforms)(shape)
    out = Path(out)
    with atomic.atomic_path(out) as tmp:
        tmp.write_bytes(program.serialize())
    atomic.write_text(Path(f"{out}.json"), json.dumps(inputs, indent=1, sort_keys=True) + "\n")
    return out
