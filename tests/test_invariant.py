"""fit(device_invariant=k): each step's gradient summed over k parts in one fixed order, so that a
run is bitwise the same on 4, 2 or 1 devices and continues to the bit on another mesh."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxnet as jn
from jaxnet import sharding as S

needs_4 = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (see conftest.py)")
OPTIMIZER = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, b2=0.99, weight_decay=0.1))


def gpt():
    return jn.gpt(vocab_size=64, context=16, layers=2, heads=2, dim=64, dropout=0.1)


def tokens(n=30, t=16, v=64):
    rng = np.random.default_rng(0)
    x = rng.integers(0, v, (n, t)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    y[:5, :4] = jn.IGNORE_INDEX  # masked tokens; 30 rows in batches of 8: the last batch padded
    return x, y


def mesh_of(axes):
    if axes is None:
        return None
    n = int(np.prod(list(axes.values())))
    return S.make_mesh(**axes, devices=jax.devices()[:n])


def fit(net, params, x, y, mesh, *, steps=6, resume=None, optimizer=OPTIMIZER, **kwargs):
    return jn.fit(
        net, params, x, y, loss="softmax_cross_entropy", optimizer=optimizer, steps=steps, eval_every=2,
        batch_size=8, key=jax.random.key(1), model_state={}, mesh=mesh, resume=resume, device_invariant=4, **kwargs,
    )  # fmt: skip


def assert_bitwise(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@needs_4
@pytest.mark.parametrize(
    "axes", [None, pytest.param({"fsdp": 2}, marks=pytest.mark.slow), pytest.param({"data": 2}, marks=pytest.mark.slow)]
)
def test_a_device_invariant_fit_is_bitwise_the_same_on_four_devices_and_fewer(axes):
    net, (x, y) = gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    four = fit(net, params, x, y, mesh_of({"data": 2, "fsdp": 2}), metrics=["accuracy"])
    other = fit(net, params, x, y, mesh_of(axes), metrics=["accuracy"])
    assert_bitwise(other.train.params, four.train.params)
    assert_bitwise(other.train.opt_state, four.train.opt_state)
    assert four.train.params["blocks"]["mlp"]["fc"]["w"].sharding.is_fully_replicated  # whole on every device
    for key in ("train_loss", "train_accuracy"):
        assert [r[key] for r in other.history] == [r[key] for r in four.history]


@needs_4
@pytest.mark.slow
def test_a_device_invariant_run_continues_to_the_bit_on_another_mesh():
    net, (x, y) = gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    four = mesh_of({"fsdp": 4})
    straight = fit(net, params, x, y, four, steps=8)
    half = fit(net, params, x, y, four, steps=4)
    for mesh in (mesh_of({"fsdp": 2}), None):
        resumed = fit(net, params, x, y, mesh, steps=8, resume=half)
        assert_bitwise(resumed.train.params, straight.train.params)
        assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]


@needs_4
def test_a_small_dataset_is_split_into_the_same_parts_with_and_without_a_mesh():
    net, (x, y) = gpt(), tokens(n=28)  # fewer rows than the batch: one padded batch, on every mesh
    params, _ = net.init(jax.random.key(0))
    runs = [
        jn.fit(net, params, x, y, loss="softmax_cross_entropy", optimizer=OPTIMIZER, steps=2, batch_size=32,
               key=jax.random.key(1), model_state={}, mesh=mesh_of(axes), device_invariant=4)
        for axes in (None, {"fsdp": 2})
    ]  # fmt: skip
    assert_bitwise(runs[0].train.params, runs[1].train.params)


def test_a_device_invariant_step_is_the_whole_batchs_mean():
    net, (x, y) = gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    state = jn.init_state(params, optax.sgd(0.5), jax.random.key(1), {})
    batch = (x[:8], y[:8], np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32))  # padding (weight 0) and masked tokens
    net = jn.gpt(vocab_size=64, context=16, layers=2, heads=2, dim=64)  # no dropout: the same forward
    one, parts = (jn.make_update(net, "softmax_cross_entropy", optax.sgd(0.5), device_invariant=k) for k in (None, 4))
    (a, ma), (b, mb) = jax.jit(one)(state, batch), jax.jit(parts)(state, batch)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-6)
    np.testing.assert_equal(mb["weight"], ma["weight"])
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), b.params, a.params)


def test_a_member_run_takes_device_invariant():
    net, (x, y) = gpt(), tokens()
    keys = jax.random.split(jax.random.key(0), 2)
    params, state = jn.init_members(net, keys)
    run = jn.fit(
        net, params, x, y, loss="softmax_cross_entropy", optimizer=OPTIMIZER, steps=2, batch_size=8, key=keys,
        model_state=state, device_invariant=4,
    )  # fmt: skip
    assert np.all(np.isfinite(run.history[-1]["train_loss"])) and len(run.history[-1]["train_loss"]) == 2


@needs_4
@pytest.mark.parametrize(
    "change, message",
    [
        ({"device_invariant": 3}, "device_invariant must be a power of two (1, 2, 4, 8, ...), got 3"),
        ({"device_invariant": 2, "axes": {"fsdp": 4}}, "device_invariant 2 is not divisible by the 4 devices"),
        ({"device_invariant": 16}, "device_invariant 16 does not divide batch_size 8 into equal parts"),
        ({"axes": {"fsdp": 2, "model": 2}}, "device_invariant: a 'model' axis splits each matmul's sums"),
        ({"accumulate": 2}, "device_invariant already splits each batch into parts: drop accumulate"),
        ({"per_example_grads": True}, "device_invariant already splits each batch into parts: drop per_example_"),
        ({"sharding": {"fc": P("fsdp")}, "axes": {"fsdp": 2}}, "device_invariant keeps the params whole on every"),
    ],
)
def test_device_invariant_refuses_what_it_cannot_make_invariant(change, message):
    net, (x, y) = gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    change = dict(change)
    kwargs = {"device_invariant": change.pop("device_invariant", 4), "mesh": mesh_of(change.pop("axes", None))}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        jn.fit(net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.sgd(0.1), steps=2, batch_size=8,
               key=jax.random.key(1), model_state={}, **kwargs, **change)  # fmt: skip


def test_device_invariant_refuses_a_model_with_a_state():
    net = jn.serial(jn.dense(4, 8), jn.batch_norm(8), jn.dense(8, 2))
    params, state = net.init(jax.random.key(0))
    x, y = np.ones((16, 4), np.float32), np.zeros((16,), np.int32)
    with pytest.raises(ValueError, match="device_invariant: the model has a state .* drop device_invariant"):
        jn.fit(net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.sgd(0.1), epochs=1, batch_size=8,
               key=jax.random.key(1), model_state=state, device_invariant=2)  # fmt: skip


def test_same_cpu_threads_sets_the_cpu_pool_before_the_backend_starts_and_keeps_the_users():
    code = (
        "import os, jax; from jaxnet import parts; print(parts.same_cpu_threads(8), os.environ.get('NPROC')); "
        "jax.devices(); print(parts.same_cpu_threads(8))"
    )
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    want = max(8, len(os.sched_getaffinity(0)))
    for given, expected in ((None, f"True {want}\nFalse"), ("3", "False 3\nFalse")):
        run_env = env if given is None else {**env, "NPROC": given}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr
