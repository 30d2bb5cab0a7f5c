"""A trained model as one portable program: ``jax.export`` of its whole prediction.

:func:`export` serializes ``predict(x_raw: (n, d) float32) -> (n, out) float32``: the training
split's feature standardization, every member's forward pass (an ensemble averages them), and the
output as ``jaxnet predict`` gives it (class probabilities, or regression outputs in the target's
units), with the weights inside and a batch dimension ``n`` that varies. Running it needs jax alone:

    import jax, numpy as np
    program = jax.export.deserialize(open("model.jaxexport", "rb").read())
    predictions = np.asarray(program.call(np.asarray(x, np.float32)))   # x: (n, d) raw features

The columns of ``x`` are the model's ``feature_names`` in that order (``jaxnet summary``, or the
run's ``model.npz`` metadata); the program's platform is the one it was exported on, unless
``platforms`` names others (``("cpu", "cuda")``).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import files, saved
from jaxnet.forward import apply_batch


def prediction_function(model: files.SavedModel, arch: str | None = None):
    """``predict(x_raw: (n, d)) -> (n, out)`` of a saved model, pure jax, the weights closed over."""
    bound = saved.load(model, arch)
    mean, std = (jnp.asarray(a, jnp.float32)[None] for a in (model.mean, model.std))
    loss, regression = model.meta["loss"], model.meta["task"] == "regression"
    target = None if model.target_mean is None else (np.asarray(model.target_mean), np.asarray(model.target_std))

    def predict(x):
        xs = (x.astype(jnp.float32) - mean) / std
        outputs = jax.vmap(lambda p, s: apply_batch(bound.model, p, s, xs)[0])(bound.params, bound.state)
        outputs = saved.combine(outputs, loss)
        if regression:
            if target is None:
                return outputs
            return outputs * target[1].astype(np.float32)[None] + target[0].astype(np.float32)[None]
        if loss == "softmax_cross_entropy":
            return jax.nn.softmax(outputs, axis=-1)
        return jax.nn.sigmoid(outputs) if loss == "sigmoid_binary_cross_entropy" else outputs

    return predict


def export(model_dir, out, *, arch: str | None = None, platforms: tuple[str, ...] | None = None) -> Path:
    """Writes the serialized prediction program of the model in ``model_dir`` to ``out`` (atomically).

    Returns:
      ``out``.
    """
    try:
        import flatbuffers  # noqa: F401  (jax.export serializes with it)
    except ImportError:
        raise ImportError(
            "jaxnet export needs flatbuffers, which is not installed: pip install 'jaxnet-trainer[export]'"
        ) from None
    model = files.load_model(model_dir)
    features = len(model.meta["feature_names"])
    (n,) = jax.export.symbolic_shape("n")
    program = jax.export.export(jax.jit(prediction_function(model, arch)), platforms=platforms)(
        jax.ShapeDtypeStruct((n, features), jnp.float32)
    )
    out = Path(out)
    with files.atomic_path(out) as tmp:
        tmp.write_bytes(program.serialize())
    return out
