import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet as jn

variants = pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["eager", "jit"])


@variants
def test_half_sum_squares_and_mse(variant):
    y, t = jnp.array([0.658, 0.636]), jnp.array([0.9, 0.1])
    np.testing.assert_allclose(variant(jn.half_sum_squares)(y, t), 0.5 * (0.242**2 + 0.536**2), rtol=1e-6)
    np.testing.assert_allclose(variant(jn.mean_squared_error)(y, t), (0.242**2 + 0.536**2) / 2, rtol=1e-6)


@variants
def test_softmax_cross_entropy_matches_float64_reference(variant):
    logits = np.array([2.0, -1.0, 0.5])
    expected = -(logits[2] - np.log(np.sum(np.exp(logits))))
    np.testing.assert_allclose(variant(jn.softmax_cross_entropy)(jnp.asarray(logits), 2), expected, rtol=1e-6)


@variants
def test_sigmoid_binary_cross_entropy_matches_formula(variant):
    z, t = np.array([0.3, -2.0]), np.array([1.0, 0.0])
    p = 1 / (1 + np.exp(-z))
    expected = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    np.testing.assert_allclose(
        variant(jn.sigmoid_binary_cross_entropy)(jnp.asarray(z), jnp.asarray(t)), expected, rtol=1e-6
    )


def test_accuracy_metrics():
    assert float(jn.accuracy(jnp.array([0.1, 3.0, -1.0]), 1)) == 1.0
    assert float(jn.accuracy(jnp.array([0.1, 3.0, -1.0]), 0)) == 0.0
    assert float(jn.binary_accuracy(jnp.array([2.0]), jnp.array([1.0]))) == 1.0
    assert float(jn.binary_accuracy(jnp.array([-2.0]), jnp.array([1.0]))) == 0.0


def test_batch_mean_weights_mask_examples():
    f = jn.batch_mean(jn.half_sum_squares)
    p, t = jnp.array([[1.0], [3.0], [100.0]]), jnp.zeros((3, 1))
    np.testing.assert_allclose(f(p, t), (0.5 + 4.5 + 5000.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(f(p, t, jnp.array([1.0, 1.0, 0.0])), (0.5 + 4.5) / 2, rtol=1e-6)
    assert float(f(p, t, jnp.zeros(3))) == 0.0


def test_get_loss_names_aliases_and_errors():
    assert jn.get_loss("cross_entropy").name == "softmax_cross_entropy"
    assert jn.get_loss("bce").metric is jn.binary_accuracy
    assert jn.get_loss(jn.mean_squared_error).metric is None
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*mse"):
        jn.get_loss("hinge")
    with pytest.raises(TypeError, match="loss must be"):
        jn.get_loss(3)
