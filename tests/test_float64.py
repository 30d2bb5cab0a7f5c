"""With ``jax_enable_x64`` and float64 params, losses, means and metrics stay float64."""

import subprocess
import sys
import textwrap


def test_float64_batch_loss_and_gradients_match_a_float64_reference():
    # x64 is process-wide: a fresh interpreter keeps it away from the other tests.
    code = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, optax
        import jaxnet as jn

        net = jn.mlp([3, 5, 2], activation="tanh")
        params = jax.tree.map(lambda a: a.astype(jnp.float64), net.init(jax.random.key(0)))
        rng = np.random.default_rng(0)
        x, t = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))  # 7: not a power of two
        loss_fn = jn.make_loss_fn(net, "mse")
        loss, grads = jax.value_and_grad(loss_fn)(params, (x, t))
        assert loss.dtype == jnp.float64, loss.dtype

        def reference(p):  # the same mean, written out in float64
            y = jnp.tanh(x @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"]
            return jnp.sum((y - t) ** 2) / (7 * 2)

        ref_loss, ref_grads = jax.value_and_grad(reference)(params)
        assert abs(float(loss) - float(ref_loss)) < 1e-14
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        weighted = jn.batch_mean(jn.mean_squared_error)(jnp.asarray(x[:, :2]), jnp.asarray(t), jnp.ones(7))
        assert weighted.dtype == jnp.float64
        result = jn.fit(net, params, x, t, loss="mse", optimizer=optax.sgd(0.01), epochs=2, batch_size=3,
                        key=jax.random.key(1), validation=(x, t))
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(result.params))
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
