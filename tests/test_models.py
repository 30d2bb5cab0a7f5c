"""The model contract through the trainer: randomness, state and batch-level layers in ``fit``,
checkpoints, member runs, data parallelism, DP-SGD and mixed precision; plain models unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet
from jaxnet import checkpoint, parallel
from jaxnet import layers as L

RNG = np.random.default_rng(0)
X = RNG.normal(size=(90, 4, 4, 1)).astype(np.float32)
Y = (X.reshape(90, -1).sum(1) > 0).astype(np.int32)
VAL = (X[:30], Y[:30])


def _cnn(rate=0.2):
    return L.serial(L.conv2d(1, 4, 3, "relu"), L.batch_norm(4), L.flatten(), L.dropout(rate), L.dense(64, 2))


def _fit(net, epochs, *, key=0, resume=None, **options):
    params, state = net.init(jax.random.key(key))
    options = dict(loss="softmax_cross_entropy", optimizer=optax.adam(1e-2), batch_size=16, validation=VAL) | options
    return jaxnet.fit(net, params, X, Y, epochs=epochs, key=jax.random.key(key + 100), model_state=state,
                      resume=resume, **options)  # fmt: skip


def _same(a, b):
    def data(tree):
        return [
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in jax.tree.leaves(tree)
        ]

    return all(np.array_equal(x, y) for x, y in zip(data(a), data(b), strict=True))


def test_a_plain_model_draws_no_random_numbers_and_has_no_state():
    net = L.mlp([3, 4, 2])
    opt = optax.sgd(0.1)
    state = jaxnet.init_state(net.init(jax.random.key(0)), opt, jax.random.key(1))
    assert state.model_state is None
    update = jaxnet.make_update(net, "softmax_cross_entropy", opt)
    jaxpr = str(jax.make_jaxpr(update)(state, (jnp.ones((5, 3)), jnp.zeros(5, jnp.int32))))
    assert "random" not in jaxpr and "threefry" not in jaxpr


@pytest.mark.slow
def test_a_stateful_model_trains_and_evaluates_deterministically():
    result = _fit(_cnn(), 6)
    assert result.history[-1]["val_accuracy"] > 0.8
    assert set(result.model_state[1]) == {"mean", "var"} and not np.allclose(result.model_state[1]["mean"], 0)
    evaluate = jax.jit(jaxnet.make_eval_fn(_cnn(), "softmax_cross_entropy"))
    first, second = (evaluate(result.params, VAL, result.model_state) for _ in range(2))
    assert _same(first, second)
    best = result.history[result.best_epoch - 1]["val_loss"]
    np.testing.assert_allclose(first["loss"], best, rtol=1e-5)  # the best params with their own statistics


@pytest.mark.slow
def test_the_run_is_reproducible_from_its_seed_and_keys_differ_per_step():
    a, b, c = _fit(_cnn(), 2), _fit(_cnn(), 2), _fit(_cnn(), 2, key=1)
    assert _same(a.train.params, b.train.params) and not _same(a.train.params, c.train.params)
    net = _cnn()
    state = jaxnet.init_state({}, optax.sgd(0.1), jax.random.key(0))
    keys = [jaxnet.step_key(net, state._replace(step=jnp.int32(i))) for i in range(3)]
    data = {jax.random.key_data(k).tobytes() for k in keys}
    assert len(data) == 3


@pytest.mark.slow
def test_resume_after_a_checkpoint_equals_the_straight_run_bitwise(tmp_path):
    straight = _fit(_cnn(), 4)
    half = _fit(_cnn(), 2)
    checkpoint.save(tmp_path, half)
    params, state = _cnn().init(jax.random.key(0))
    like = jax.eval_shape(
        lambda: jaxnet.init_fit_state(params, optax.adam(1e-2), jax.random.key(100), model_state=state)
    )
    restored = checkpoint.restore(tmp_path, like).state
    assert _same(restored.train.model_state, half.train.model_state)
    assert _same(restored.best_model_state, half.best_model_state)
    resumed = _fit(_cnn(), 4, resume=restored)
    assert _same(resumed.train, straight.train) and _same(resumed.best_model_state, straight.best_model_state)
    assert resumed.history[-1]["val_loss"] == straight.history[-1]["val_loss"]


def test_padding_of_the_last_batch_stays_out_of_batch_statistics():
    net = L.serial(L.batch_norm(2, momentum=0.0), L.dense(2, 2))  # running statistics = the last batch's
    x = RNG.normal(size=(10, 2)).astype(np.float32)
    params, state = net.init(jax.random.key(0))
    result = jaxnet.fit(net, params, x, np.zeros(10, np.int32), loss="softmax_cross_entropy",
                        optimizer=optax.sgd(0.0), epochs=1, batch_size=4, key=jax.random.key(0),
                        model_state=state, shuffle=False)  # fmt: skip
    # batches [0-3], [4-7], [8, 9 + two padding rows]: the statistics are rows 8 and 9 alone
    np.testing.assert_allclose(result.train.model_state[0]["mean"], x[8:].mean(0), rtol=1e-5)
    np.testing.assert_allclose(result.train.model_state[0]["var"], x[8:].var(0), rtol=1e-4)


@pytest.mark.slow
def test_members_train_as_they_would_alone():
    net = _cnn()
    keys = jaxnet.member_keys([0, 1])
    params, state = jaxnet.init_members(net, keys)
    opt = optax.adam(1e-2)
    members = jaxnet.fit(net, params, X, Y, loss="softmax_cross_entropy", optimizer=opt, epochs=2, batch_size=16,
                         key=keys, validation=VAL, model_state=state)  # fmt: skip
    for i in range(2):
        p, s = net.init(jaxnet.take_member(keys, i))  # as init_members does
        alone = jaxnet.fit(net, p, X, Y, loss="softmax_cross_entropy", optimizer=opt, epochs=2, batch_size=16,
                           key=jaxnet.take_member(keys, i), validation=VAL, model_state=s)  # fmt: skip
        for a, b in zip(jax.tree.leaves(alone.train), jax.tree.leaves(jaxnet.take_member(members.train, i))):
            if jnp.issubdtype(a.dtype, jnp.floating):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (see conftest.py)")
def test_batch_statistics_cover_the_global_batch_under_data_parallelism():
    net = L.serial(L.batch_norm(2, momentum=0.0), L.dense(2, 2))
    x = RNG.normal(size=(16, 2)).astype(np.float32) + np.arange(16, dtype=np.float32)[:, None]
    params, state = net.init(jax.random.key(0))
    options = dict(loss="softmax_cross_entropy", optimizer=optax.sgd(0.0), epochs=1, batch_size=16,
                   key=jax.random.key(0), model_state=state, shuffle=False)  # fmt: skip
    sharded = jaxnet.fit(net, params, x, np.zeros(16, np.int32), mesh=parallel.make_data_mesh(4), **options)
    # each device holds 4 rows; the statistics are those of all 16
    np.testing.assert_allclose(sharded.train.model_state[0]["mean"], x.mean(0), rtol=1e-5)


@pytest.mark.slow
def test_dp_sgd_through_fit_with_dropout_and_validation():
    net = L.serial(L.flatten(), L.dense(16, 8, "relu"), L.dropout(0.1), L.dense(8, 2))
    params, state = net.init(jax.random.key(0))
    opt = jaxnet.dp_optimizer(0.5, 1.0, 0.1, jax.random.key(7))
    result = jaxnet.fit(net, params, X, Y, loss="softmax_cross_entropy", optimizer=opt, epochs=10, batch_size=16,
                        key=jax.random.key(1), validation=VAL, patience=3, model_state=state,
                        per_example_grads=True)  # fmt: skip
    assert max(r["val_accuracy"] for r in result.history) > 0.75 and result.best_epoch >= 1
    with pytest.raises(ValueError, match="meaningless"):
        _fit(_cnn(), 1, per_example_grads=True, optimizer=opt)


@pytest.mark.slow
def test_mixed_precision_with_batch_norm():
    result = _fit(_cnn(), 3, compute_dtype=jnp.bfloat16)
    assert np.isfinite(result.history[-1]["train_loss"])
    assert result.train.model_state[1]["mean"].dtype == jnp.float32  # statistics stay in float32


def test_model_state_is_required_for_a_stateful_model_and_refused_for_a_plain_one():
    net = _cnn()
    params, _ = net.init(jax.random.key(0))
    options = dict(loss="softmax_cross_entropy", optimizer=optax.sgd(0.1), epochs=1, batch_size=8,
                   key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="model_state: a StatefulModel needs its initial state"):
        jaxnet.fit(net, params, X, Y, **options)
    plain = L.mlp([16, 2])
    with pytest.raises(ValueError, match="drop model_state"):
        jaxnet.fit(plain, plain.init(jax.random.key(0)), X.reshape(90, -1), Y, model_state={}, **options)
    with pytest.raises(TypeError, match="jaxnet.Model or jaxnet.StatefulModel"):
        jaxnet.fit(lambda p, x: x, params, X, Y, **options)
