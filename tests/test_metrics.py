"""Named metrics summed over batches on the device, against scikit-learn and NumPy on the same predictions."""

import jax
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import metrics as metriclib
from jaxnet.app import data as datalib

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.fixture(scope="module")
def digits():
    ds = datalib.load_builtin("digits")
    splits = datalib.split(ds, 0.2, 0.0, seed=0)
    (train, val, _), _ = datalib.standardize_splits(splits)
    net = jn.mlp([64, 32, 10])
    args = dict(loss="cross_entropy", optimizer=optax.adam(3e-3), batch_size=64, key=jax.random.key(1))
    state = jn.fit(net, net.init(jax.random.key(0)), train.x, train.y, epochs=3, **args)
    return net, state.params, val.x, val.y


def test_macro_f1_precision_recall_equal_scikit_learn_over_batches(digits):
    net, params, x, y = digits
    predicted = np.argmax(jn.predict(net, params, x), axis=1)
    assert 0.5 < (predicted == y).mean() < 1.0  # a model with errors in several classes
    got = jn.evaluate(net, params, x, y, loss="cross_entropy", batch_size=37, metrics=["f1", "precision", "recall"])
    for name, reference in (
        ("f1", sklearn_metrics.f1_score),
        ("precision", sklearn_metrics.precision_score),
        ("recall", sklearn_metrics.recall_score),
    ):
        expected = reference(y, predicted, average="macro", zero_division=0)
        assert abs(got[name] - expected) < 1e-6, (name, got[name], expected)


def test_a_class_never_predicted_counts_as_zero_precision_like_scikit_learn():
    logits = np.eye(3, dtype=np.float32)[[0, 0, 1, 1, 1, 0]]  # never predicts class 2
    labels = np.array([0, 2, 1, 1, 2, 0])
    state = None
    for m in (metriclib.get_metric(n) for n in ("precision", "recall", "f1")):
        state = m.update(m.zeros(3), logits, labels, np.ones(6, np.float32))
        expected = getattr(sklearn_metrics, f"{m.name}_score" if m.name != "f1" else "f1_score")(
            labels, logits.argmax(1), average="macro", zero_division=0
        )
        assert abs(m.result(np.asarray(state)) - expected) < 1e-6, m.name


def test_top_k_cross_entropy_and_a_callable_match_numpy(digits):
    net, params, x, y = digits
    logits = jn.predict(net, params, x)
    got = jn.evaluate(
        net,
        params,
        x,
        y,
        loss="cross_entropy",
        batch_size=50,
        metrics=["top_3_accuracy", "cross_entropy", "accuracy", lambda p, t: (p.argmax() == t) * 2.0],
    )
    top3 = np.mean([label in np.argsort(row)[-3:] for row, label in zip(logits, y)])
    shifted = logits - logits.max(axis=1, keepdims=True)
    ce = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y])
    np.testing.assert_allclose(got["top_3_accuracy"], top3, rtol=1e-6)
    np.testing.assert_allclose(got["cross_entropy"], ce, rtol=1e-5)
    np.testing.assert_allclose(got["cross_entropy"], got["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["<lambda>"], 2 * got["accuracy"], rtol=1e-6)


def test_regression_metrics_match_numpy_over_padded_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 2)) + 0.3 * rng.normal(size=(103, 2))).astype(np.float32)
    net = jn.mlp([4, 2])
    params = net.init(jax.random.key(0))
    out = jn.predict(net, params, x)
    got = jn.evaluate(net, params, x, y, loss="mse", batch_size=10, metrics=["mse", "mae", "r2"])
    np.testing.assert_allclose(got["mse"], np.mean((out - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(got["mae"], np.mean(np.abs(out - y)), rtol=1e-5)
    np.testing.assert_allclose(got["r2"], sklearn_metrics.r2_score(y, out), rtol=1e-5)


@pytest.mark.slow
def test_fit_records_validation_metrics_for_single_and_member_runs(digits):
    net, _, x, y = digits
    args = dict(loss="cross_entropy", optimizer=optax.adam(3e-3), epochs=2, batch_size=64, validation=(x, y))
    single = jn.fit(net, net.init(jax.random.key(0)), x, y, key=jax.random.key(1), metrics=["f1"], **args)
    assert {"val_f1", "val_accuracy", "val_loss"} <= single.history[-1].keys()
    f1 = jn.evaluate(net, single.train.params, x, y, loss="cross_entropy", metrics=["f1"])["f1"]
    np.testing.assert_allclose(single.history[-1]["val_f1"], f1, rtol=1e-6)
    keys = jn.member_keys([0, 1])
    members = jn.fit(net, jn.init_members(net, keys), x, y, key=keys, metrics=["f1"], **args)
    assert len(members.history[-1]["val_f1"]) == 2


def test_bad_metrics_are_refused_naming_the_argument(digits):
    net, params, x, y = digits
    with pytest.raises(ValueError, match="unknown metric 'f2'"):
        jn.evaluate(net, params, x, y, loss="cross_entropy", metrics=["f2"])
    with pytest.raises(TypeError, match="metrics must be a list"):
        jn.evaluate(net, params, x, y, loss="cross_entropy", metrics="f1")
    with pytest.raises(ValueError, match="repeat"):
        jn.evaluate(net, params, x, y, loss="cross_entropy", metrics=["f1", "f1"])
