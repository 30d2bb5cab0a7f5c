"""Why jaxnet's CPU convolution is im2col: ``lax.conv`` with its gradients, alone and inside ``lax.scan``.

One training step's convolution work (forward, input and kernel gradients) of a 3x3 conv, 32 -> 64
channels on 64 images of 8x8, timed as one jitted call and per iteration of a 10-step ``lax.scan``
(the compiled epoch's form), for ``lax.conv_general_dilated`` and for jaxnet's shifted-slices form.
XLA's CPU backend computes the kernel gradient of ``lax.conv`` slowly inside a loop
(jax-ml/jax#12868); the shifted form runs at the same speed in and out of it. Medians of 5.

    python bench/conv_loop.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxnet.layers import _conv_by_library, _conv_by_shifts  # noqa: E402

LAYOUT = ((1, 1), "SAME", (1, 1), 1)


def _median(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    x = jax.random.normal(jax.random.key(0), (64, 8, 8, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 64)) * 0.05
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    for name, conv in (("lax.conv", _conv_by_library), ("shifted slices", _conv_by_shifts)):
        batched = jax.vmap(lambda xi, w: conv(xi, w, LAYOUT), in_axes=(0, None))
        grad = jax.value_and_grad(lambda x, w: jnp.sum(batched(x, w) ** 2), argnums=(0, 1))

        def body(carry, _):
            xx, ww = carry
            loss, (gx, gw) = grad(xx, ww)
            return (xx + 1e-3 * gx, ww - 1e-3 * gw), loss

        alone = _median(jax.jit(grad), x, w)
        looped = _median(jax.jit(lambda x, w: jax.lax.scan(body, (x, w), None, length=10)[1]), x, w) / 10
        print(f"{name}: alone {alone * 1e3:.2f} ms, per scan step {looped * 1e3:.2f} ms ({looped / alone:.1f}x)")


if __name__ == "__main__":
    main()
