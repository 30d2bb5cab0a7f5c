"""Sharded parameters: meshes, the rules that lay params out, fit on FSDP and tensor-parallel
meshes (equal to one device), resume onto another mesh, and accumulated microbatches."""

import functools
import json
import logging

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxnet as jn
from jaxnet import sharding as S

needs_4 = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (see conftest.py)")


def small_gpt():
    return jn.gpt(vocab_size=256, context=16, layers=2, heads=2, dim=128)


def tokens(n=32, t=16, v=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, v, (n, t)).astype(np.int32)
    return x, np.roll(x, -1, axis=1)


def test_make_mesh_names_its_axes_fills_one_and_refuses_a_wrong_product():
    mesh = S.make_mesh(data=-1, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 1}
    assert dict(S.make_mesh(fsdp=2, model=-1, devices=jax.devices()[:4]).shape) == {"data": 1, "fsdp": 2, "model": 2}
    with pytest.raises(ValueError, match="needs 6 devices, but there are 4"):
        S.make_mesh(data=3, fsdp=2, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        S.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="fsdp must be a positive integer or -1"):
        S.make_mesh(fsdp=0)
    assert S.parse_mesh("data=2, fsdp=-1") == {"data": 2, "fsdp": -1}
    with pytest.raises(ValueError, match="unknown mesh axis 'tensor'"):
        S.parse_mesh("tensor=2")
    assert S.parse_spec("None,model") == P(None, "model") and S.parse_spec("data+fsdp") == P(("data", "fsdp"))


@needs_4
def test_fsdp_shards_each_large_leaf_on_its_largest_divisible_dimension():
    mesh = S.make_mesh(fsdp=4, devices=jax.devices()[:4])
    params = {"big": np.zeros((6, 4096)), "odd": np.zeros((4099, 5)), "small": np.zeros((4, 8)), "b": np.zeros(2**15)}
    specs = S.param_specs(params, mesh)
    assert specs == {"big": P(None, "fsdp"), "odd": P(), "small": P(), "b": P("fsdp")}


@needs_4
def test_tensor_parallel_rules_split_columns_then_rows_and_fsdp_takes_another_dimension():
    mesh = S.make_mesh(fsdp=2, model=2, devices=jax.devices()[:4])
    params, _ = small_gpt().init(jax.random.key(0))
    specs = S.param_specs(params, mesh)
    attn, mlp = specs["blocks"]["attn"], specs["blocks"]["mlp"]  # stacked: (layers, in, out)
    assert attn["q"]["w"] == P(None, "fsdp", "model") and attn["o"]["w"] == P(None, "model", "fsdp")
    assert mlp["fc"]["w"] == P(None, "fsdp", "model") and mlp["proj"]["w"] == P(None, "model", "fsdp")
    assert specs["embed"]["table"] == P("model", "fsdp") and specs["ln_f"]["scale"] == P()


@needs_4
def test_a_users_rules_win_and_bad_rules_name_the_param_before_anything_compiles():
    mesh = S.make_mesh(fsdp=2, model=2, devices=jax.devices()[:4])
    params, _ = small_gpt().init(jax.random.key(0))
    specs = S.param_specs(params, mesh, {r"attn/q/w$": "model,None", "embed": P()})
    assert specs["blocks"]["attn"]["q"]["w"] == P("model", None) and specs["embed"]["table"] == P()
    with pytest.raises(ValueError, match="'nothing/here' matches no parameter; the parameters are: blocks/attn/k/w"):
        S.param_specs(params, mesh, {"nothing/here": "fsdp"})
    with pytest.raises(ValueError, match="dimension 0 of layer/w \\(6, 8\\) is not divisible by .* of size 4"):
        S.param_specs({"layer": {"w": np.zeros((6, 8))}}, mesh, {"w$": "fsdp+model"})
    with pytest.raises(ValueError, match="longer than its rank"):
        S.param_specs(params, mesh, {"ln_f/scale": "fsdp,None"})
    with pytest.raises(ValueError, match="the mesh has no axis 'data'"):
        S.param_specs(params, jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4]), {"embed": "data"})
    net, (x, y) = small_gpt(), tokens()
    with pytest.raises(ValueError, match="matches no parameter"):
        fit(net, params, x, y, mesh=mesh, sharding={"nope": "fsdp"})
    with pytest.raises(ValueError, match="give mesh"):
        fit(net, params, x, y, sharding={"embed": "fsdp"})


def fit(net, params, x, y, steps=6, optimizer=None, every=None, **options):
    return jn.fit(
        net, params, x, y, loss="softmax_cross_entropy", optimizer=optimizer or optax.adamw(3e-3), steps=steps,
        eval_every=every or steps // 2, batch_size=8, key=jax.random.key(1), model_state={},
        validation=tokens(8, seed=1), **options,
    )  # fmt: skip


@needs_4
@pytest.mark.parametrize(
    "axes",
    [pytest.param({"fsdp": 4}, marks=pytest.mark.slow), {"fsdp": 2, "model": 2},
     pytest.param({"data": 2, "model": 2}, marks=pytest.mark.slow)],
)  # fmt: skip
def test_a_sharded_fit_equals_one_device_and_holds_its_share_of_the_state(axes):
    net, (x, y) = small_gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    alone = fit(net, params, x, y)
    mesh = S.make_mesh(**axes, devices=jax.devices()[:4])
    sharded = fit(net, params, x, y, mesh=mesh)
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([r[key] for r in sharded.history], [r[key] for r in alone.history], rtol=1e-5)
    # params: with SGD (Adam's m / sqrt(v) turns the rounding of near-zero gradients into whole steps)
    sgd = [fit(net, params, x, y, optimizer=optax.sgd(0.5), mesh=m) for m in (None, mesh)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), sgd[0].train.params, sgd[1].train.params)
    state = (sharded.train.params, sharded.train.opt_state)
    whole = S.bytes_per_device((alone.train.params, alone.train.opt_state))
    split = 4 // axes.get("data", 1)
    assert S.bytes_per_device(state) <= whole * 1.05 / split
    q = sharded.train.opt_state[0].mu["blocks"]["attn"]["q"]["w"]  # Adam's moments follow their params
    assert q.sharding.spec == sharded.train.params["blocks"]["attn"]["q"]["w"].sharding.spec


@needs_4
def test_a_sharded_fit_compiles_its_training_program_once(caplog):
    # Each round's first call had inputs made on the host's default device (a fresh epoch's sums),
    # the next the laid-out outputs of the last: three compiles of the same program per fit.
    net, (x, y) = small_gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    mesh = S.make_mesh(fsdp=2, model=2, devices=jax.devices()[:4])
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        run = fit(net, params, x, y, steps=6, every=2, mesh=mesh)  # 3 rounds over 2 epochs of 4 steps
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(constrained)")]
    assert len(run.history) == 3 and len(compiles) == 1, [r.getMessage()[:120] for r in compiles]


@pytest.mark.slow
@needs_4
def test_a_sharded_run_resumes_on_another_mesh_and_on_one_device_with_the_same_result():
    net, (x, y) = small_gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    four = S.make_mesh(fsdp=4, devices=jax.devices()[:4])
    sgd = optax.sgd(0.5)
    straight = fit(net, params, x, y, steps=8, every=2, optimizer=sgd, mesh=four)
    half = fit(net, params, x, y, steps=4, every=2, optimizer=sgd, mesh=four)
    for mesh in (S.make_mesh(fsdp=2, devices=jax.devices()[:2]), None):
        resumed = fit(net, params, x, y, steps=8, every=2, optimizer=sgd, mesh=mesh, resume=half)
        losses = [[r["train_loss"] for r in run.history] for run in (resumed, straight)]
        np.testing.assert_allclose(*losses, rtol=1e-5)
        equal = functools.partial(np.testing.assert_allclose, atol=1e-6)
        jax.tree.map(equal, resumed.train.params, straight.train.params)


