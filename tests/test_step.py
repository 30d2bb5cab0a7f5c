import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn


def _problem(key, n=16):
    net = jn.mlp([4, 8, 3], activation="tanh")
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, 4))
    y = jax.random.randint(ky, (n,), 0, 3)
    return net, net.init(jax.random.key(7)), x, y


def test_batch_gradient_equals_mean_of_per_example_gradients(key):
    net, params, x, y = _problem(key)
    loss_fn = jn.make_loss_fn(net, "softmax_cross_entropy")
    grad = jax.jit(jax.grad(loss_fn))
    batch_grad = grad(params, (x, y))
    x, y = np.asarray(x), np.asarray(y)
    singles = [grad(params, (x[i : i + 1], y[i : i + 1])) for i in range(len(x))]
    mean = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *singles)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), batch_grad, mean)


def test_weighted_batch_gradient_ignores_masked_examples(key):
    net, params, x, y = _problem(key)
    loss_fn = jn.make_loss_fn(net, "softmax_cross_entropy")
    w = jnp.concatenate([jnp.ones(5), jnp.zeros(11)])
    grad = jax.jit(jax.grad(loss_fn))
    masked = grad(params, (x, y, w))
    first5 = grad(params, (x[:5], y[:5]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), masked, first5)


def test_compiled_step_equals_uncompiled_step(key):
    net, params, x, y = _problem(key)
    opt = optax.adam(1e-2)
    update = jn.make_update(net, "softmax_cross_entropy", opt)
    step = jn.make_train_step(net, "softmax_cross_entropy", opt)
    eager = jn.init_state(params, opt, key)
    compiled = jn.init_state(jax.tree.map(jnp.copy, params), opt, key)
    for _ in range(3):
        eager, m_eager = update(eager, (x, y))
        compiled, m_compiled = step(compiled, (x, y))
        np.testing.assert_allclose(m_eager["loss"], m_compiled["loss"], rtol=1e-6)
    assert int(compiled.step) == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager.params, compiled.params)


def test_step_matches_hand_written_sgd(key):
    net, params, x, y = _problem(key)
    loss_fn = jn.make_loss_fn(net, "softmax_cross_entropy")
    grads = jax.grad(loss_fn)(params, (x, y))
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    step = jn.make_train_step(net, "softmax_cross_entropy", optax.sgd(0.1), donate=False)
    state, _ = step(jn.init_state(params, optax.sgd(0.1), key), (x, y))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.params, expected)


def test_step_does_not_retrace(key):
    traces = []
    base = jn.mlp([4, 3])

    def apply(params, x):
        traces.append(1)
        return base.apply(params, x)

    net = jn.Model(base.init, apply)
    opt = optax.sgd(0.1)
    step = jn.make_train_step(net, "mse", opt)
    state = jn.init_state(net.init(key), opt, key)
    for _ in range(4):
        state, _ = step(state, (jnp.ones((8, 4)), jnp.zeros((8, 3))))
    assert len(traces) == 1


def test_mixed_precision_computes_in_bfloat16_with_float32_master_params(key):
    net, params, x, y = _problem(key)
    loss_fn = jn.make_loss_fn(net, "softmax_cross_entropy", compute_dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(loss_fn))(params, (x, y))
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    grads = jax.grad(loss_fn)(params, (x, y))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_bad_optimizer_and_batch_are_type_errors(key):
    net, params, x, y = _problem(key)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        jn.make_train_step(net, "mse", "adam")
    loss_fn = jn.make_loss_fn(net, "softmax_cross_entropy")
    with pytest.raises(TypeError, match="a batch is a tuple"):
        loss_fn(params, x)


def test_skip_nonfinite_updates_skips_a_nonfinite_loss_or_gradient(key):
    net, params, x, y = _problem(key)
    opt = jn.skip_nonfinite_updates(optax.sgd(0.1))
    update = jax.jit(jn.make_update(net, "softmax_cross_entropy", opt))
    state = jn.init_state(params, opt, key)
    state, _ = update(state, (x, y))  # a finite step is applied
    assert int(state.opt_state.total_notfinite) == 0
    before = state.params
    for bad_x in (x.at[0].set(jnp.inf), x.at[0].set(jnp.nan)):
        state, metrics = update(state, (bad_x, y))
        assert not np.isfinite(float(metrics["loss"]))
        jax.tree.map(np.testing.assert_array_equal, state.params, before)  # params untouched
    assert int(state.opt_state.total_notfinite) == 2 and int(state.step) == 3


def test_a_nonfinite_loss_with_finite_gradients_is_skipped_too(key):
    net, params, x, y = _problem(key)
    opt = jn.skip_nonfinite_updates(optax.sgd(0.1))
    infinite = lambda prediction, label: 0.0 * jnp.sum(prediction) + jnp.inf  # noqa: E731  (gradient 0)
    loss_fn = jn.make_loss_fn(net, infinite)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.grad(loss_fn)(params, (x, y))))
    state, _ = jn.make_update(net, infinite, opt)(jn.init_state(params, opt, key), (x, y))
    assert int(state.opt_state.total_notfinite) == 1


def test_a_donating_step_never_deletes_the_callers_arrays():
    """init_state copies what it is given: the README's loop may go on using its params and key."""
    net, opt = jn.mlp([2, 4, 1]), optax.sgd(0.1)
    params, key = net.init(jax.random.key(0)), jax.random.key(1)
    before = [np.asarray(a).copy() for a in jax.tree.leaves(params)]
    state = jn.init_state(params, opt, key)
    state, _ = jn.make_train_step(net, "mse", opt)(state, (jnp.ones((8, 2)), jnp.zeros((8, 1))))
    for a, b in zip(jax.tree.leaves(params), before):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert jax.random.key_data(key).tolist() == jax.random.key_data(jax.random.key(1)).tolist()
    assert int(state.step) == 1
