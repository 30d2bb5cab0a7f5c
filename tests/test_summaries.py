"""Summaries against hand counts and XLA's own figures; profiles that TensorBoard's plugin can open."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnet as jn
from jaxnet.app import arch, cli, profiling


def test_mlp_layers_shapes_and_counts_are_listed_with_the_steps_flops():
    s = jn.summary(jn.mlp([784, 512, 512, 10]), jnp.zeros(784), batch_size=128, loss="cross_entropy")
    assert [(r.name, r.output_shape, r.params) for r in s.rows] == [
        ("0.dense", (512,), 784 * 512 + 512),
        ("1.dense", (512,), 512 * 512 + 512),
        ("2.dense", (10,), 512 * 10 + 10),
    ]
    assert s.params == 669_706 and s.state == 0
    matmuls = 2 * 128 * (784 * 512 + 512 * 512 + 512 * 10)  # multiply-adds of the forward pass
    assert matmuls <= s.forward.flops <= 1.1 * matmuls
    assert 2 * matmuls <= s.step.flops <= 3.5 * matmuls  # backward: about twice the forward
    assert s.step.argument_bytes >= 3 * 4 * s.params  # params and Adam's two moments
    text = str(s)
    assert "0.dense" in text and "669,706" in text and "MFLOP" in text


def test_stateful_and_nested_models_and_a_plain_pair():
    model = arch.cnn((8, 8, 1), 10, channels=(4,), hidden=(16,), dropout=0.1)
    s = jn.summary(model, jax.ShapeDtypeStruct((64,), jnp.float32))
    names = [r.name.split(".", 1)[1] for r in s.rows]
    assert "batch_norm" in names and "dropout" in names and s.rows[-1].output_shape == (10,)
    _, state = jn.init_model(model, jax.random.key(0))
    assert s.state == sum(a.size for a in jax.tree.leaves(state))
    pair = jn.Model(lambda key: {"w": jnp.zeros((3, 2))}, lambda p, x: x @ p["w"])
    s = jn.summary(pair, jnp.zeros(3), loss="mse", optimizer=optax.sgd(0.1))
    assert [(r.output_shape, r.params) for r in s.rows] == [((2,), 6)] and s.step is not None


def test_repeated_blocks_are_listed_one_row_per_layer_of_the_stack():
    model = jn.serial(jn.dense(4, 8), jn.repeat(jn.serial(jn.dense(8, 8), jn.batch_norm(8)), 2), jn.dense(8, 2))
    s = jn.summary(model, jnp.ones(4))
    assert [(r.name, r.params) for r in s.rows] == [
        ("0.dense", 40),
        ("1.0.0.dense", 72),
        ("1.0.1.batch_norm", 16),
        ("1.1.0.dense", 72),
        ("1.1.1.batch_norm", 16),
        ("2.dense", 18),
    ]
    assert s.params == 234 and s.state == 2 * 2 * 8  # the stack's running means and variances


def test_a_gpt_is_one_row_of_its_parameters():
    model = jn.gpt(63, context=32, layers=2, heads=2, dim=64)
    s = jn.summary(model, jnp.zeros(32, jnp.int32))
    params = jn.init_model(model, jax.random.key(0))[0]
    assert [(r.name, r.output_shape) for r in s.rows] == [("GPT", (32, 63))]
    assert s.params == sum(a.size for a in jax.tree.leaves(params)) == 63 * 64 + 32 * 64 + 2 * 12 * 64 * 64 + 64 * 5


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="example must be one example"):
        jn.summary(jn.mlp([3, 2]), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        jn.summary(jn.mlp([3, 2]), jnp.zeros(3), batch_size=0)


def _xplanes(folder):
    return [p for p in folder.rglob("*.xplane.pb") if p.stat().st_size > 0]


def test_trace_steps_writes_a_profile_of_the_steps(tmp_path):
    net = jn.mlp([4, 8, 2])
    opt = optax.sgd(0.1)
    state = jn.init_state(net.init(jax.random.key(0)), opt, jax.random.key(1))
    batch = (np.ones((16, 4), np.float32), np.zeros(16, np.int32))
    profiling.trace_steps(jn.make_train_step(net, "cross_entropy", opt), state, [batch], tmp_path, steps=3)
    assert _xplanes(tmp_path)


@pytest.mark.slow  # trains a run and compiles its step twice
def test_cli_summary_of_a_run_and_its_profile(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "1", "--hidden", "16", "--out", str(out), "--profile", "--quiet"]) == 0
    assert _xplanes(out / "profile")
    capsys.readouterr()
    assert cli.main(["summary", "--model", str(out), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(layer["output_shape"], layer["params"]) for layer in found["layers"]] == [
        ([16], 64 * 16 + 16),
        ([10], 170),
    ]
    assert found["batch_size"] == 64 and found["train_step"]["flops"] > found["forward"]["flops"] > 0
    assert cli.main(["summary", "--model", str(out), "--batch-size", "8"]) == 0
    assert "forward, batch 8" in capsys.readouterr().out
    assert cli.main(["summary", "--model", str(tmp_path / "none")]) == 2
    assert "not a jaxnet model" in capsys.readouterr().err
