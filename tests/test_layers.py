import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnet as jn


def test_dense_computes_affine_then_activation(key):
    layer = jn.dense(3, 2, "tanh")
    params = layer.init(key)
    assert params["w"].shape == (3, 2) and params["b"].shape == (2,)
    x = jnp.array([0.5, -1.0, 2.0])
    expected = np.tanh(np.asarray(x) @ np.asarray(params["w"]) + np.asarray(params["b"]))
    np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-6, atol=1e-6)


def test_mlp_structure_is_plain_pytree(key):
    net = jn.mlp([4, 8, 3], activation="relu")
    params = net.init(key)
    assert isinstance(params, list) and all(isinstance(p, dict) for p in params)
    assert [p["w"].shape for p in params] == [(4, 8), (8, 3)]
    assert jax.tree.structure(params) == jax.tree.structure([{"b": 0, "w": 0}, {"b": 0, "w": 0}])


def test_serial_gives_each_layer_its_own_key(key):
    params = jn.serial(jn.dense(5, 5), jn.dense(5, 5)).init(key)
    assert not np.allclose(params[0]["w"], params[1]["w"])


@pytest.mark.parametrize(
    "sizes, error",
    [
        ([3, 0, 2], ValueError),
        ([3, -1, 2], ValueError),
        ([3, 2.5, 2], ValueError),
        ([3, True, 2], ValueError),
        ([3], ValueError),
        ("3,2", TypeError),
        (["a", 2], ValueError),
    ],
)
def test_mlp_rejects_bad_sizes(sizes, error):
    with pytest.raises(error, match="size"):
        jn.mlp(sizes)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'relu6'.*sigmoid"):
        jn.mlp([2, 2], activation="relu6")


def test_input_length_mismatch_is_a_clear_error(key):
    net = jn.mlp([3, 2, 2])
    with pytest.raises(ValueError, match="expects 3 features"):
        net.apply(net.init(key), jnp.ones(4))


@pytest.mark.parametrize("activation, variance", [("relu", lambda i, o: 2 / i), ("tanh", lambda i, o: 2 / (i + o))])
def test_default_initializers_have_documented_variance(activation, variance):
    fan_in, fan_out = 400, 300
    w = jn.dense(fan_in, fan_out, activation).init(jax.random.key(1))["w"]
    # 120,000 draws: the sample variance is within ~1% of the true one; 5% leaves room for any seed.
    np.testing.assert_allclose(np.var(np.asarray(w)), variance(fan_in, fan_out), rtol=0.05)


def test_with_params_starts_from_given_weights(key):
    net = jn.mlp([3, 2])
    given = [{"w": np.arange(6.0).reshape(3, 2), "b": np.array([1.0, -1.0])}]
    params = jn.with_params(net, given).init(key)
    np.testing.assert_array_equal(params[0]["w"], given[0]["w"])
    assert params[0]["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match=r"0/w is \(2, 3\), the model's is \(3, 2\)"):
        jn.with_params(net, [{"w": np.ones((2, 3)), "b": np.ones(2)}])
    with pytest.raises(ValueError, match="0/b is missing, the model's is"):
        jn.with_params(net, {"w": np.ones((3, 2))})
    with pytest.raises(ValueError, match="structure"):  # the same paths in other containers
        jn.with_params(net, ({"w": np.ones((3, 2)), "b": np.ones(2)},))  # a tuple for the list


def test_batched_forward_equals_python_loop(key):
    net = jn.mlp([5, 7, 3], activation="gelu")
    params = net.init(key)
    xs = jax.random.normal(jax.random.key(2), (9, 5))
    loop = np.stack([np.asarray(net.apply(params, x)) for x in xs])
    np.testing.assert_allclose(jn.batched(net)(params, xs), loop, rtol=1e-6, atol=1e-6)
