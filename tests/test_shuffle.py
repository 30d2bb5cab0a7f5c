"""The sort-free epoch shuffle: a permutation, keyed, reproducible, and well mixed."""

import jax
import numpy as np
import pytest

from jaxnet.shuffle import index_permutation

permutation = jax.jit(index_permutation, static_argnums=1)


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 4097])
def test_is_a_permutation(n):
    for seed in range(3):
        order = np.asarray(permutation(jax.random.key(seed), n))
        assert order.dtype == np.int32
        np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_same_key_same_order_other_key_other_order():
    a = permutation(jax.random.key(0), 500)
    np.testing.assert_array_equal(a, permutation(jax.random.key(0), 500))
    assert not np.array_equal(a, permutation(jax.random.key(1), 500))


def test_positions_are_uniform_over_keys():
    # Where each of n items lands, over T keys: a chi-square test of the n x n count table
    # against the uniform expectation T / n (dof (n - 1)^2 = 81; the 0.999 quantile is ~129).
    n, trials = 10, 8000
    keys = jax.random.split(jax.random.key(7), trials)
    orders = np.asarray(jax.jit(jax.vmap(lambda k: index_permutation(k, n)))(keys))
    counts = np.stack([np.bincount(orders[:, i], minlength=n) for i in range(n)])
    expected = trials / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 129, chi2


def test_rejects_sizes_it_cannot_shuffle():
    with pytest.raises(ValueError, match="can only shuffle"):
        index_permutation(jax.random.key(0), 0)