@needs_4
def test_a_checkpoint_is_read_straight_into_the_shards_of_another_mesh(tmp_path):
    from jaxnet import checkpoint

    params, _ = small_gpt().init(jax.random.key(0))
    four = S.make_mesh(fsdp=4, devices=jax.devices()[:4])
    saved = jn.init_fit_state(params, optax.adamw(1e-3), jax.random.key(1), mesh=four)  # laid out on fsdp=4
    saved = saved._replace(best_params=saved.train.params)
    checkpoint.save(tmp_path, saved)
    like = jax.eval_shape(lambda: jn.init_fit_state(params, optax.adamw(1e-3), jax.random.key(1)))
    two = S.make_mesh(fsdp=2, devices=jax.devices()[:2])
    state = checkpoint.restore(tmp_path, like, mesh=two).state
    fc, mu = state.train.params["blocks"]["mlp"]["fc"]["w"], state.train.opt_state[0].mu["blocks"]["mlp"]["fc"]["w"]
    for a in (fc, mu, state.best_params["blocks"]["mlp"]["fc"]["w"]):  # (2, 128, 512): its largest dimension split
        assert a.sharding == jax.sharding.NamedSharding(two, P(None, None, "fsdp")), a.sharding
        assert {s.data.shape for s in a.addressable_shards} == {(2, 128, 256)}
    assert state.train.step.sharding.is_fully_replicated
    jax.tree.map(np.testing.assert_array_equal, state.train.params, saved.train.params)  # bit for bit
    whole = checkpoint.restore(tmp_path, like).state.train.params["blocks"]["mlp"]["fc"]["w"]
    assert isinstance(whole, np.ndarray)  # without a mesh: whole, on the host
    with pytest.raises(ValueError, match="'nothing/here' matches no parameter"):  # before any checkpoint is read
        checkpoint.restore(tmp_path, like, mesh=two, sharding=[("nothing/here", P("fsdp"))])
    with pytest.raises(ValueError, match="sharding rules lay the arrays out on a mesh: give mesh"):
        checkpoint.restore(tmp_path, like, sharding=[("fc", P("fsdp"))])
    wider, _ = jn.gpt(vocab_size=256, context=16, layers=2, heads=2, dim=256).init(jax.random.key(0))
    other = jax.eval_shape(lambda: jn.init_fit_state(wider, optax.adamw(1e-3), jax.random.key(1)))
    for mesh in (two, None):  # another model: named from the stored shapes, before any array is read
        expected = r"array best_params.blocks.attn.k.w is float32 \(2, 128, 128\), expected float32 \(2, 256, 256\)"
        with pytest.raises(ValueError, match=expected):
            checkpoint.restore(tmp_path, other, mesh=mesh)


@needs_4
def test_init_sharded_creates_params_in_their_shards():
    mesh = S.make_mesh(fsdp=4, devices=jax.devices()[:4])
    params, state = S.init_sharded(small_gpt(), jax.random.key(0), mesh)
    fc = params["blocks"]["mlp"]["fc"]["w"]  # (layers, 128, 512)
    assert fc.sharding.spec == P(None, None, "fsdp") and fc.addressable_shards[0].data.shape == (2, 128, 128)
    expected, _ = jax.jit(small_gpt().init)(jax.random.key(0))  # the same values, laid out
    np.testing.assert_array_equal(np.asarray(fc), np.asarray(expected["blocks"]["mlp"]["fc"]["w"]))


@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow), 8])
def test_accumulated_microbatches_equal_the_whole_batch(k):
    net, (x, y) = small_gpt(), tokens(30)
    y[:5, :4] = jn.IGNORE_INDEX  # masked tokens, and a padded last batch (30 rows in batches of 8)
    params, _ = net.init(jax.random.key(0))

    def run(accumulate):
        return jn.fit(
            net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.sgd(0.5), epochs=2, batch_size=8,
            key=jax.random.key(1), model_state={}, accumulate=accumulate, metrics=["accuracy"],
        )  # fmt: skip

    whole, parts = run(1), run(k)
    for key in ("train_loss", "train_accuracy"):
        np.testing.assert_allclose([r[key] for r in parts.history], [r[key] for r in whole.history], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), parts.train.params, whole.train.params)
    # one step, a batch with padding (weight 0) and masked tokens: the same update to 1e-6
    state = jn.init_state(params, optax.sgd(0.5), jax.random.key(1), {})
    batch = (x[:8], y[:8], np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32))
    one, split = (jn.make_update(net, "softmax_cross_entropy", optax.sgd(0.5), accumulate=a) for a in (1, k))
    (a, ma), (b, mb) = jax.jit(one)(state, batch), jax.jit(split)(state, batch)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-6)
    np.testing.assert_equal(mb["weight"], ma["weight"])
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), b.params, a.params)


def test_accumulate_must_divide_the_batch():
    net, (x, y) = small_gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    with pytest.raises(ValueError, match="accumulate 3 does not divide batch_size 8"):
        jn.fit(net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.sgd(0.1), epochs=1, batch_size=8,
               key=jax.random.key(1), model_state={}, accumulate=3)  # fmt: skip


