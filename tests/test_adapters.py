"""Models from Flax, Equinox and Haiku: each trained in its own library's idiomatic loop and through
``jaxnet.fit`` from the same initial values, with matching losses; batch norm and dropout in
training and eval mode."""

import jax
import numpy as np
import optax
import pytest

import jaxnet

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 6)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] ** 2 > 1).astype(np.int32)
EPOCHS, LR = 6, 0.1


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _jaxnet_losses(model, params, state):
    """Full-batch SGD through fit: one step per epoch, in the data's order."""
    result = jaxnet.fit(model, params, X, Y, loss="softmax_cross_entropy", optimizer=optax.sgd(LR), epochs=EPOCHS,
                        batch_size=len(X), key=jax.random.key(0), model_state=state, shuffle=False)  # fmt: skip
    return [r["train_loss"] for r in result.history], result


def _reference_loop(loss_and_state, params, state):
    """The libraries' idiom: value_and_grad of a loss that returns the new state, an optax update."""
    opt = optax.sgd(LR)
    opt_state, losses = opt.init(params), []
    step = jax.jit(jax.value_and_grad(loss_and_state, has_aux=True))
    for _ in range(EPOCHS):
        (loss, state), grads = step(params, state)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return losses, params, state


def test_flax_linen_with_batch_norm_trains_as_in_flax():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(16)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.Dense(2)(nn.relu(x))

    module = Net()
    model = jaxnet.from_flax(module, X[0])
    params, state = model.init(jax.random.key(1))
    assert set(state) == {"batch_stats"}

    def loss(params, state):
        logits, updated = module.apply({"params": params, **state}, X, train=True, mutable=["batch_stats"])
        return _ce(logits, Y), updated

    want, want_params, want_state = _reference_loop(loss, params, state)
    got, result = _jaxnet_losses(model, params, state)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(result.train.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                               want_state["batch_stats"]["BatchNorm_0"]["mean"], rtol=1e-5, atol=1e-6)  # fmt: skip
    # eval mode uses the running statistics, deterministically
    evaluate = jax.jit(jaxnet.make_eval_fn(model, "softmax_cross_entropy"))
    first, second = (evaluate(result.params, (X, Y), result.model_state) for _ in range(2))
    assert first["loss"] == second["loss"]
    logits = module.apply({"params": result.params, **result.model_state}, X, train=False)
    np.testing.assert_allclose(first["loss"], _ce(logits, Y), rtol=1e-5)


@pytest.mark.slow
def test_flax_linen_dropout_draws_from_jaxnet_keys_only_in_training():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic: bool):
            return nn.Dense(2)(nn.Dropout(0.5)(nn.Dense(32)(x), deterministic=deterministic))

    model = jaxnet.from_flax(Net(), X[0])
    params, state = model.init(jax.random.key(0))
    a = jaxnet.apply_batch(model, params, state, X, train=True, key=jax.random.key(1))[0]
    b = jaxnet.apply_batch(model, params, state, X, train=True, key=jax.random.key(2))[0]
    c = jaxnet.apply_batch(model, params, state, X)[0]
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(c, jaxnet.apply_batch(model, params, state, X)[0])
    result = jaxnet.fit(model, params, X, Y, loss="softmax_cross_entropy", optimizer=optax.adam(1e-2), epochs=30,
                        batch_size=16, key=jax.random.key(0), model_state=state, validation=(X, Y))  # fmt: skip
    assert result.history[-1]["val_accuracy"] > 0.85


@pytest.mark.slow
def test_flax_nnx_with_batch_norm_trains_as_in_flax():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up, self.norm, self.out = (
                nnx.Linear(6, 16, rngs=rngs),
                nnx.BatchNorm(16, rngs=rngs),
                nnx.Linear(16, 2, rngs=rngs),
            )

        def __call__(self, x):
            return self.out(jax.nn.relu(self.norm(self.up(x))))

    model = jaxnet.from_nnx(Net(nnx.Rngs(0)))
    params, state = model.init(jax.random.key(0))
    got, _ = _jaxnet_losses(model, params, state)

    reference = Net(nnx.Rngs(0))  # the same initialization, trained NNX's way
    reference.train()
    graphdef, _, rest = nnx.split(reference, nnx.Param, ...)

    def loss(params, rest):
        m = nnx.merge(graphdef, params, rest, copy=True)
        value = _ce(m(X), Y)
        return value, nnx.split(m, nnx.Param, ...)[2]

    want, _, _ = _reference_loop(loss, nnx.split(reference, nnx.Param, ...)[1], rest)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_equinox_with_batch_norm_state_trains_as_in_equinox():
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        up: eqx.nn.Linear
        norm: eqx.nn.BatchNorm
        out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.up, self.out = eqx.nn.Linear(6, 16, key=k1), eqx.nn.Linear(16, 2, key=k2)
            self.norm = eqx.nn.BatchNorm(16, axis_name="batch", momentum=0.9, mode="ema")

        def __call__(self, x, state, *, key=None):
            h, state = self.norm(self.up(x), state)
            return self.out(jax.nn.relu(h)), state

    net, net_state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    model = jaxnet.from_equinox(net, net_state)
    params, state = model.init(jax.random.key(5))
    got, result = _jaxnet_losses(model, params, state)
    static = eqx.partition(net, eqx.is_inexact_array)[1]

    def loss(params, state):
        m = eqx.combine(params, static)
        logits, state = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(X, state)
        return _ce(logits, Y), state

    want, _, _ = _reference_loop(loss, params, state)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # members from a factory start from different initializations
    factory = jaxnet.from_equinox(eqx.nn.make_with_state(Net))
    stacked, _ = jaxnet.init_members(factory, jaxnet.member_keys([0, 1]))
    assert not np.allclose(stacked.up.weight[0], stacked.up.weight[1])


@pytest.mark.slow
def test_haiku_transform_with_state_trains_as_in_haiku():
    hk = pytest.importorskip("haiku")

    def forward(x, is_training):
        h = hk.Linear(16)(x)
        h = hk.BatchNorm(True, True, decay_rate=0.9)(h, is_training)
        return hk.Linear(2)(jax.nn.relu(h))

    transformed = hk.transform_with_state(forward)
    model = jaxnet.from_haiku(transformed, X[0], train_argument="is_training")
    params, state = model.init(jax.random.key(0))
    got, result = _jaxnet_losses(model, params, state)

    def loss(params, state):
        logits, state = transformed.apply(params, state, None, X, is_training=True)
        return _ce(logits, Y), state

    want, _, _ = _reference_loop(loss, params, state)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = jaxnet.from_haiku(hk.transform(lambda x: hk.Linear(2)(x)), X[0])
    p, s = plain.init(jax.random.key(0))
    assert s == {} and jaxnet.apply_batch(plain, p, s, X)[0].shape == (64, 2)


def test_adapters_refuse_an_unknown_train_argument():
    nn = pytest.importorskip("flax.linen")
    with pytest.raises(ValueError, match="train_argument must be one of"):
        jaxnet.from_flax(nn.Dense(2), X[0], train_argument="mode")
