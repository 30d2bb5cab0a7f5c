import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn

# Compiled once per layout: eagerly, the shuffle's integer ops would each compile on their own.
epoch_batches = jax.jit(jn.epoch_batches, static_argnums=(1, 2, 3))


def _data(seed=0, n=50, d=3, classes=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def test_scanned_epoch_equals_python_loop_of_jitted_steps(key):
    x, y = _data(n=50)
    net = jn.mlp([3, 6, 3], activation="tanh")
    opt = optax.adam(0.01)
    params = net.init(jax.random.key(1))
    state = jn.fit(
        net,
        params,
        x,
        y,
        loss="softmax_cross_entropy",
        optimizer=opt,
        epochs=3,
        batch_size=8,
        key=jax.random.key(2),
    )
    # Reference: the same shuffles, one jitted step per batch, the last batch truly smaller.
    step = jn.make_train_step(net, "softmax_cross_entropy", opt, donate=False)
    ref = jn.init_state(params, opt, jax.random.key(2))
    shuffle_key = jax.random.key(2)
    x, y = np.asarray(x), np.asarray(y)
    for _ in range(3):
        shuffle_key, k = jax.random.split(shuffle_key)
        index, weight = epoch_batches(k, 50, 8)
        for idx, w in zip(np.asarray(index), np.asarray(weight)):
            real = idx[w > 0]
            ref, _ = step(ref, (x[real], y[real]))
    assert int(state.train.step) == int(ref.step) == 3 * 7
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, ref.params)


@pytest.mark.parametrize("n", [48, 50])  # batches divide n (plain reshapes), or the last one is padded
def test_unshuffled_fit_equals_python_loop_in_data_order(key, n):
    x, y = _data(n=n)
    net = jn.mlp([3, 5, 3], activation="tanh")
    opt = optax.sgd(0.1)
    params = net.init(jax.random.key(1))
    state = jn.fit(
        net,
        params,
        x,
        y,
        loss="softmax_cross_entropy",
        optimizer=opt,
        epochs=2,
        batch_size=8,
        key=jax.random.key(2),
        shuffle=False,
    )
    step = jn.make_train_step(net, "softmax_cross_entropy", opt, donate=False)
    ref = jn.init_state(params, opt, jax.random.key(2))
    for _ in range(2):
        for start in range(0, n, 8):
            ref, _ = step(ref, (x[start : start + 8], y[start : start + 8]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, ref.params)


def test_epoch_batches_cover_every_example_once_and_mask_padding(key):
    index, weight = epoch_batches(key, 10, 4)
    assert index.shape == weight.shape == (3, 4)
    real = np.asarray(index)[np.asarray(weight) > 0]
    assert sorted(real.tolist()) == list(range(10))
    assert np.asarray(weight).sum() == 10
    index, weight = epoch_batches(key, 3, 8)  # one batch larger than twice the data
    assert index.shape == (1, 8) and np.asarray(weight).sum() == 3
    assert sorted(np.asarray(index)[0, :3].tolist()) == [0, 1, 2]
    index, weight = epoch_batches(key, 10, 4, True)
    assert index.shape == (2, 4) and len(set(np.asarray(index).ravel().tolist())) == 8


def test_shuffles_differ_between_epochs_and_repeat_for_the_same_seed():
    orders = []
    for _ in range(2):
        key, seen = jax.random.key(5), []
        for _ in range(3):
            key, k = jax.random.split(key)
            seen.append(np.asarray(epoch_batches(k, 32, 8)[0]).ravel())
        orders.append(seen)
    assert not np.array_equal(orders[0][0], orders[0][1])
    assert not np.array_equal(orders[0][1], orders[0][2])
    for a, b in zip(*orders):
        np.testing.assert_array_equal(a, b)


def test_fit_is_reproducible_from_its_seed(key):
    x, y = _data()
    net = jn.mlp([3, 5, 3])
    runs = [
        jn.fit(
            net,
            net.init(jax.random.key(1)),
            x,
            y,
            loss="cross_entropy",
            optimizer=optax.sgd(0.1),
            epochs=2,
            batch_size=7,
            key=jax.random.key(3),
        )[0].params
        for _ in range(2)
    ]
    jax.tree.map(np.testing.assert_array_equal, *runs)


def test_fit_learns_xor():
    x = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = jnp.array([0, 1, 1, 0])
    net = jn.mlp([2, 8, 2], activation="tanh")
    state = jn.fit(
        net,
        net.init(jax.random.key(0)),
        x,
        y,
        loss="softmax_cross_entropy",
        optimizer=optax.adam(0.05),
        epochs=300,
        batch_size=4,
        key=jax.random.key(1),
        validation=(x, y),
    )
    history = state.history
    assert history[-1]["val_accuracy"] == 1.0
    assert history[-1]["train_loss"] < 0.05


def test_epoch_compiles_once(key):
    traces = []
    base = jn.mlp([3, 3])

    def apply(params, x):
        traces.append(1)
        return base.apply(params, x)

    x, y = _data()
    jn.fit(
        jn.Model(base.init, apply),
        base.init(key),
        x,
        y,
        loss="cross_entropy",
        optimizer=optax.sgd(0.1),
        epochs=4,
        batch_size=16,
        key=key,
    )
    assert len(traces) == 2  # the compiled epoch's, and the shape of the outputs (the labels' check)


def test_early_stopping_returns_best_params(key):
    x, y = _data(n=40)
    xv, yv = _data(9, n=40)  # unrelated labels: validation loss soon rises
    net = jn.mlp([3, 32, 3])
    seen = {}

    def remember(fit_state, record):
        seen[record["epoch"]] = jax.tree.map(np.array, fit_state.train.params)

    state = jn.fit(
        net,
        net.init(key),
        x,
        y,
        loss="cross_entropy",
        optimizer=optax.adam(0.05),
        epochs=200,
        batch_size=8,
        key=key,
        validation=(xv, yv),
        patience=3,
        callbacks=[remember],
    )

    history = state.history
    best = min(history, key=lambda r: r["val_loss"])["epoch"]
    assert len(history) == best + 3 < 200
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), seen[best])