def test_repeat_equals_its_blocks_applied_one_after_another():
    block = jn.dense(8, 8, "tanh")
    net = jn.repeat(block, 3)
    params = net.init(jax.random.key(0))
    assert params["w"].shape == (3, 8, 8)
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    h = x
    for i in range(3):
        h = block.apply(jax.tree.map(lambda a: a[i], params), h)
    np.testing.assert_allclose(net.apply(params, x), h, rtol=1e-6)
    for remat in ("dots", "full"):
        again = jn.repeat(block, 3, remat=remat)
        grads = [jax.grad(lambda p, m=m: m.apply(p, x).sum())(params) for m in (net, again)]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), *grads)


def test_repeat_of_a_stateful_block_gives_each_copy_its_state_and_its_own_dropout():
    block = jn.serial(jn.dense(8, 8), jn.dropout(0.5))
    net = jn.repeat(block, 2)
    params, state = net.init(jax.random.key(0))
    assert isinstance(net, jn.StatefulModel) and params[0]["w"].shape == (2, 8, 8)
    ctx = jn.Context(train=True, key=jax.random.key(3))
    x = np.ones(8, np.float32)
    y, _ = net.apply(params, state, x, ctx)
    h = x
    for i in range(2):
        h, _ = block.apply(jax.tree.map(lambda a: a[i], params), jax.tree.map(lambda a: a[i], state), h, ctx.fold(i))
    np.testing.assert_allclose(y, h, rtol=1e-6)


@pytest.mark.parametrize("remat", [pytest.param("dots", marks=pytest.mark.slow), "full"])
def test_a_rematted_gpt_has_the_gradients_of_the_plain_one(remat):
    x, y = tokens(4)

    def grads(remat):
        net = jn.gpt(vocab_size=256, context=16, layers=3, heads=2, dim=32, remat=remat)
        params, _ = net.init(jax.random.key(0))
        loss = jn.make_loss_fn(net, "softmax_cross_entropy")
        return jax.grad(lambda p: loss(p, (x, y), {})[0])(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads(remat), grads("none"))
    with pytest.raises(ValueError, match="unknown remat 'some': use one of none, dots, full"):
        jn.gpt(vocab_size=256, context=16, layers=1, heads=2, dim=32, remat="some")


@needs_4
@pytest.mark.slow  # (12 s: five steps compiled)
def test_a_step_over_the_memory_budget_is_refused_before_it_runs_and_fits_with_fsdp():
    from jaxnet import _programs, loop

    net, (x, y) = jn.gpt(vocab_size=256, context=16, layers=2, heads=2, dim=256), tokens()
    params, _ = net.init(jax.random.key(0))
    mesh = S.make_mesh(fsdp=4, devices=jax.devices()[:4])
    state = jn.init_fit_state(params, optax.adamw(1e-3), jax.random.key(1), model_state={})
    options = loop.FitOptions(epochs=None, steps=2, batch_size=8)
    rows = (jax.ShapeDtypeStruct((16,), np.int32),) * 2
    spec = jn.get_loss("softmax_cross_entropy")
    alone, split = (_programs.step_cost(net, spec, optax.adamw(1e-3), options, state.train, rows, m)["total"]
                    for m in (None, mesh))  # fmt: skip
    assert split < alone
    budget = (alone + split) // 2
    with pytest.raises(loop.MemoryBudgetError, match=r"one training step needs .* MiB per device .* over the memory"):
        fit(net, params, x, y, steps=2, memory_budget=budget)
    assert fit(net, params, x, y, steps=2, memory_budget=budget, mesh=mesh).history[-1]["step"] == 2


def test_utilization_is_the_steps_flops_over_the_peak():
    net, (x, y) = small_gpt(), tokens()
    params, _ = net.init(jax.random.key(0))
    result = fit(net, params, x, y, steps=4, peak_tflops=0.5)
    record = result.history[-1]
    busy = record["seconds"] - record["val_seconds"]
    assert record["mfu"] == pytest.approx(record["flops_per_second"] / 0.5e12)
    # a GPT step is about 6 FLOPs per weight per token (PaLM's count) plus attention: within 2x of XLA's
    flops = record["flops_per_second"] * busy / record["steps"]
    weights = sum(a.size for a in jax.tree.leaves(params))
    assert 0.5 < flops / (6 * weights * 8 * 16) < 2
    with pytest.raises(ValueError, match="peak_tflops"):
        fit(net, params, x, y, steps=2, peak_tflops=-1.0)


