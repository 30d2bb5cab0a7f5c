"""Targets with a token axis: the loss is the mean over the real tokens of the whole batch (and of
the whole epoch, and of the whole validation set), IGNORE_INDEX tokens count nowhere; checked
against NumPy loops in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet.losses import IGNORE_INDEX, batch_mean, softmax_cross_entropy

V, T, D = 11, 7, 8


def _net():
    return jn.serial(jn.embedding(V, D), jn.dense(D, V))  # per example: (T,) ids -> (T, V) logits


def _data(n, seed=0, ignored=0.2):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (n, T)).astype(np.int32)
    y = rng.integers(0, V, (n, T)).astype(np.int32)
    y[rng.random((n, T)) < ignored] = IGNORE_INDEX
    y[0] = IGNORE_INDEX  # one sequence without any real token
    return x, y


def _reference(logits, y, w=None):
    """The mean cross-entropy over the real tokens, as a float64 loop; ``w`` a weight per
    sequence ``(n,)`` or per token ``(n, T)``."""
    logits = np.asarray(logits, np.float64)
    w = np.ones(len(y)) if w is None else np.asarray(w, np.float64)
    w = np.broadcast_to(w.reshape(len(y), -1), y.shape)
    total = count = 0.0
    for i in range(y.shape[0]):
        for t in range(y.shape[1]):
            if y[i, t] == IGNORE_INDEX:
                continue
            row = logits[i, t]
            top = row.max()
            total += w[i, t] * (top + np.log(np.exp(row - top).sum()) - row[y[i, t]])
            count += w[i, t]
    return total / count


def _logits(net, params, x):
    return np.asarray(jn.batched(net)(params, jnp.asarray(x)))


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit])
def test_the_masked_batch_loss_equals_a_numpy_loop(transform):
    net = _net()
    params = net.init(jax.random.key(0))
    x, y = _data(9)
    logits = _logits(net, params, x)
    w = np.linspace(0.5, 2.0, len(y)).astype(np.float32)
    f = transform(batch_mean(softmax_cross_entropy))
    np.testing.assert_allclose(float(f(logits, y)), _reference(logits, y), rtol=1e-6)
    np.testing.assert_allclose(float(f(logits, y, jnp.asarray(w))), _reference(logits, y, w), rtol=1e-6)


def test_ignored_tokens_give_no_nan_and_no_gradient():
    net = _net()
    params = net.init(jax.random.key(0))
    x, y = _data(4)
    loss_fn = jn.make_loss_fn(net, "softmax_cross_entropy")
    grads = jax.grad(loss_fn)(params, (jnp.asarray(x), jnp.asarray(y)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    # a token whose target is ignored: its input's embedding row gets no gradient from it
    only = np.full_like(y, IGNORE_INDEX)
    only[1, 0] = y[1, 0] if y[1, 0] != IGNORE_INDEX else 3
    grads = jax.grad(loss_fn)(params, (jnp.asarray(x), jnp.asarray(only)))
    table = np.asarray(grads[0]["table"])
    touched = {int(x[1, 0])}
    assert all(not table[i].any() for i in range(V) if i not in touched)
    assert table[x[1, 0]].any()


def _fit(x, y, **options):
    net = _net()
    args = dict(loss="softmax_cross_entropy", optimizer=optax.sgd(0.0), epochs=1, batch_size=4)
    return net, jn.fit(net, net.init(jax.random.key(0)), x, y, key=jax.random.key(1), **{**args, **options})


@pytest.mark.parametrize(
    "options",
    [{}, {"chunk_steps": 2}, {"shuffle": False}, {"drop_remainder": False, "batch_size": 3}],
    ids=["resident", "chunked", "in-order", "padded"],
)
def test_an_epoch_and_its_validation_average_over_every_real_token(options):
    x, y = _data(10)  # 10 rows in batches of 4 (or 3): the last one padded
    xv, yv = _data(6, seed=1)
    net, result = _fit(x, y, validation=(xv, yv), metrics=["accuracy", "perplexity"], **options)
    params = net.init(jax.random.key(0))  # SGD at rate 0: the params never move
    record = result.history[-1]
    np.testing.assert_allclose(record["train_loss"], _reference(_logits(net, params, x), y), rtol=1e-5)
    expected = _reference(_logits(net, params, xv), yv)
    np.testing.assert_allclose(record["val_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(record["val_perplexity"], np.exp(expected), rtol=1e-5)
    real = yv != IGNORE_INDEX
    accuracy = (_logits(net, params, xv).argmax(-1) == yv)[real].mean()
    np.testing.assert_allclose(record["val_accuracy"], accuracy, rtol=1e-6)


def test_streamed_epochs_average_over_every_real_token(tmp_path):
    x, y = _data(10)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    net, result = _fit(jn.NpyFile(tmp_path / "x.npy"), jn.NpyFile(tmp_path / "y.npy"), chunk_bytes=1)
    params = net.init(jax.random.key(0))
    np.testing.assert_allclose(result.history[-1]["train_loss"], _reference(_logits(net, params, x), y), rtol=1e-5)


def test_member_runs_average_each_member_over_its_real_tokens():
    x, y = _data(10)
    net = _net()
    keys = jax.random.split(jax.random.key(0), 3)
    params = jn.init_members(net, keys)
    result = jn.fit(
        net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.sgd(0.0), epochs=1, batch_size=4,
        key=jn.member_keys([1, 2, 3]), validation=(x, y),
    )  # fmt: skip
    for k in range(3):
        one = jax.tree.map(lambda a: a[k], params)
        expected = _reference(_logits(net, one, x), y)
        np.testing.assert_allclose(result.history[-1]["train_loss"][k], expected, rtol=1e-5)
        np.testing.assert_allclose(result.history[-1]["val_loss"][k], expected, rtol=1e-5)


def test_evaluate_averages_over_every_real_token():
    x, y = _data(13)
    net = _net()
    params = net.init(jax.random.key(0))
    out = jn.evaluate(net, params, x, y, loss="softmax_cross_entropy", batch_size=5, metrics=["top_3_accuracy"])
    logits = _logits(net, params, x)
    np.testing.assert_allclose(out["loss"], _reference(logits, y), rtol=1e-5)
    real = y != IGNORE_INDEX
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    np.testing.assert_allclose(out["top_3_accuracy"], (top3 == y[..., None]).any(-1)[real].mean(), rtol=1e-6)


def test_a_sequence_model_learns_to_copy_its_input():
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (256, T)).astype(np.int32)
    net = _net()
    result = jn.fit(
        net, net.init(jax.random.key(0)), x, x, loss="softmax_cross_entropy", optimizer=optax.adam(0.05),
        epochs=30, batch_size=32, key=jax.random.key(1),
    )  # fmt: skip
    assert result.history[0]["train_loss"] > 1.0 > 0.05 > result.history[-1]["train_loss"]


@pytest.mark.parametrize("kind", ["data-parallel", "per-example"])
def test_data_parallel_and_per_example_runs_average_over_every_real_token(kind):
    if kind == "data-parallel":
        options = {"mesh": jn.make_data_mesh(jax.devices()[:2])}
    else:  # DP-SGD's aggregation at rate 0, a clip that never bites and no noise: the params stay
        options = {"per_example_grads": True, "optimizer": jn.dp_optimizer(0.0, 1e9, 0.0, jax.random.key(2))}
    x, y = _data(10)
    net, result = _fit(x, y, **options)
    params = net.init(jax.random.key(0))
    np.testing.assert_allclose(result.history[-1]["train_loss"], _reference(_logits(net, params, x), y), rtol=1e-5)


@pytest.mark.parametrize("per_example", [False, True])
def test_sample_weights_weigh_each_of_an_examples_tokens(per_example):
    x, y = _data(10)
    w = np.linspace(0.5, 3.0, 10).astype(np.float32)
    options = {"per_example_grads": True, "optimizer": jn.dp_optimizer(0.0, 1e9, 0.0, jax.random.key(2))}
    net, result = _fit(x, y, sample_weight=w, **(options if per_example else {}))
    params = net.init(jax.random.key(0))
    np.testing.assert_allclose(result.history[-1]["train_loss"], _reference(_logits(net, params, x), y, w), rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{}, {"chunk_steps": 1}, {"accumulate": 2}, {"steps": 3, "eval_every": 3, "epochs": None}, {"members": True}],
    ids=["resident", "chunked", "accumulated", "by-steps", "members"],
)
def test_per_token_sample_weights_weigh_each_token(options):
    """sample_weight of the targets' shape: a weight per token, the loss their weighted mean."""
    x, y = _data(12)
    w = np.random.default_rng(3).uniform(0.2, 2.0, y.shape).astype(np.float32)
    w[1, :3] = 0.0  # a weight of 0 masks a token
    if options.pop("members", False):
        net = _net()
        keys = jn.member_keys([0, 0])
        result = jn.fit(net, jn.init_members(net, keys), x, y, sample_weight=w, loss="softmax_cross_entropy",
                        optimizer=optax.sgd(0.0), epochs=1, batch_size=4, key=jn.member_keys([1, 2]))  # fmt: skip
        losses = result.history[-1]["train_loss"]
    else:
        net, result = _fit(x, y, sample_weight=w, **options)
        losses = [result.history[-1]["train_loss"]]
    expected = _reference(_logits(net, net.init(jax.random.key(0)), x), y, w)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(12,\).* or \(12, 7\), one per token"):
        _fit(x, y, sample_weight=w[:, :3])


