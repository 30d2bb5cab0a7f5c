"""Training part of a model: frozen params, learning-rate groups, the moving average of the
weights, and skipped loss spikes, through fit and through the step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn


def problem(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] - x[:, 1] > 0).astype(np.int32)


NET = jn.mlp([4, 16, 16, 2])


def assert_bitwise(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


def fit(params, optimizer=None, **options):
    x, y = problem()
    options.setdefault("epochs", 4)
    return jn.fit(NET, params, x, y, loss="softmax_cross_entropy", optimizer=optimizer or optax.adam(1e-2),
                  batch_size=8, key=jax.random.key(1), **options)  # fmt: skip


def test_a_frozen_layer_is_bitwise_unchanged_and_keeps_no_optimizer_state():
    params = NET.init(jax.random.key(0))
    result = fit(params, trainable=r"^2/", epochs=13)  # 104 steps; only the last layer trains
    assert result.train.step == 104
    for i in (0, 1):
        for name in ("w", "b"):
            np.testing.assert_array_equal(np.asarray(result.train.params[i][name]), np.asarray(params[i][name]))
    assert not np.array_equal(np.asarray(result.train.params[2]["w"]), np.asarray(params[2]["w"]))
    state_floats = sum(a.size for a in jax.tree.leaves(result.train.opt_state) if jnp.issubdtype(a.dtype, jnp.floating))
    assert state_floats == 2 * (16 * 2 + 2)  # Adam's two moments of the last layer only
    frozen = jn.fit(NET, params, *problem(), loss="softmax_cross_entropy",
                    optimizer=jn.grouped(optax.adam(1e-2), freeze=r"^[01]/"), epochs=2, batch_size=8,
                    key=jax.random.key(1))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(frozen.train.params[0]["w"]), np.asarray(params[0]["w"]))


def test_a_learning_rate_multiplier_of_10_gives_10x_the_sgd_update():
    params = NET.init(jax.random.key(0))
    opt = jn.grouped(optax.sgd(0.01), lr_mult={r"^1/": 10.0})
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, state, params)
    plain, _ = optax.sgd(0.01).update(grads, optax.sgd(0.01).init(params), params)
    np.testing.assert_array_equal(np.asarray(updates[1]["w"]), 10 * np.asarray(plain[1]["w"]))
    np.testing.assert_array_equal(np.asarray(updates[0]["w"]), np.asarray(plain[0]["w"]))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"trainable": "nothing"}, "trainable 'nothing' matches no parameter; the parameters are: 0/b, 0/w"),
        ({"freeze": "."}, "matches every parameter: nothing would train"),
        ({"lr_mult": {"zzz": 2.0}}, "lr_mult 'zzz' matches no parameter"),
        ({"lr_mult": {"0/": -1.0}}, "a multiplier must be a positive number"),
        ({"freeze": "("}, "is not a valid regular expression"),
    ],
)
def test_groups_that_cannot_be_are_refused_with_the_parameters_named(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        jn.grouped(optax.sgd(0.1), **options).init(NET.init(jax.random.key(0)))


def test_a_grouping_inside_another_says_it_sees_only_its_group():
    # fit's trainable groups the optimizer given: a jn.grouped inside sees only the trainable params
    params, (x, y) = NET.init(jax.random.key(0)), problem()
    run = dict(epochs=1, batch_size=16, key=jax.random.key(1))
    inside = "which gives it only those: give freeze or trainable, and lr_mult, to one grouping"
    cases = [
        ({"freeze": "^0/"}, "^1/", r"freeze '\^0/' matches none of the parameters it is given \(1/b, 1/w\); this"),
        ({"freeze": "^0/"}, "^0/", r"matches every parameter it is given \(0/b, 0/w\): nothing would train; this"),
        ({"lr_mult": {"^0/": 0.1}}, "^1/", r"lr_mult '\^0/' matches none of the parameters it is given"),
    ]
    for grouping, trainable, message in cases:
        opt = jn.grouped(optax.sgd(0.1), **grouping)
        with pytest.raises(ValueError, match=message) as raised:
            jn.fit(NET, params, x, y, loss="softmax_cross_entropy", optimizer=opt, trainable=trainable, **run)
        assert inside in str(raised.value)
    # an lr_mult that matches inside the trainable group composes
    opt = jn.grouped(optax.sgd(0.1), lr_mult={"^1/w": 0.5})
    trained = jn.fit(NET, params, x, y, loss="softmax_cross_entropy", optimizer=opt, trainable="^1/", **run)
    np.testing.assert_array_equal(trained.train.params[0]["w"], params[0]["w"])
    assert not np.array_equal(trained.train.params[1]["w"], params[1]["w"])


def test_the_moving_average_equals_its_closed_form():
    params = NET.init(jax.random.key(0))
    decay = 0.9
    opt = jn.with_ema(optax.sgd(0.1), decay)
    update = jax.jit(jn.make_update(NET, "softmax_cross_entropy", opt))
    state = jn.init_state(params, opt, jax.random.key(1))
    x, y = problem()
    history = [params]
    for i in range(8):
        state, _ = update(state, (x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]))
        history.append(state.params)
    t = len(history) - 1
    weights = [decay**t] + [(1 - decay) * decay ** (t - i) for i in range(1, t + 1)]
    closed = jax.tree.map(lambda *ps: sum(w * np.asarray(p, np.float64) for w, p in zip(weights, ps)), *history)
    ema = jax.tree.map(np.asarray, state.opt_state.ema)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), ema, closed)


def test_fit_validates_and_returns_the_average_and_resumes_it_bitwise():
    params = NET.init(jax.random.key(0))
    val = problem(32, seed=1)
    straight = fit(params, ema=0.9, validation=val, epochs=4)
    half = fit(params, ema=0.9, validation=val, epochs=2)
    resumed = fit(params, ema=0.9, validation=val, epochs=4, resume=half)
    assert_bitwise((resumed.train.params, resumed.train.opt_state, resumed.best_params),
                   (straight.train.params, straight.train.opt_state, straight.best_params))  # fmt: skip
    average = straight.train.opt_state.ema
    loss = jn.make_eval_fn(NET, "softmax_cross_entropy")(average, val)["loss"]
    assert straight.history[-1]["val_loss"] == pytest.approx(float(loss), rel=1e-5)  # validated on the average
    with pytest.raises(ValueError, match=r"ema must be a decay in \(0, 1\)"):
        fit(params, ema=1.0)


def test_a_loss_spike_is_skipped_counted_and_training_goes_on():
    net = jn.mlp([4, 16, 1])  # a regression: a batch scaled 1000x has a loss about 1e6 times as large
    params = net.init(jax.random.key(0))
    opt = jn.skip_spikes(optax.adam(1e-2), window=20, factor=6.0)
    update = jax.jit(jn.make_update(net, "mse", opt))
    state = jn.init_state(params, opt, jax.random.key(1))
    x = problem(512)[0]
    y = x[:, :1] - x[:, 1:2]
    batch = lambda i, scale=1.0: (x[8 * i : 8 * i + 8] * scale, y[8 * i : 8 * i + 8] * scale)  # noqa: E731
    for i in range(49):
        state, _ = update(state, batch(i))
    before = state
    state, metrics = update(state, batch(49, scale=1000.0))  # step 50: the batch scaled 1000x
    assert float(metrics["loss"]) > 10 * float(update(before, batch(48))[1]["loss"])
    assert int(state.opt_state.spikes) == 1
    for a, b in zip(
        jax.tree.leaves((state.params, state.opt_state.inner)), jax.tree.leaves((before.params, before.opt_state.inner))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # fmt: skip
    after, _ = update(state, batch(50))
    assert not np.array_equal(np.asarray(after.params[0]["w"]), np.asarray(state.params[0]["w"]))


def test_fit_counts_spikes_in_its_records():
    net = jn.mlp([4, 16, 1])
    params = net.init(jax.random.key(0))
    x = problem(256)[0]
    y = x[:, :1] - x[:, 1:2]
    x[200:208] *= 1000.0  # one batch near the epoch's end, in order
    y[200:208] *= 1000.0
    result = jn.fit(net, params, x, y, loss="mse", optimizer=optax.adam(1e-2), epochs=1,
                    batch_size=8, key=jax.random.key(1), shuffle=False, skip_spikes=(10, 6.0))  # fmt: skip
    assert result.history[-1]["spikes"] == 1
    clean = jn.fit(net, None, x[:192], y[:192], loss="mse", optimizer=optax.adam(1e-2), epochs=3, batch_size=8,
                   key=jax.random.key(1), shuffle=False, skip_spikes=(10, 6.0), resume=result)  # fmt: skip
    assert [r["spikes"] for r in clean.history] == [1, 0, 0]  # each epoch's own, as skipped (were 1, 1, 1)
    numpy_scalars = jn.grouped(optax.adam(1e-2), lr_mult={"^0/": np.float32(2)})  # taken as Python numbers are
    again = jn.fit(net, params, x, y, loss="mse", optimizer=numpy_scalars, epochs=1, batch_size=8,
                   key=jax.random.key(1), shuffle=False, skip_spikes=(np.int64(10), np.float32(6.0)))  # fmt: skip
    assert again.history[-1]["spikes"] == 1
    with pytest.raises(ValueError, match="skip_spikes must be"):
        fit(NET.init(jax.random.key(0)), skip_spikes=10)
