"""A sort-free keyed permutation of ``0..n-1`` for shuffling epochs.

``jax.random.permutation`` shuffles by sorting random keys: ``O(n log n)`` work in several sort
passes, which on a CPU costs more than a whole epoch of a small model, and under ``vmap`` (one
shuffle per ensemble member) dominates the program. :func:`index_permutation` instead evaluates a
keyed bijection elementwise: a 6-round balanced Feistel network on ``2 * h`` bits
(``4**h >= n``, ``h >= 3``) whose round function is a 32-bit integer hash (Chris Wellons' "lowbias32") of the
half-block xor a round key, restricted to ``[0, n)`` by cycle walking (values that land outside are
sent through the network again until they land inside; each pass keeps them distinct, so the
result is a permutation). Every index costs ``O(1)`` integer operations and the whole shuffle is
one fused elementwise loop.

The order is a pseudorandom permutation chosen by the key: different for each key, identical for
the same key, and statistically well mixed for minibatch SGD. It is not a uniform draw from all
``n!`` orders (no keyed shuffle of large ``n`` is) and not meant for cryptography.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnet.base import PRNGKey

ROUNDS = 6  # 4 rounds left position counts of small n measurably non-uniform; 6 pass a chi-square test
MIN_HALF_BITS = 3  # tiny domains (a few bits per half) mix poorly; walk down from at least 64 instead


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32: a 32-bit integer hash with good avalanche; ``x`` is uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _half_bits(n: int) -> int:
    """Bits per Feistel half: the least ``h >= MIN_HALF_BITS`` with ``4**h >= n``."""
    h = MIN_HALF_BITS
    while 4**h < n:
        h += 1
    return h


def _feistel(values: jax.Array, round_keys: jax.Array, half: int) -> jax.Array:
    mask = jnp.uint32((1 << half) - 1)
    left, right = values >> half, values & mask
    for i in range(ROUNDS):
        left, right = right, left ^ (_mix(right ^ round_keys[i]) & mask)
    return (left << half) | right


def index_permutation(key: PRNGKey, n: int) -> jax.Array:
    """A permutation of ``0..n-1`` chosen by ``key``, computed without sorting.

    Args:
      key: a PRNG key; the same key gives the same order.
      n: the number of indices, ``1 <= n < 2**32``.

    Returns:
      ``(n,)`` int32 array holding each of ``0..n-1`` once.
    """
    return permutation_at(key, n, jnp.arange(n, dtype=jnp.uint32))


def permutation_at(key: PRNGKey, n: int, positions: jax.Array) -> jax.Array:
    """``index_permutation(key, n)[positions]`` without the rest of it: each element is computed
    on its own, so a slice of an epoch's order costs its own length (an epoch of a billion rows
    need not exist whole). ``positions``: integers in ``[0, n)``, any shape."""
    if not 1 <= n < 2**31:
        raise ValueError(f"can only shuffle 1 to 2**31 - 1 indices, got {n}")
    half = _half_bits(n)
    round_keys = jax.random.bits(key, (ROUNDS,), jnp.uint32)
    start = _feistel(jnp.asarray(positions).astype(jnp.uint32), round_keys, half)

    def outside(values):
        return jnp.any(values >= n)

    def walk(values):
        return jnp.where(values >= n, _feistel(values, round_keys, half), values)

    return jax.lax.while_loop(outside, walk, start).astype(jnp.int32)
