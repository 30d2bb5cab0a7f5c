"""Sample and class weights, training metrics and logged steps: against hand-written JAX on the same batches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet import _weights as weights
from jaxnet import callbacks as cblib
from jaxnet import checkpoint
from jaxnet.app import cli as jn_cli

sklearn_utils = pytest.importorskip("sklearn.utils.class_weight")

N, D, C = 50, 4, 3


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = rng.choice(C, size=N, p=[0.6, 0.3, 0.1]).astype(np.int32)
    net = jn.mlp([D, 5, C])
    return net, net.init(jax.random.key(0)), x, y


def _one_full_batch_step(net, params, x, y, w, lr=0.5):
    """One SGD step on the weighted mean cross-entropy, by hand."""

    def loss(p):
        logits = jax.vmap(lambda e: net.apply(p, e))(x)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(w * per_example) / jnp.sum(w)

    value, grads = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), float(value)


def _fit(net, params, x, y, **kw):
    args = dict(loss="cross_entropy", optimizer=optax.sgd(0.5), epochs=1, key=jax.random.key(1))
    return jn.fit(net, params, x, y, **{**args, **kw})


@pytest.mark.parametrize("batch_size", [N, 64])  # one exact batch, and one padded batch
def test_sample_weights_give_the_weighted_mean_loss_and_its_gradient(problem, batch_size):
    net, params, x, y = problem
    w = np.random.default_rng(1).uniform(0, 3, size=N).astype(np.float32)
    state = _fit(net, params, x, y, batch_size=batch_size, sample_weight=w)
    expected, loss = _one_full_batch_step(net, params, x, y, w)
    np.testing.assert_allclose(state.history[0]["train_loss"], loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sample_weights_over_several_batches_match_a_python_loop(problem):
    net, params, x, y = problem
    w = np.random.default_rng(2).uniform(0, 2, size=N).astype(np.float32)
    state = _fit(net, params, x, y, batch_size=16, shuffle=False, sample_weight=w)
    p, total = params, 0.0
    for s in range(0, N, 16):  # batches in order, the last one of 2 examples
        p, loss = _one_full_batch_step(net, p, x[s : s + 16], y[s : s + 16], w[s : s + 16])
        total += loss * w[s : s + 16].sum()
    np.testing.assert_allclose(state.history[0]["train_loss"], total / w.sum(), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(p)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_balanced_class_weights_equal_scikit_learns_and_weigh_the_loss(problem):
    net, params, x, y = problem
    got = np.asarray(weights.class_weights("balanced", jn.get_loss("cross_entropy"), C, y))
    np.testing.assert_allclose(
        got, sklearn_utils.compute_class_weight("balanced", classes=np.arange(C), y=y), rtol=1e-6
    )
    state = _fit(net, params, x, y, batch_size=N, class_weight="balanced")
    expected, loss = _one_full_batch_step(net, params, x, y, got[y])
    np.testing.assert_allclose(state.history[0]["train_loss"], loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    mapped = _fit(net, params, x, y, batch_size=N, class_weight={2: 5.0})
    expected, _ = _one_full_batch_step(net, params, x, y, np.where(y == 2, 5.0, 1.0))
    for a, b in zip(jax.tree.leaves(mapped.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_class_weights_apply_to_streamed_data_as_to_arrays(problem):
    net, params, x, y = problem
    resident = _fit(net, params, x, y, batch_size=16, class_weight={0: 0.5, 1: 2.0})
    streamed = _fit(net, params, jn.Indexed(x, y), None, batch_size=16, class_weight={0: 0.5, 1: 2.0})
    for a, b in zip(jax.tree.leaves(resident.params), jax.tree.leaves(streamed.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(sample_weight=np.ones(3)), ValueError, r"sample_weight must have shape \(50,\)"),
        (dict(sample_weight=-np.ones(N)), ValueError, "finite and at least 0"),
        (dict(sample_weight=np.zeros(N)), ValueError, "0 for every example"),
        (dict(sample_weight=np.array(["a"] * N)), TypeError, "array of numbers"),
        (dict(class_weight="balance"), ValueError, "'balanced' or a mapping"),
        (dict(class_weight={3: 1.0}), ValueError, "class 3 is not one of the model's 3 classes"),
        (dict(class_weight={0: -1.0}), ValueError, "finite number >= 0"),
        (dict(class_weight=[1.0, 2.0]), TypeError, "'balanced' or a mapping"),
        (dict(class_weight="balanced", loss="mse", y="one-hot"), ValueError, "needs a classification loss"),
    ],
)
def test_bad_weights_are_refused_naming_the_argument(problem, kw, error, match):
    net, params, x, y = problem
    if kw.get("y") == "one-hot":  # targets the loss takes, so that the weights are what it refuses
        kw = {**kw, "y": np.eye(3, dtype=np.float32)[y]}
    kw.setdefault("y", y)
    with pytest.raises(error, match=match):
        _fit(net, params, x, batch_size=16, **kw)


def test_streamed_data_refuses_sample_weights_and_balanced_classes(problem):
    net, params, x, y = problem
    with pytest.raises(ValueError, match="sample_weight: per-example weights travel with arrays"):
        _fit(net, params, jn.Indexed(x, y), None, batch_size=16, sample_weight=np.ones(N))
    with pytest.raises(ValueError, match="for streamed data give a mapping"):
        _fit(net, params, jn.Indexed(x, y), None, batch_size=16, class_weight="balanced")


def test_a_label_beyond_the_models_classes_is_refused(problem):
    net, params, x, y = problem
    with pytest.raises(ValueError, match="y holds the label 7 at row 3, outside the model's 3 classes"):
        _fit(net, params, x, np.where(y == 2, 7, y).astype(np.int32), batch_size=16, class_weight="balanced")


@pytest.mark.slow
def test_training_metrics_are_exact_over_the_epochs_padded_batches(problem):
    net, params, x, y = problem
    # a zero learning rate: every step predicts with the initial params, so the epoch's metrics are theirs
    state = _fit(net, params, x, y, batch_size=16, optimizer=optax.sgd(0.0), metrics=["accuracy", "f1"])
    predicted = np.argmax(jn.predict(net, params, x), axis=1)
    record = state.history[0]
    np.testing.assert_allclose(record["train_accuracy"], (predicted == y).mean(), atol=1e-6)
    f1 = pytest.importorskip("sklearn.metrics").f1_score(y, predicted, average="macro", zero_division=0)
    np.testing.assert_allclose(record["train_f1"], f1, atol=1e-6)
    members = _fit(
        net,
        jn.init_members(net, jn.member_keys([0, 1])),
        x,
        y,
        batch_size=16,
        key=jn.member_keys([2, 3]),
        metrics=["accuracy"],
    )
    assert len(members.history[0]["train_accuracy"]) == 2


class _Steps:
    def __init__(self):
        self.records = []

    def __call__(self, state, record):
        pass

    def on_step(self, state, record):
        self.records.append(record)


@pytest.mark.slow
def test_logged_steps_report_the_loss_grad_norm_and_applied_learning_rate(problem):
    net, params, x, y = problem
    schedule = optax.linear_schedule(0.5, 0.0, 12)
    logged = _Steps()
    state = _fit(
        net,
        params,
        x,
        y,
        batch_size=10,
        epochs=2,
        shuffle=False,
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=schedule),
        log_every_steps=2,
        callbacks=[logged],
    )
    assert [r["step"] for r in logged.records] == [2, 4, 7, 9]  # the 2nd and 4th steps of each 5-step epoch
    p = params
    for step in range(1, 11):  # plain SGD in a Python loop, the same batches in order
        s = (step - 1) % 5 * 10

        def loss(q, s=s):
            logits = jax.vmap(lambda e: net.apply(q, e))(x[s : s + 10])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[s : s + 10]).mean()

        value, grads = jax.value_and_grad(loss)(p)
        rate = float(schedule(step - 1))
        for record in logged.records:
            if record["step"] == step:
                np.testing.assert_allclose(record["loss"], value, rtol=1e-5)
                np.testing.assert_allclose(record["grad_norm"], optax.tree_utils.tree_norm(grads), rtol=1e-5)
                np.testing.assert_allclose(record["learning_rate"], rate, rtol=1e-6)
        p = jax.tree.map(lambda a, g, r=rate: a - r * g, p, grads)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(p)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_plain_optimizer_logs_no_learning_rate_and_members_refuse(problem):
    net, params, x, y = problem
    logged = _Steps()
    _fit(net, params, x, y, batch_size=10, log_every_steps=3, callbacks=[logged])
    assert [sorted(r) for r in logged.records] == [["epoch", "grad_norm", "loss", "step"]]
    with pytest.raises(ValueError, match="log_every_steps: member runs do not log steps"):
        _fit(
            net,
            jn.init_members(net, jn.member_keys([0, 1])),
            x,
            y,
            batch_size=10,
            key=jn.member_keys([2, 3]),
            log_every_steps=2,
        )


def test_training_metrics_resume_exactly_from_a_checkpoint_inside_an_epoch(problem, tmp_path):
    net, params, x, y = problem
    args = dict(batch_size=8, epochs=2, metrics=["f1", "accuracy"], chunk_steps=2, optimizer=optax.adam(0.01))
    whole = _fit(net, params, x, y, **args)

    class StopInside:
        def __call__(self, state, record):
            pass

        def on_chunk(self, state):
            return state.epoch == 1 and state.position.steps == 4

    saver = cblib.Checkpointer(tmp_path, every_steps=2)
    stopped = _fit(net, params, x, y, callbacks=[saver, StopInside()], **args)
    assert stopped.position is not None and stopped.position.sums is not None
    restored = checkpoint.restore(tmp_path, like=stopped).state
    assert restored.position.steps == stopped.position.steps
    resumed = _fit(net, params, x, y, resume=restored, **args)
    for a, b in zip(whole.history, resumed.history):
        for name in ("train_loss", "train_f1", "train_accuracy"):
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-7), name


@pytest.mark.slow
def test_cli_weighs_classes_and_records_named_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--out", str(out), "--quiet", "--class-weight", "balanced", "--metrics", "f1"]
    assert jn_cli.main(args) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= record["train_f1"] <= 1 and 0 <= record["val_f1"] <= 1
    assert json.loads((out / "config.json").read_text())["class_weight"] == "balanced"
    for bad, message in (
        (["--class-weight", "0:x"], "--class-weight: expected 'balanced' or 'class:weight,...'"),
        (["--class-weight", "\u0660:1"], "--class-weight names the class '\u0660', but the labels are numbers"),
        (["--metrics", "f2"], "--metrics: unknown metric 'f2'"),
        (["--dataset", "moons", "--task", "regression", "--class-weight", "balanced"], "needs a classification task"),
        (["--log-every-steps", "5"], "--log-every-steps N needs --out DIR"),
    ):
        capsys.readouterr()
        assert jn_cli.main(["train", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_early_stopping_monitors_a_named_metric_in_its_direction(problem):
    net, params, x, y = problem
    args = dict(batch_size=16, epochs=6, validation=(x, y), patience=2, optimizer=optax.sgd(0.05))
    state = _fit(net, params, x, y, metrics=["f1", "cross_entropy"], monitor="val_f1", **args)
    f1 = [r["val_f1"] for r in state.history]
    assert state.best_epoch == 1 + int(np.argmax(f1))  # the first epoch of the highest F1
    with pytest.raises(ValueError, match="unknown monitor 'val_recall'"):
        _fit(net, params, x, y, metrics=["f1"], monitor="val_recall", **args)
    with pytest.raises(ValueError, match="'mae' compares outputs with real-valued targets"):
        _fit(net, params, x, y, metrics=["mae"], **args)
    lowest = _fit(net, params, x, y, metrics=["cross_entropy"], monitor="val_cross_entropy", **args)
    ce = [r["val_cross_entropy"] for r in lowest.history]
    assert lowest.best_epoch == 1 + int(np.argmin(ce))


def test_the_epochs_loss_under_class_weights_is_their_weighted_mean(problem):
    """Resident (with a padded last batch) and streamed: sum(w * loss) / sum(w) over the epoch, as
    sample_weight gives, not a mean of the batches' weighted means."""
    net, params, x, y = problem
    counts = np.bincount(y, minlength=C)
    w = (len(y) / (C * counts))[y]
    logits = np.asarray(jn.predict(net, params, x), np.float64)
    losses = -(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))[np.arange(len(y)), y]
    expected = float((w * losses).sum() / w.sum())
    frozen = dict(optimizer=optax.sgd(0.0), batch_size=16)  # the params stay: each batch's loss is on them
    balanced = {k: float(v) for k, v in enumerate(len(y) / (C * counts))}  # a mapping also streams
    for data in ((x, y), (jn.Indexed(x, y), None)):
        got = _fit(net, params, *data, class_weight=balanced, **frozen).history[-1]["train_loss"]
        assert got == pytest.approx(expected, rel=1e-5)
    assert _fit(net, params, x, y, sample_weight=w, **frozen).history[-1]["train_loss"] == pytest.approx(
        expected, rel=1e-5
    )