def test_callback_can_stop_training(key):
    x, y = _data()
    net = jn.mlp([3, 3])
    _fit = jn.fit(
        net,
        net.init(key),
        x,
        y,
        loss="cross_entropy",
        optimizer=optax.sgd(0.1),
        epochs=10,
        batch_size=10,
        key=key,
        callbacks=[lambda s, r: r["epoch"] == 2],
    )
    history = _fit.history
    assert len(history) == 2


def test_non_finite_loss_stops_with_epoch_and_step(key):
    x, y = _data()
    x[7] = np.inf
    net = jn.mlp([3, 3])
    with pytest.raises(jn.NonFiniteLossError, match=r"epoch 1, step \d+"):
        jn.fit(
            net,
            net.init(key),
            x,
            y,
            loss="cross_entropy",
            optimizer=optax.sgd(0.1),
            epochs=2,
            batch_size=10,
            key=key,
        )
    state = jn.fit(
        net,
        net.init(key),
        x,
        y,
        loss="cross_entropy",
        optimizer=optax.sgd(0.1),
        epochs=2,
        batch_size=10,
        key=key,
        skip_nonfinite=True,
    )
    history = state.history
    assert [r["skipped"] for r in history] == [1, 1]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(epochs=0), "epochs must be a positive integer"),
        (dict(patience=2), "needs validation data"),
        (dict(monitor="val_f1"), "unknown monitor"),
    ],
)
def test_fit_rejects_bad_arguments(key, kwargs, match):
    x, y = _data()
    net = jn.mlp([3, 3])
    args = dict(loss="cross_entropy", optimizer=optax.sgd(0.1), epochs=1, batch_size=8, key=key) | kwargs
    with pytest.raises(ValueError, match=match):
        jn.fit(net, net.init(key), x, y, **args)


def test_fit_rejects_empty_and_mismatched_data(key):
    net = jn.mlp([3, 3])
    args = dict(loss="cross_entropy", optimizer=optax.sgd(0.1), epochs=1, batch_size=8, key=key)
    with pytest.raises(ValueError, match="x is empty"):
        jn.fit(net, net.init(key), np.zeros((0, 3)), np.zeros((0,), int), **args)
    with pytest.raises(ValueError, match="x has 5 examples but y has 4"):
        jn.fit(net, net.init(key), np.zeros((5, 3)), np.zeros((4,), int), **args)


