"""Per-example gradients against a Python loop, and the DP-SGD transformation's clipping and noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import (
    dp_aggregate,
    dp_optimizer,
    init_state,
    make_loss_fn,
    make_per_example_update,
    make_update,
    mlp,
    per_example_grad_norms,
    per_example_grads,
)

# float32 sums of a handful of terms: differences are rounding (seen up to a few 1e-6 between compiled
# programs), far below the size of the gradients (~0.1-1) and of any real error.
ATOL, RTOL = 1e-5, 1e-4

NET = mlp([3, 5, 4])


@pytest.fixture(scope="module")
def problem():
    kx, kp = jax.random.split(jax.random.key(42))
    x = jax.random.normal(kx, (7, 3))
    y = jnp.array([0, 1, 2, 3, 0, 1, 2])
    return NET.init(kp), x, y


@pytest.fixture(scope="module")
def grads(problem):
    params, x, y = problem
    return jax.jit(per_example_grads, static_argnums=0)(make_loss_fn(NET, "softmax_cross_entropy"), params, (x, y))


def _loop_grads(loss_fn, params, x, y):
    grad = jax.jit(jax.grad(loss_fn))  # the reference: one example at a time, in a Python loop
    return [grad(params, (x[i : i + 1], y[i : i + 1])) for i in range(x.shape[0])]


@pytest.mark.parametrize(
    "transform, loss",
    [(jax.jit, "softmax_cross_entropy"), (jax.jit, "mse"), (lambda f: f, "mse")],
    ids=["jit-cross-entropy", "jit-mse", "eager-mse"],
)
def test_per_example_grads_equal_a_python_loop(problem, transform, loss):
    params, x, y = problem
    if loss == "mse":
        y = jax.nn.one_hot(y, 4)
    loss_fn = make_loss_fn(NET, loss)
    grads = transform(lambda p, b: per_example_grads(loss_fn, p, b))(params, (x, y))
    grads = jax.tree.map(np.asarray, grads)
    for i, expected in enumerate(_loop_grads(loss_fn, params, x, y)):
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g[i], e, atol=ATOL, rtol=RTOL), grads, expected)


def test_mean_of_per_example_grads_is_the_batch_gradient(problem, grads):
    params, x, y = problem
    batch = jax.jit(jax.grad(make_loss_fn(NET, "softmax_cross_entropy")))(params, (x, y))
    jax.tree.map(lambda g, b: np.testing.assert_allclose(g.mean(0), b, atol=ATOL, rtol=RTOL), grads, batch)


def test_weight_zero_examples_have_zero_gradient(problem):
    params, x, y = problem
    w = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    loss_fn = make_loss_fn(NET, "softmax_cross_entropy")
    norms = jax.jit(lambda p, b: per_example_grad_norms(per_example_grads(loss_fn, p, b)))(params, (x, y, w))
    assert norms[1] == 0 and norms[4] == 0 and bool(jnp.all(norms[w > 0] > 0))


def test_norms_are_global_l2_norms(problem, grads):
    params, x, y = problem
    norms = per_example_grad_norms(grads)
    assert norms.shape == (7,)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(grads)]
    for i in range(7):
        flat = np.concatenate([np.ravel(leaf[i]) for leaf in leaves])
        np.testing.assert_allclose(norms[i], np.linalg.norm(flat), rtol=RTOL)


def test_clipping_bounds_every_per_example_norm(problem, grads):
    params, x, y = problem
    norms = np.asarray(per_example_grad_norms(grads))
    clip = float(np.median(norms))  # half the examples are clipped, half pass unchanged
    dp = dp_aggregate(clip, 0.0, jax.random.key(0))
    state = dp.init(params)
    update = jax.jit(dp.update)
    for i in range(7):  # a batch of one example: the output is that example's clipped gradient
        one = jax.tree.map(lambda g: g[i : i + 1], grads)
        out, _ = update(one, state)
        norm = np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree.leaves(out)))
        assert norm <= clip * (1 + 1e-5)
        np.testing.assert_allclose(norm, min(norms[i], clip), rtol=1e-5)
    # The whole batch: the mean of g * min(1, C / |g|).
    out, _ = update(grads, state)
    scale = np.minimum(1.0, clip / norms)
    expected = jax.tree.map(
        lambda g: np.mean(np.asarray(g) * scale.reshape((-1,) + (1,) * (g.ndim - 1)), axis=0), grads
    )
    jax.tree.map(lambda o, e: np.testing.assert_allclose(o, e, atol=ATOL, rtol=RTOL), out, expected)


def test_noise_comes_from_the_key(problem, grads):
    params, x, y = problem

    dp = dp_aggregate(1.0, 1.0, jax.random.key(0))
    update = jax.jit(dp.update)

    def noised(seed):
        state = dp.init(params)._replace(rng_key=jax.random.key(seed))
        return np.asarray(jax.tree.leaves(update(grads, state)[0])[0])

    np.testing.assert_array_equal(noised(1), noised(1))
    assert not np.allclose(noised(1), noised(2))


def test_dp_update_without_clipping_or_noise_is_sgd(problem):
    params, x, y = problem
    loss = "softmax_cross_entropy"
    dp = dp_optimizer(0.1, 1e6, 0.0, jax.random.key(0))
    sgd = optax.sgd(0.1)
    batch = (x, y, jnp.ones(7))
    s_dp, m_dp = jax.jit(make_per_example_update(NET, loss, dp))(init_state(params, dp, jax.random.key(1)), batch)
    s_sgd, m_sgd = jax.jit(make_update(NET, loss, sgd))(init_state(params, sgd, jax.random.key(1)), batch)
    np.testing.assert_allclose(m_dp["loss"], m_sgd["loss"], rtol=RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL), s_dp.params, s_sgd.params)


@pytest.mark.parametrize(
    "clip, noise, match",
    [
        (0.0, 1.0, "l2_norm_clip must be greater than 0"),
        (1.0, -1.0, "noise_multiplier must be 0 or more"),
        (float("nan"), 1.0, "l2_norm_clip must be a finite number"),
    ],
)
def test_dp_rejects_bad_parameters(clip, noise, match):
    with pytest.raises(ValueError, match=match):
        dp_aggregate(clip, noise, jax.random.key(0))