def test_a_custom_loss_of_a_sequence_sees_its_padding():
    """A loss returning a value per token is masked by jaxnet (it gets padding as id 0); one
    returning a value per sequence gets the targets as they are, IGNORE_INDEX included."""
    x, y = _data(8)
    y[1:, 4:] = IGNORE_INDEX

    def sequence_mean(logits, labels):  # (T, V), (T,) -> the mean over the sequence's real tokens
        real = labels != IGNORE_INDEX
        terms = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(real, labels, 0))
        return jnp.sum(terms * real) / jnp.maximum(real.sum(), 1)

    net, result = _fit(x, y, loss=sequence_mean)
    logits = _logits(net, net.init(jax.random.key(0)), x)
    per_sequence = [_reference(logits[i : i + 1], y[i : i + 1]) for i in range(1, 8)]  # row 0 has no real token
    np.testing.assert_allclose(result.history[-1]["train_loss"], np.sum(per_sequence) / 8, rtol=1e-5)

    def per_token(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    _, tokens = _fit(x, y, loss=per_token)
    np.testing.assert_allclose(tokens.history[-1]["train_loss"], _reference(logits, y), rtol=1e-5)


def test_class_ids_outside_the_vocabulary_are_refused_or_nan_never_wrapped():
    """A negative id other than IGNORE_INDEX, or one past the vocabulary, is refused in resident
    targets (training, validation, evaluate), and streamed ones chunk by chunk (they gave a NaN
    loss). Float ids with a token axis are refused, as any float ids (0.5 would be truncated)."""
    x, y = _data(8)
    net = _net()
    params = net.init(jax.random.key(0))
    for bad, label in ((-5, "-5"), (V, str(V))):
        wrong = y.copy()
        wrong[2, 3] = bad
        message = f"holds the label {label} at row 2, position 3, outside the model's {V} classes"
        with pytest.raises(ValueError, match="y " + message):
            _fit(x, wrong)
        with pytest.raises(ValueError, match="validation's y " + message):
            _fit(x, y, validation=(x, wrong))
        with pytest.raises(ValueError, match="y " + message):
            jn.evaluate(net, params, x, wrong, loss="softmax_cross_entropy")
        with pytest.raises(ValueError, match="a streamed chunk of y " + message):
            jn.evaluate(net, params, [(x, wrong)], loss="softmax_cross_entropy")
    with pytest.raises(TypeError, match="y holds float32 targets, but the loss takes integer class ids: give integer"):
        _fit(x, y.astype(np.float32))
    assert np.isnan(np.asarray(jn.embedding(V, 4).apply(jn.embedding(V, 4).init(jax.random.key(0)), -1))).all()
    np.testing.assert_equal(np.asarray(softmax_cross_entropy(jnp.zeros(V), -1)), np.nan)