@pytest.mark.parametrize("bad_example, first_bad_step", [(None, -1), (7, 0), (23, 2), (49, 4)])
def test_epoch_reports_the_first_nonfinite_step_and_mean_loss(bad_example, first_bad_step):
    x, y = _data(n=50)
    if bad_example is not None:
        x[bad_example] = np.nan
    net = jn.mlp([3, 3])
    opt = optax.sgd(0.1)
    params = net.init(jax.random.key(1))
    epoch = jax.jit(jn.make_epoch(jn.make_update(net, "cross_entropy", opt), 50, 10, shuffle=False))
    _, metrics = epoch(jn.init_state(params, opt, jax.random.key(2)), x, y)
    assert int(metrics["first_nonfinite"]) == first_bad_step
    if bad_example is None:  # the mean over examples of the loss before each step, as a Python loop
        step = jn.make_train_step(net, "cross_entropy", opt, donate=False)
        state, losses = jn.init_state(params, opt, jax.random.key(2)), []
        for start in range(0, 50, 10):
            state, m = step(state, (x[start : start + 10], y[start : start + 10]))
            losses.append(float(m["loss"]))
        np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-6)
        # With a padded last batch (50 = 6 x 8 + 2): batch losses weighted by their real examples.
        epoch = jax.jit(jn.make_epoch(jn.make_update(net, "cross_entropy", opt), 50, 8, shuffle=False))
        _, metrics = epoch(jn.init_state(params, opt, jax.random.key(2)), x, y)
        state, total = jn.init_state(params, opt, jax.random.key(2)), 0.0
        for start in range(0, 50, 8):
            state, m = step(state, (x[start : start + 8], y[start : start + 8]))
            total += float(m["loss"]) * len(x[start : start + 8])
        np.testing.assert_allclose(float(metrics["loss"]), total / 50, rtol=1e-6)
        assert int(metrics["first_nonfinite"]) == -1
    else:
        assert np.isnan(float(metrics["loss"]))
        # The padded path (batches of 8: the example's step is its index // 8) finds it too.
        epoch = jax.jit(jn.make_epoch(jn.make_update(net, "cross_entropy", opt), 50, 8, shuffle=False))
        _, metrics = epoch(jn.init_state(params, opt, jax.random.key(2)), x, y)
        assert int(metrics["first_nonfinite"]) == bad_example // 8


def test_shuffled_epoch_reports_the_first_nonfinite_step():
    x, y = _data(n=40)
    net = jn.mlp([3, 3])
    opt = optax.sgd(0.1)
    state = jn.init_state(net.init(jax.random.key(1)), opt, jax.random.key(2))
    epoch = jax.jit(jn.make_epoch(jn.make_update(net, "cross_entropy", opt), 40, 10))
    assert int(epoch(state, x, y)[1]["first_nonfinite"]) == -1
    x[:20] = np.inf  # half the examples: some batch of the first two holds one (any shuffle)
    _, metrics = epoch(state, x, y)
    assert int(metrics["first_nonfinite"]) in (0, 1) and np.isnan(float(metrics["loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_wide_rows_gather_per_step_as_the_whole_epoch_gather_does(monkeypatch, drop_remainder):
    # 300 float32 features: 1.2 kB a row, over GATHER_PER_STEP_BYTES, so each step gathers its rows;
    # with the threshold raised, the epoch gathers all rows up front. Same order, same updates.
    x, y = _data(n=45, d=300)
    net = jn.mlp([300, 4, 3])
    opt = optax.sgd(0.1)
    state = jn.init_state(net.init(jax.random.key(1)), opt, jax.random.key(2))
    members = jax.tree.map(lambda a: jnp.stack([a, a]), state)._replace(key=jax.random.split(jax.random.key(3), 2))

    def run(vmapped):
        epoch = jn.make_epoch(jn.make_update(net, "cross_entropy", opt), 45, 10, drop_remainder=drop_remainder)
        epoch = jax.vmap(epoch, in_axes=(0, None, None)) if vmapped else epoch
        return jax.jit(epoch)(members if vmapped else state, x, y)

    assert 300 * 4 >= jn.epoch.GATHER_PER_STEP_BYTES
    per_step = run(False), run(True)
    monkeypatch.setattr(jn.epoch, "GATHER_PER_STEP_BYTES", 10**9)
    up_front = run(False), run(True)
    for (state_a, metrics_a), (state_b, metrics_b) in zip(per_step, up_front):
        close = lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)  # noqa: E731
        jax.tree.map(close, (state_a.params, metrics_a), (state_b.params, metrics_b))
    assert np.isfinite(float(per_step[0][1]["loss"])) and int(per_step[0][1]["first_nonfinite"]) == -1