def run_workers(processes: int, devices: int, out, *extra, timeout=240):
    """tests/sharded_worker.py in ``processes`` processes of ``devices`` CPU devices each
    (``jax.distributed`` on localhost when more than one), writing ``out``; asserts they succeed."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    worker, root = Path(__file__).parent / "sharded_worker.py", str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    address = "-"
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{s.getsockname()[1]}"
    command = [sys.executable, str(worker), address, str(processes)]
    procs = [subprocess.Popen([*command, str(i), str(out), *map(str, extra)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(processes)]  # fmt: skip
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, outputs
    return json.loads(Path(out).read_text())


@pytest.mark.slow
def test_two_processes_of_four_devices_give_the_losses_of_one_process_of_eight(tmp_path):
    two, single = run_workers(2, 4, tmp_path / "two.json"), run_workers(1, 8, tmp_path / "one.json")
    assert two["local_shards"] == 4 and single["local_shards"] == 8  # each process holds 4 of the 8 shards
    np.testing.assert_allclose(two["losses"], single["losses"], rtol=1e-5)


def test_batch_size_auto_is_the_largest_power_of_two_whose_step_fits():
    from jaxnet import _programs, loop

    net = jn.mlp([32, 256, 256, 10])
    params = net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3000, 32)).astype(np.float32), rng.integers(0, 10, 3000).astype(np.int32)
    spec, opt = jn.get_loss("softmax_cross_entropy"), optax.adam(1e-3)
    state = jax.eval_shape(lambda p: jn.init_state(p, opt, jax.random.key(0)), params)
    rows = (jax.ShapeDtypeStruct((32,), np.float32), jax.ShapeDtypeStruct((), np.int32))

    def need(b):  # XLA's figure for a step of b examples, as fit's preflight sees it
        options = loop.FitOptions(epochs=1, batch_size=b)
        return _programs.step_cost(net, spec, opt, options, state, rows, None)["total"]

    budget = (need(64) + need(128)) // 2
    common = dict(loss="softmax_cross_entropy", optimizer=opt)
    assert jn.fitting_batch_size(net, params, x, y, memory_budget=budget, **common) == 64
    assert jn.fitting_batch_size(net, params, x, y, memory_budget=need(8192), **common) == 2048  # at most the rows
    result = jn.fit(net, params, x, y, batch_size="auto", memory_budget=budget, epochs=1, key=jax.random.key(1),
                    **common)  # fmt: skip
    assert result.history[-1]["steps"] == -(-3000 // 64)
    with pytest.raises(loop.MemoryBudgetError, match=r"batch_size 'auto': not even a batch of 1 fits"):
        jn.fitting_batch_size(net, params, x, y, memory_budget=need(1) - 1, **common)
    with pytest.raises(ValueError, match=r"batch_size 'auto' picks a power of two, which accumulate 3"):
        jn.fit(net, params, x, y, batch_size="auto", accumulate=3, epochs=1, key=jax.random.key(1), **common)


def test_the_command_lines_batch_size_auto_is_recorded_as_the_number_it_became(tmp_path):
    from jaxnet.app import config as configlib
    from jaxnet.app import run as runlib

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(500, 8)).astype(np.float32), y=rng.integers(0, 3, 500))
    config = configlib.make_config(data=str(tmp_path / "d.npz"), batch_size="auto", memory_budget=64 << 20, epochs=2)
    said = []
    result = runlib.run(config, out=tmp_path / "run", notify=lambda message, always=False: said.append(message))
    assert result.summary["batch_size"] == 256  # 500 rows: at most 256, and 64 MiB holds it
    assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 256
    assert any(m.startswith("batch size auto: 256, the largest power of two") for m in said), said
    again = runlib.run(config, out=tmp_path / "run", notify=lambda *a: None)  # auto again: the run's number
    assert again.summary["batch_size"] == 256 and again.summary["epochs"] == 2


def test_a_resumed_run_takes_the_memory_budget_of_its_machine(tmp_path):
    from jaxnet.app import config as configlib
    from jaxnet.app import run as runlib

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(500, 8)).astype(np.float32), y=rng.integers(0, 3, 500))
    config = configlib.make_config(data=str(tmp_path / "d.npz"), batch_size=64, memory_budget=64 << 20, epochs=1)
    runlib.run(config, out=tmp_path / "run", notify=lambda *a: None)
    with pytest.raises(ValueError, match="over the memory budget of 1.0 KiB: resume it on more devices"):  # taken
        runlib.resume(tmp_path / "run", epochs=2, overrides={"memory_budget": 1000})
    with pytest.raises(ValueError, match="batch_size 32 conflicts with the run's 64"):  # the run's own
        runlib.resume(tmp_path / "run", epochs=2, overrides={"batch_size": 32})
    result = runlib.resume(tmp_path / "run", epochs=2, overrides={"memory_budget": 128 << 20, "peak_tflops": 1.0})
    assert result.summary["epochs"] == 2


@pytest.mark.slow
def test_two_processes_write_their_own_shards_and_one_or_two_processes_read_theirs(tmp_path):
    ckpts = tmp_path / "checkpoints"
    half = run_workers(2, 4, tmp_path / "half.json", ckpts, "save")
    written = {p.name for p in (ckpts / "10" / "state").iterdir()}
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= written, written  # each process wrote its own shards
    resumed = run_workers(1, 8, tmp_path / "resumed.json", ckpts, "resume")
    resumed_in_two = run_workers(2, 4, tmp_path / "resumed2.json", ckpts, "resume")
    whole = run_workers(1, 8, tmp_path / "whole.json")
    # read straight into the shards of the run's fsdp=8 mesh: in two processes, each holds 4 of them
    assert resumed["read"] == {"spec": [None, None, "fsdp"], "whole_here": True, "local_shards": 8, "step": 10}
    assert resumed_in_two["read"] == {"spec": [None, None, "fsdp"], "whole_here": False,
                                      "local_shards": 4, "step": 10}  # fmt: skip
    np.testing.assert_allclose(half["losses"], whole["losses"][:10], rtol=1e-5)
    for run in (resumed, resumed_in_two):
        assert run["losses"][:10] == half["losses"]  # the history came back with the state
        np.testing.assert_allclose(run["losses"][10:], whole["losses"][10:], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_skip_a_checkpoint_whose_shards_are_damaged_and_resume_from_the_one_before(tmp_path):
    ckpts = tmp_path / "checkpoints"
    half = run_workers(2, 4, tmp_path / "half.json", ckpts, "save")
    damaged = sorted(p for p in (ckpts / "10" / "state" / "ocdbt.process_1").rglob("*") if p.is_file())
    assert damaged, list((ckpts / "10" / "state").iterdir())
    for path in damaged:  # the files process 1 wrote for step 10, cut short
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    resumed = run_workers(2, 4, tmp_path / "resumed.json", ckpts, "resume")  # both go back to step 5
    assert resumed["read"]["step"] == 5 and resumed["losses"][:5] == half["losses"][:5]
    whole = run_workers(1, 8, tmp_path / "whole.json")
    np.testing.assert_allclose(resumed["losses"][5:], whole["losses"][5:], rtol=1e-5)


def test_a_read_that_failed_in_another_process_fails_in_this_one(monkeypatch):
    from jaxnet import checkpoint

    def broken():
        raise OSError("a shard file is cut short")

    assert checkpoint._everywhere(lambda: 7, spread=True) == 7  # one process: it alone agrees
    monkeypatch.setattr(checkpoint.parallel, "all_processes", lambda ok: False)  # another process failed
    with pytest.raises(ValueError, match="another process could not read its shards of it"):
        checkpoint._everywhere(lambda: 7, spread=True)
    with pytest.raises(OSError, match="cut short"):  # where it failed: its own error
        checkpoint._everywhere(broken, spread=True)
    assert checkpoint._everywhere(lambda: 7, spread=False) == 7  # whole arrays: each process on its own


@needs_4
def test_the_checksum_of_a_sharded_state_is_that_of_its_host_copy_and_sees_one_changed_bit():
    from jaxnet import checkpoint

    mesh = S.make_mesh(fsdp=4, devices=jax.devices()[:4])
    rng = np.random.default_rng(0)
    host = {"w": rng.normal(size=(64, 6)).astype(np.float32), "key": np.arange(4, dtype=np.uint32),
            "step": np.int32(3), "half": rng.normal(size=(8, 4)).astype(jax.numpy.bfloat16)}  # fmt: skip
    placed = {k: jax.device_put(v, S.shardings(P("fsdp"), mesh) if k == "w" else None) for k, v in host.items()}
    assert len(placed["w"].addressable_shards) == 4
    meta = {"epoch": 1}
    assert checkpoint._sums(placed, meta) == checkpoint._sums(host, meta)
    flipped = host["w"].copy()
    flipped.view(np.uint32)[17, 2] ^= 1  # one bit of one element
    assert checkpoint._sums({**host, "w": flipped}, meta) != checkpoint._sums(host, meta)
    assert checkpoint._sums(host, {"epoch": 2}) != checkpoint._sums(host, meta)
