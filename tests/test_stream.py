"""Streamed data: sources, chunked epochs, positions inside epochs, batched evaluation and prediction."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from stopping import StopAt

import jaxnet as jn
from jaxnet import _feed as feed
from jaxnet import checkpoint, sources
from jaxnet.app import cli, files
from jaxnet.app import config as configlib
from jaxnet.app import data as datalib
from jaxnet.app import run as runlib
from jaxnet.app import saved as savedlib
from jaxnet.callbacks import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
NET = jn.mlp([6, 16, 3])


def problem(n=203, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
    return x, y


def args(**more):
    base = dict(loss="cross_entropy", optimizer=optax.adam(1e-2), epochs=3, batch_size=16, key=jax.random.key(1))
    return {**base, **more}


def leaves_equal(a, b):
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("npy")
    x, y = problem()
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    return d, x, y


@pytest.fixture(scope="module")
def resident(data):
    _, x, y = data
    return jn.fit(NET, NET.init(jax.random.key(0)), x, y, validation=(x[:50], y[:50]), **args())


def test_memory_mapped_grain_and_chunked_epochs_equal_resident_bitwise(data, resident):
    import grain

    d, x, y = data
    p0 = NET.init(jax.random.key(0))
    val = (x[:50], y[:50])
    xm, ym = (np.load(d / f"{k}.npy", mmap_mode="r") for k in ("x", "y"))
    streamed = jn.fit(NET, p0, xm, ym, validation=val, **args())
    small_chunks = jn.fit(NET, p0, xm, ym, validation=val, chunk_steps=4, **args())
    resident_chunks = jn.fit(NET, p0, x, y, validation=val, chunk_steps=5, **args())
    pairs = grain.MapDataset.source([(x[i], y[i]) for i in range(len(x))])
    from_grain = jn.fit(NET, p0, pairs, None, validation=val, **args())
    for run in (streamed, small_chunks, resident_chunks, from_grain):
        assert leaves_equal(run.train.params, resident.train.params)
        assert [r["steps"] for r in run.history] == [13, 13, 13]
        np.testing.assert_allclose(
            [r["val_loss"] for r in run.history], [r["val_loss"] for r in resident.history], rtol=1e-6
        )


def test_iterables_of_batches_train_and_repeat_from_the_seed(data, resident):
    _, x, y = data
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40)]  # 6 blocks, re-cut into 16s
    p0 = NET.init(jax.random.key(0))
    plain = jn.fit(NET, p0, batches, None, **args())
    assert [r["steps"] for r in plain.history] == [13, 13, 13]  # 12 full batches and a padded 11
    # no shuffling: the same batches in the same order as resident data with shuffle=False
    ordered = jn.fit(NET, p0, x, y, shuffle=False, **args())
    np.testing.assert_allclose(
        jax.tree.leaves(plain.train.params)[0], jax.tree.leaves(ordered.train.params)[0], rtol=1e-5, atol=1e-6
    )
    buffered = [jn.fit(NET, p0, batches, None, shuffle_buffer=64, **args()) for _ in range(2)]
    assert leaves_equal(buffered[0].train.params, buffered[1].train.params)  # reproducible from the key
    assert not leaves_equal(buffered[0].train.params, plain.train.params)  # and shuffled
    other_key = jn.fit(NET, p0, batches, None, shuffle_buffer=64, **args(key=jax.random.key(7)))
    assert not leaves_equal(other_key.train.params, buffered[0].train.params)
    assert buffered[0].history[-1]["train_loss"] < buffered[0].history[0]["train_loss"]


def test_grain_iterators_and_loaders_are_sequential_sources(data, resident):
    import grain

    _, x, y = data
    pairs = grain.MapDataset.source([(x[i], y[i]) for i in range(len(x))])
    p0 = NET.init(jax.random.key(0))
    iterated = jn.fit(NET, p0, pairs.batch(16).to_iter_dataset(), None, **args())
    ordered = jn.fit(NET, p0, x, y, shuffle=False, **args())
    assert [r["steps"] for r in iterated.history] == [13, 13, 13]
    np.testing.assert_allclose(
        jax.tree.leaves(iterated.train.params)[0], jax.tree.leaves(ordered.train.params)[0], rtol=1e-5, atol=1e-6
    )
    loader = grain.DataLoader(
        data_source=[(x[i], y[i]) for i in range(len(x))],
        sampler=grain.samplers.IndexSampler(len(x), shuffle=True, seed=0, num_epochs=1),
        operations=[grain.transforms.Batch(32)],
        worker_count=0,
    )
    loaded = jn.fit(NET, p0, loader, None, **args())
    assert loaded.history[-1]["train_loss"] < loaded.history[0]["train_loss"]


def test_shuffle_buffer_emits_every_row_once_in_batches():
    x = np.arange(100, dtype=np.float32)[:, None]
    blocks = iter([(x[i : i + 7], x[i : i + 7, 0]) for i in range(0, 100, 7)])
    out = list(sources.batches_of(blocks, 16, seed=3, shuffle_buffer=30))
    assert [len(b[0]) for b in out] == [16] * 6 + [4]
    seen = np.concatenate([b[0][:, 0] for b in out])
    assert sorted(seen.tolist()) == list(range(100)) and seen.tolist() != list(range(100))
    assert all(np.array_equal(b[0][:, 0], b[1]) for b in out)  # x and y stay paired


def test_gathered_rows_equal_fancy_indexing_and_out_of_range_rows_are_refused(data):
    folder, x, _ = data
    mapped = np.load(folder / "x.npy", mmap_mode="r")
    rows = np.random.default_rng(0).integers(0, len(x), 3000)  # repeats, more than a block
    for array in (x, mapped):
        got = sources.gather(array, rows)
        assert np.array_equal(got, x[rows]) and got.ctypes.data % sources.ALIGNMENT == 0
        assert np.array_equal(sources.gather(array, np.array([-1, -len(x), 3])), x[[-1, -len(x), 3]])  # as numpy
        for bad in ([0, len(x)], [-len(x) - 1, 0]):
            with pytest.raises(sources.DataError, match=r"data: reading 2 rows failed \(IndexError: rows .* outside"):
                sources.Indexed(array, array).read(np.array(bad))


def test_bad_sources_fail_with_one_line_naming_the_batch(data):
    _, x, y = data
    p0 = NET.init(jax.random.key(0))
    ragged = [(x[:16], y[:16]), (x[16:32, :5], y[16:32])]
    with pytest.raises(jn.DataError, match=r"batch 1 of x .* has x rows \(5,\) float32 .* first had \(6,\)"):
        jn.fit(NET, p0, ragged, None, **args())
    wrong_dtype = [(x[:16], y[:16]), (x[16:32].astype(np.float64), y[16:32])]
    with pytest.raises(jn.DataError, match=r"batch 1 .* float64 .* same row shapes and dtypes"):
        jn.fit(NET, p0, wrong_dtype, None, **args())
    with pytest.raises(jn.DataError, match="iterator, which can be read only once"):
        jn.fit(NET, p0, iter(ragged), None, **args())

    class Broken:
        def __iter__(self):
            yield x[:16], y[:16]
            raise OSError("disk gone")

    with pytest.raises(jn.DataError, match=r"reading batch 1 of x .* failed \(OSError: disk gone\)"):
        jn.fit(NET, p0, Broken(), None, **args())
    with pytest.raises(jn.DataError, match="yielded no batches"):
        jn.fit(NET, p0, [], None, **args())
    with pytest.raises(jn.DataError, match=r"batch 0 .* is a ndarray, not a pair"):
        jn.fit(NET, p0, [x[:16]], None, **args())
    with pytest.raises(ValueError, match="x: each member of a member run reads the data in its own order"):
        keys = jn.member_keys([0, 1])
        jn.fit(NET, jn.init_members(NET, keys), [(x, y)], None, **args(key=keys))


def test_evaluate_and_predict_take_what_fit_takes_and_check_it_alike(tmp_path):
    x, y = problem(300)
    p0 = NET.init(jax.random.key(0))
    want = jn.evaluate(NET, p0, x, y, loss="cross_entropy", batch_size=64)
    outputs = jn.predict(NET, p0, x, batch_size=64)
    pairs = [(x[i : i + 70], y[i : i + 70]) for i in range(0, 300, 70)]
    dicts = [{"x": a, "y": b} for a, b in pairs]
    for given in (pairs, dicts, iter(pairs), (pair for pair in pairs)):  # one pass: iterators too
        got = jn.evaluate(NET, p0, given, loss="cross_entropy", batch_size=64)
        assert got["accuracy"] == want["accuracy"] and abs(got["loss"] - want["loss"]) < 1e-6
    for given in (pairs, dicts, iter(dicts), [a for a, _ in pairs], [(a,) for a, _ in pairs], [[a] for a, _ in pairs]):
        np.testing.assert_allclose(jn.predict(NET, p0, given, batch_size=64), outputs, rtol=1e-6, atol=1e-6)
    shapes = [(x[:70], y[:70]), (x[70:140, :5], y[70:140])]
    dtypes = [(x[:70], y[:70]), (x[70:140].astype(np.float64), y[70:140])]

    class Broken:
        def __iter__(self):
            yield x[:70], y[:70]
            raise OSError("disk gone")

    for call in (
        lambda d: jn.predict(NET, p0, d, batch_size=64),
        lambda d: jn.evaluate(NET, p0, d, loss="cross_entropy", batch_size=64),
    ):
        for bad, message in (
            (shapes, r"batch 1 of x .* has .*rows \(5,\) float32.* but the first had \(6,\)"),
            (dtypes, r"batch 1 of x .* has .*rows \(6,\) float64.* but the first had \(6,\) float32"),
            (Broken(), r"reading batch 1 of x .* failed \(OSError: disk gone\)"),
        ):
            with pytest.raises(jn.DataError, match=message):
                call(bad)
    with pytest.raises(ValueError, match="x has no examples: give at least one"):
        jn.evaluate(NET, p0, x[:0], y[:0], loss="cross_entropy")
    with pytest.raises(ValueError, match="x has 300 examples but y has 200"):
        jn.evaluate(NET, p0, x, y[:200], loss="cross_entropy")
    for call in (
        lambda: jn.fit(NET, p0, pairs, y, **args()),
        lambda: jn.evaluate(NET, p0, pairs, y, loss="cross_entropy"),
    ):
        with pytest.raises(TypeError, match=r"x is a list of \(x, y\) batches, which hold their targets: pass y=None"):
            call()


def test_batched_grain_maps_and_parquet_without_targets_are_refused_for_training(tmp_path):
    grain = pytest.importorskip("grain")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    x, y = problem(300)
    p0 = NET.init(jax.random.key(0))
    batched = grain.MapDataset.source(list(zip(x, y))).batch(50).map(lambda e: e)
    with pytest.raises(jn.DataError, match=r"x is a batched Grain MapDataset \(.batch\): give the dataset of examples"):
        jn.fit(NET, p0, batched, None, **args())
    pq.write_table(pa.table({**{f"f{j}": x[:, j] for j in range(6)}, "label": y}), tmp_path / "t.parquet")
    features = jn.Parquet(tmp_path / "t.parquet", target=None, features=[f"f{j}" for j in range(6)])
    np.testing.assert_allclose(jn.predict(NET, p0, features), jn.predict(NET, p0, x), rtol=1e-6, atol=1e-6)
    refused = "x: t.parquet was opened without a target column: name it"
    with pytest.raises(jn.DataError, match=refused):
        jn.fit(NET, p0, features, None, **args())
    with pytest.raises(jn.DataError, match=refused):
        jn.evaluate(NET, p0, features, loss="cross_entropy")


@pytest.mark.parametrize("kind", ["memmap", "iterable", "resident"])
def test_a_checkpoint_inside_an_epoch_resumes_bitwise(data, tmp_path, kind):
    d, x, y = data
    if kind == "memmap":
        train, more = tuple(np.load(d / f"{k}.npy", mmap_mode="r") for k in ("x", "y")), dict(chunk_steps=4)
    elif kind == "iterable":
        train, more = (
            ([(x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40)], None),
            dict(chunk_steps=4, shuffle_buffer=50),
        )
    else:
        train, more = (x, y), dict(chunk_steps=4)
    p0 = NET.init(jax.random.key(0))
    common = args(validation=(x[:50], y[:50]), **more)
    straight = jn.fit(NET, p0, *train, **common)
    saver = Checkpointer(tmp_path / "ckpt", every_steps=8)
    stopped = jn.fit(NET, p0, *train, callbacks=[saver, StopAt(18)], **common)
    # 13 steps an epoch in chunks of 4 (4, 8, 12, 13): saved after 8 steps, at 17 (4 into epoch 2), and
    # at the stop after 21 (8 into epoch 2)
    assert stopped.position is not None and stopped.epoch == 1 and stopped.steps == 21
    entries = checkpoint.entries(tmp_path / "ckpt")
    assert [(e.steps, e.epoch, e.inside) for e in entries] == [(8, 0, 8), (17, 1, 4), (21, 1, 8)]
    like = jax.eval_shape(lambda: jn.init_fit_state(p0, common["optimizer"], common["key"]))
    restored = checkpoint.restore(tmp_path / "ckpt", like).state
    assert restored.position.steps == 8 and restored.position.examples == 8 * 16
    resumed = jn.fit(NET, None, *train, resume=restored, **common)
    assert leaves_equal(resumed.train.params, straight.train.params)

    def timeless(history):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in history]

    assert timeless(resumed.history) == timeless(straight.history)


def test_member_runs_stream_and_chunk_each_member_in_its_own_order_and_resume_inside_an_epoch(data, tmp_path):
    d, x, y = data
    keys = jn.member_keys([0, 1, 2])
    p0 = jn.init_members(NET, keys)
    mapped = tuple(np.load(d / f"{k}.npy", mmap_mode="r") for k in ("x", "y"))
    common = args(key=keys, validation=jn.Indexed(x[:50], y[:50]), chunk_steps=4, patience=2)
    resident = jn.fit(NET, p0, x, y, **{**common, "validation": (x[:50], y[:50]), "chunk_steps": None})
    streamed = jn.fit(NET, p0, *mapped, **common)
    # the same batches in each member's own order as resident arrays: bitwise, records and all
    assert leaves_equal(streamed.train.params, resident.train.params)
    assert [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in streamed.history] == [
        {k: v for k, v in r.items() if not k.endswith("seconds")} for r in resident.history
    ]
    chunked = jn.fit(NET, p0, x, y, **{**common, "validation": (x[:50], y[:50])})
    assert leaves_equal(chunked.train.params, resident.train.params)
    weights = np.linspace(0.5, 2.0, len(x)).astype(np.float32)
    weighed = [
        jn.fit(NET, p0, x, y, sample_weight=weights, **{**common, "validation": (x[:50], y[:50]), "chunk_steps": c})
        for c in (None, 5)
    ]
    assert leaves_equal(weighed[0].train.params, weighed[1].train.params)
    # the epoch's weight total: summed on the device in float32, or on the host in float64
    np.testing.assert_allclose(weighed[0].history[-1]["train_loss"], weighed[1].history[-1]["train_loss"], rtol=1e-6)
    alone = jn.fit(NET, jax.tree.map(lambda a: a[1], p0), *mapped, **{**common, "key": keys[1]})
    for a, b in zip(jax.tree.leaves(alone.train.params), jax.tree.leaves(streamed.train.params)):
        np.testing.assert_allclose(np.asarray(b)[1], a, rtol=1e-5, atol=1e-6)  # vmapped: rounding only
    saver = Checkpointer(tmp_path / "ckpt", every_steps=8)
    stopped = jn.fit(NET, p0, *mapped, callbacks=[saver, StopAt(18)], **common)
    assert stopped.position is not None and stopped.position.total.shape == (3,)
    like = jax.eval_shape(lambda: jn.init_fit_state(p0, common["optimizer"], keys))
    restored = checkpoint.restore(tmp_path / "ckpt", like).state
    assert restored.position.steps == 8 and restored.position.shuffle_key.shape == (3,)
    resumed = jn.fit(NET, None, *mapped, resume=restored, **common)
    assert leaves_equal(resumed.train.params, streamed.train.params)
    with pytest.raises(ValueError, match="x: each member of a member run reads the data in its own order"):
        jn.fit(NET, p0, [(x[:40], y[:40])], None, **common)


def test_resuming_inside_an_epoch_needs_its_chunks_and_its_order(data, tmp_path):
    _, x, y = data
    p0 = NET.init(jax.random.key(0))
    stopped = jn.fit(NET, p0, x, y, chunk_steps=4, callbacks=[StopAt(5)], **args())
    with pytest.raises(ValueError, match="inside an epoch, which resumes only in chunks: give chunk_steps"):
        jn.fit(NET, None, x, y, resume=stopped, **args())
    # another batch size or shuffle would read the epoch's rows from elsewhere: some twice, some never
    checkpoint.save(tmp_path, stopped)
    like = jax.eval_shape(lambda: jn.init_fit_state(p0, args()["optimizer"], jax.random.key(1)))
    restored = checkpoint.restore(tmp_path, like).state
    assert restored.position.order == stopped.position.order == (16, True, False, 0)
    for state in (stopped, restored):
        with pytest.raises(ValueError, match="read with batch_size 16, which this fit gives as batch_size 8: give"):
            jn.fit(NET, None, x, y, chunk_steps=4, resume=state, **args(batch_size=8))
        with pytest.raises(ValueError, match="read with shuffle True, which this fit gives as shuffle False"):
            jn.fit(NET, None, x, y, chunk_steps=4, resume=state, shuffle=False, **args())
    both = "read with batch_size 16, shuffle True and drop_remainder False, which this fit gives as batch_size 8, "
    with pytest.raises(ValueError, match=both + "shuffle False and drop_remainder True: give batch_size 16, shuffle"):
        jn.fit(NET, None, x, y, chunk_steps=4, resume=stopped, shuffle=False, drop_remainder=True, **args(batch_size=8))
    straight = jn.fit(NET, p0, x, y, chunk_steps=4, **args())
    resumed = jn.fit(NET, None, x, y, chunk_steps=4, resume=restored, **args())
    assert leaves_equal(resumed.train.params, straight.train.params)
    # a state at an epoch's end resumes with any order
    ended = jn.fit(NET, p0, x, y, **args(epochs=1))
    assert ended.position is None and jn.fit(NET, None, x, y, resume=ended, **args(batch_size=8)).epoch == 3
    # NumPy scalars are recorded as plain values (a checkpoint's JSON takes them)
    numpy = jn.fit(NET, p0, x, y, chunk_steps=4, callbacks=[StopAt(5)], shuffle=np.bool_(True),
                   **args(batch_size=np.int64(16)))  # fmt: skip
    checkpoint.save(tmp_path / "numpy", numpy)
    assert checkpoint.restore(tmp_path / "numpy", like).state.position.order == (16, True, False, 0)


def test_batched_evaluate_and_predict_match_one_batch(data):
    d, x, y = data
    params = NET.init(jax.random.key(0))
    full = jax.device_get(jn.make_eval_fn(NET, "cross_entropy")(params, (x, y)))
    outputs = jn.batched(NET)(params, x)
    xm, ym = (np.load(d / f"{k}.npy", mmap_mode="r") for k in ("x", "y"))
    batches = [(x[i : i + 33], y[i : i + 33]) for i in range(0, len(x), 33)]
    for got in (
        jn.evaluate(NET, params, x, y, loss="cross_entropy", batch_size=16),
        jn.evaluate(NET, params, xm, ym, loss="cross_entropy", batch_size=50),
        jn.evaluate(NET, params, batches, loss="cross_entropy", batch_size=7),
    ):
        assert got.keys() == {"loss", "accuracy"}
        np.testing.assert_allclose(got["loss"], float(full["loss"]), rtol=1e-5)
        np.testing.assert_allclose(got["accuracy"], float(full["accuracy"]), rtol=1e-6)
    for got in (
        jn.predict(NET, params, x, batch_size=16),
        jn.predict(NET, params, xm, batch_size=1000),
        jn.predict(NET, params, batches, batch_size=10),
    ):
        np.testing.assert_allclose(got, outputs, rtol=1e-5, atol=1e-6)
    assert [len(b) for b in jn.predict_batches(NET, params, x, batch_size=100)] == [100, 100, 3]
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        jn.predict(NET, params, x, batch_size=0)


@pytest.mark.slow
def test_stateful_model_streams_and_evaluates(data):
    d, x, y = data
    net = jn.serial(jn.dense(6, 16), jn.batch_norm(16), jn.activation_layer("relu"), jn.dense(16, 3))
    params, state = net.init(jax.random.key(0))
    xm, ym = (np.load(d / f"{k}.npy", mmap_mode="r") for k in ("x", "y"))
    a = jn.fit(net, params, x, y, model_state=state, **args())
    b = jn.fit(net, params, xm, ym, model_state=state, **args())
    assert leaves_equal((a.train.params, a.train.model_state), (b.train.params, b.train.model_state))
    got = jn.evaluate(net, b.params, xm, ym, loss="cross_entropy", model_state=b.model_state, batch_size=64)
    assert got["accuracy"] > 0.6


def test_parquet_row_groups_stream_in_a_keyed_order(tmp_path, resident):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    x, y = problem()
    table = pa.table({**{f"f{j}": x[:, j] for j in range(6)}, "label": y})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=50)
    source = jn.Parquet(tmp_path / "t.parquet", target="label", y_dtype=np.int32)
    assert source.num_groups == 5 and source.num_rows == len(x)
    orders = [np.concatenate([b[1] for b in source.blocks(seed)]) for seed in (1, 1, 2)]
    assert np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])
    assert sorted(orders[0].tolist()) == sorted(y.tolist())
    p0 = NET.init(jax.random.key(0))
    fitted = jn.fit(NET, p0, source, None, validation=(x[:50], y[:50]), **args())
    assert fitted.history[-1]["val_accuracy"] > 0.7
    # jaxnet train reads a Parquet file by row group (into memory), its columns by name
    code = cli.main(["train", "--data", str(tmp_path / "t.parquet"), "--target", "label", "--epochs", "2", "--quiet"])
    assert code == 0
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(jn.DataError, match="bad.parquet is not a readable Parquet file"):
        jn.Parquet(tmp_path / "bad.parquet", target="label")
    with pytest.raises(jn.DataError, match="has no column 'price'"):
        jn.Parquet(tmp_path / "t.parquet", target="price")
    assert jn.Parquet(tmp_path / "t.parquet", target="label").y_dtype == np.int32  # the column's: integer labels
    holed = x.copy()
    holed[7, 2] = np.nan  # a NaN, not a gap: it gave a non-finite loss that blamed the learning rate
    pq.write_table(pa.table({"f0": x[:, 0], "label": (y * 0.5).astype(np.float64)}), tmp_path / "halves.parquet")
    pq.write_table(pa.table({**{f"f{j}": holed[:, j] for j in range(6)}, "label": y}), tmp_path / "nan.parquet")
    halved = jn.Parquet(tmp_path / "halves.parquet", target="label", y_dtype=np.int32)
    with pytest.raises(jn.DataError, match=r"column 'label' holds 0.5 at row \d+ of the group, which an int32 label"):
        list(halved.blocks(0, shuffle=False))  # 0.5 was truncated to class 0, silently
    assert jn.Parquet(tmp_path / "halves.parquet", target="label").y_dtype == np.float32
    with pytest.raises(jn.DataError, match="row group 0 of nan.parquet: column 'f2' holds nan at row 7 of the group"):
        jn.fit(NET, p0, jn.Parquet(tmp_path / "nan.parquet", target="label"), None, **args(epochs=1))


def test_cli_sweeps_stream_a_folder_of_npy_and_refuse_step_logs(data, tmp_path, capsys):
    d, _, _ = data
    out = tmp_path / "sweep"
    flags = ["--data", str(d), "--epochs", "2", "--hidden", "8", "--lr", "0.01,0.001", "--json"]
    assert cli.main(["train", *flags, "--out", str(out), "--checkpoint-steps", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [m["learning_rate"] for m in summary["members"]] == [0.01, 0.001]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["member"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert cli.main(["train", *flags, "--out", str(tmp_path / "logged"), "--log", "csv", "--log-every-steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "jaxnet: error: member runs (--seeds, --ensemble, lists of --lr or --weight-decay) do not log steps: "
        "drop --log-every-steps"
    )
    assert not (tmp_path / "logged").exists()


@pytest.mark.slow
def test_cli_trains_on_a_folder_of_npy_and_predicts_from_stdin(data, tmp_path, capsys):
    d, x, y = data
    out = tmp_path / "run"
    flags = ["--epochs", "30", "--hidden", "8", "--lr", "0.01", "--json"]
    assert cli.main(["train", "--data", str(d), *flags, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "classification" and summary["test_accuracy"] > 0.65
    np.savez(tmp_path / "same.npz", x=x, y=y)  # the same rows in memory: the same run
    assert cli.main(["train", "--data", str(tmp_path / "same.npz"), *flags]) == 0
    in_memory = json.loads(capsys.readouterr().out)
    for name in ("train_loss", "val_loss", "test_accuracy"):
        np.testing.assert_allclose(summary[name], in_memory[name], rtol=1e-5)
    # the same rows as CSV on standard input, and as the folder itself: the same predictions
    csv_text = ",".join(f"x{j}" for j in range(6)) + "\n" + "\n".join(",".join(map(repr, map(float, r))) for r in x)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxnet.app", "predict", "--model", str(out), "--data", "-", "--probabilities"],
        input=csv_text,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    from_stdin = np.array([line.split(",") for line in proc.stdout.strip().splitlines()[1:]], float)
    assert from_stdin.shape == (len(x), 4)
    model = files.load_model(out)
    direct = savedlib.predict_saved(model, datalib.standardize(x, datalib.Standardizer(model.mean, model.std)))
    np.testing.assert_allclose(from_stdin[:, 1:], direct, atol=2e-6)
    assert cli.main(["evaluate", "--model", str(out), "--data", str(d), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    whole = savedlib.evaluate_saved(model, datalib.standardize(x, datalib.Standardizer(model.mean, model.std)), y)
    assert metrics.keys() == whole.keys()
    np.testing.assert_allclose([metrics[k] for k in whole], list(whole.values()), rtol=1e-5)


def test_streamed_evaluate_in_chunks_equals_whole_for_regression(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 100.0 + rng.normal(size=300)).astype(np.float32)
    np.savez(tmp_path / "r.npz", x=x, y=y)
    run = runlib.run(configlib.make_config(data=str(tmp_path / "r.npz"), epochs=3, hidden=(8,)), out=tmp_path / "m")
    model = run.model
    standardized = datalib.standardize(x, datalib.Standardizer(model.mean, model.std))
    whole = savedlib.evaluate_saved(model, standardized, y)
    chunks = datalib.feature_chunks(tmp_path / "r.npz", model.meta["feature_names"], rows=37)
    streamed, rows = savedlib.evaluate_chunks(model, chunks)
    assert rows == 300 and streamed.keys() == whole.keys() == {"loss", "mse", "mae", "r2"}
    np.testing.assert_allclose([streamed[k] for k in whole], list(whole.values()), rtol=1e-5)


def test_cli_bad_stream_inputs_are_one_line(data, tmp_path, capsys):
    d, _, _ = data
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(d), "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "trunc"
    truncated.mkdir()
    np.save(truncated / "x.npy", np.zeros((1000, 6), np.float32))
    with open(truncated / "x.npy", "r+b") as f:
        f.truncate(5000)  # the header says 24,000 bytes of data
    np.save(truncated / "y.npy", np.zeros(1000, np.int32))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    np.save(inputs / "x.npy", np.zeros((10, 6), np.float32))
    cells = np.arange(6 * 300, dtype=np.float32).reshape(300, 6).astype(str)
    cells[250, 2] = "abc"  # data row 251 of a CSV in the model's columns, read in chunks
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([",".join(f"x{j}" for j in range(6)), *(",".join(r) for r in cells)]) + "\n")
    for argv, pattern in (
        (["train", "--data", str(empty)], "has no x.npy"),
        (["train", "--data", str(truncated)], r"x.npy is truncated: 5000 bytes where its header describes 24128"),
        (["predict", "--model", str(out), "--data", str(tmp_path / "nope.parquet")], "data file not found: .*nope"),
        (["evaluate", "--model", str(out), "--data", str(inputs)], "inputs has no y.npy: put the targets beside x.npy"),
        (["predict", "--model", str(out), "--data", str(bad)], r"bad.csv: row 251, column 'x2': 'abc' is not a number"),
    ):
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("jaxnet: error: "), (argv, err)
        assert __import__("re").search(pattern, err), err


KILLER = """
import os, signal, sys
from jaxnet import checkpoint
from jaxnet.app import config, run
out, data, every = sys.argv[1], sys.argv[2], int(sys.argv[3])

class KillInsideAnEpoch:
    def __call__(self, state, record):
        return False

    def on_chunk(self, state):
        inside = [e for e in checkpoint.entries(out + "/checkpoints") if e.inside is not None]
        if inside and state.steps > inside[-1].steps:
            os.kill(os.getpid(), signal.SIGKILL)

c = config.make_config(data=data, epochs=3, hidden=(16,), batch_size=8)
run.run(c, out=out, checkpoint_steps=every, callbacks=[KillInsideAnEpoch()])
"""


@pytest.mark.slow
def test_kill_9_inside_an_epoch_then_resume_equals_the_straight_run(data, tmp_path):
    d, _, _ = data
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code = [sys.executable, "-c", KILLER, str(killed), str(d), "6"]
    proc = subprocess.run(code, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    entries = checkpoint.entries(killed / "checkpoints")
    assert entries and entries[-1].inside is not None, entries  # killed after a checkpoint inside an epoch
    assert not (killed / "model.npz").exists()
    cmd = [sys.executable, "-m", "jaxnet.app", "train"]
    resumed = subprocess.run([*cmd, "--resume", str(killed), "--quiet"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"inside epoch {entries[-1].epoch + 1}" in resumed.stderr
    flags = ["--data", str(d), "--epochs", "3", "--hidden", "16", "--batch-size", "8", "--checkpoint-steps", "6"]
    ran = subprocess.run([*cmd, *flags, "--out", str(straight), "--quiet"], capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr
    a, b = files.load_model(straight), files.load_model(killed)
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert a.params[k].tobytes() == b.params[k].tobytes(), k

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["train_loss"], r["val_loss"]) for r in rows]

    assert losses(straight) == losses(killed)


def test_feed_prefetch_raises_producer_errors_and_stops_cleanly():
    def chunks():
        yield feed.Chunk((np.zeros(1),), 1, False, 1)
        raise sources.DataError("row group 3 of t.parquet cannot be read")

    stream = feed.prefetched(chunks(), lambda a: a)
    assert next(stream).steps == 1
    with pytest.raises(sources.DataError, match="row group 3"):
        next(stream)
    endless = feed.prefetched((feed.Chunk((np.zeros(1),), 1, False, 1) for _ in iter(int, 1)), lambda a: a)
    next(endless)
    endless.close()  # the producer thread stops; nothing hangs


def test_chunk_steps_follow_the_memory_budget():
    spec = sources.RowSpec((784,), np.dtype(np.float32), (), np.dtype(np.int32))
    assert feed.chunk_steps(spec, 128, budget=32 * 2**20) == 32 * 2**20 // (128 * (784 * 4 + 4 + 4))
    assert feed.chunk_steps(spec, 128, budget=1) == 1
    assert feed.chunk_steps(spec, 128, most=10) == 10


def test_lazy_rows_split_and_standardize_without_reading_everything(data):
    d, x, _ = data
    xm = np.load(d / "x.npy", mmap_mode="r")
    view = sources.RowView(xm, np.array([5, 1, 7]))
    np.testing.assert_array_equal(view[np.array([2, 0])], x[[7, 5]])
    s = datalib.fit_standardizer(sources.RowView(xm))
    exact = datalib.fit_standardizer(x)
    np.testing.assert_allclose(s.mean, exact.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.std, exact.std, rtol=1e-6)
    lazy = datalib.standardize(sources.RowView(xm), s)
    assert isinstance(lazy, sources.RowView) and lazy.dtype == np.float32
    np.testing.assert_allclose(lazy[np.arange(3)], datalib.standardize(x[:3], s), rtol=1e-6)
    assert jnp.asarray(lazy[np.arange(2)]).shape == (2, 6)


def test_npy_files_read_rows_with_pread_and_refuse_hostile_headers(tmp_path):
    x = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    np.save(tmp_path / "x.npy", x)
    f = jn.NpyFile(tmp_path / "x.npy")
    assert f.shape == (5, 2, 3) and f.dtype == np.float32 and len(f) == 5
    rows = np.array([4, 0, 1, 2, 4])
    np.testing.assert_array_equal(f[rows], x[rows])  # runs of consecutive rows, repeats, any order
    np.testing.assert_array_equal(f[1:4], x[1:4])
    np.testing.assert_array_equal(f.reshape(5, -1)[np.array([3])], x.reshape(5, -1)[[3]])
    with pytest.raises(IndexError, match="out of range"):
        f[np.array([5])]
    # a header that claims 10^12 rows: refused from the file size, nothing allocated
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 784)}
    with open(tmp_path / "huge.npy", "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        out.write(b"\0" * 64)
    with pytest.raises(jn.DataError, match=r"huge.npy is truncated: \d+ bytes where its header describes"):
        jn.NpyFile(tmp_path / "huge.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(jn.DataError, match="not a readable .npy|Python objects"):
        jn.NpyFile(tmp_path / "objects.npy")
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.ones((3, 4), np.float32)))
    with pytest.raises(jn.DataError, match="Fortran order"):
        jn.NpyFile(tmp_path / "fortran.npy")


@pytest.mark.slow
def test_an_epoch_on_a_3_gb_npy_folder_stays_under_1_5_gib(tmp_path):
    """The issue's figure: bench/stream_memory.py writes a 3.1 GB x.npy, trains one epoch on it with
    jaxnet train --data DIR in a child process, reports the child's peak resident memory, deletes it."""
    report = tmp_path / "memory.json"
    script = ROOT / "bench" / "stream_memory.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--dir", str(tmp_path), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["x_bytes"] >= 3e9 and result["peak_rss_bytes"] < 1.5 * 2**30, result
    assert result["summary"]["test_accuracy"] > 0.8  # 10 teacher classes: it learned
    assert not any(p.name.startswith("jaxnet-stream-") for p in tmp_path.iterdir())  # the data is gone


def test_review_findings_stay_fixed(data, tmp_path):
    d, x, y = data
    p0 = NET.init(jax.random.key(0))
    # no checkpoint inside an epoch once its loss went non-finite: the newest stays a good one
    bad = x.copy()
    bad[150] = np.nan
    saver = Checkpointer(tmp_path / "nan", every_steps=2, keep=3)
    with pytest.raises(jn.NonFiniteLossError):
        jn.fit(NET, p0, bad, y, shuffle=False, chunk_steps=2, callbacks=[saver], **args(epochs=1))
    for entry in checkpoint.entries(tmp_path / "nan"):
        like = jax.eval_shape(lambda: jn.init_fit_state(p0, optax.adam(1e-2), jax.random.key(1)))
        state = checkpoint.restore(tmp_path / "nan", like, step=entry.steps).state
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.train.params))
    # a state stopped inside an epoch resumes twice (the caller's arrays are not donated)
    stopped = jn.fit(NET, p0, x, y, chunk_steps=4, callbacks=[StopAt(5)], **args())
    once, twice = (jn.fit(NET, None, x, y, chunk_steps=4, resume=stopped, **args()) for _ in range(2))
    assert leaves_equal(once.train.params, twice.train.params)
    # lists of numbers are arrays; a shuffle buffer below a batch is refused by name
    jn.fit(NET, p0, x.tolist(), y.tolist(), **args(epochs=1))
    with pytest.raises(ValueError, match="shuffle_buffer 8 is smaller than batch_size 16"):
        jn.fit(NET, p0, [(x, y)], None, shuffle_buffer=8, **args())
    # too few rows for one batch with drop_remainder: an error, not epochs of nothing
    with pytest.raises(jn.DataError, match="fewer than one batch of 16, and drop_remainder"):
        jn.fit(NET, p0, [(x[:10], y[:10])], None, drop_remainder=True, **args())

    class Failing:
        def __len__(self):
            return 5

        def __getitem__(self, rows):
            raise RuntimeError("backend down")

        shape, dtype = (5, 6), np.dtype(np.float32)

    with pytest.raises(jn.DataError, match=r"reading 4 rows failed \(RuntimeError: backend down\)"):
        jn.Indexed(Failing(), np.zeros(5)).read(np.arange(4))
    # predictions keep the data's order, from iterables of plain arrays too
    params = NET.init(jax.random.key(0))
    outputs = jn.predict(NET, params, x)
    np.testing.assert_allclose(jn.predict(NET, params, [x[:50], x[50:]], batch_size=32), outputs, rtol=1e-5, atol=1e-6)
    # a copy-on-write memory map keeps its private edits
    cow = np.load(d / "x.npy", mmap_mode="c")
    cow[:] = 7.0
    jn.Indexed(np.asarray(cow), y).read(np.arange(3))
    assert float(cow[-1, 0]) == 7.0
    # an NpyFile can be copied and dropped without touching the original
    import copy

    f = jn.NpyFile(d / "x.npy")
    g = copy.copy(f)
    del g
    np.testing.assert_array_equal(f[np.array([2, 1])], x[[2, 1]])


def test_parquet_predictions_come_in_file_order_and_folders_predict_without_y(tmp_path, data, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    d, x, y = data
    pq.write_table(pa.table({f"f{j}": x[:, j] for j in range(6)}), tmp_path / "nolabel.parquet", row_group_size=40)
    params = NET.init(jax.random.key(0))
    source = jn.Parquet(tmp_path / "nolabel.parquet", target="label", optional_target=True)
    np.testing.assert_allclose(jn.predict(NET, params, source), jn.predict(NET, params, x), rtol=1e-5, atol=1e-6)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(d), "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    only_x = tmp_path / "onlyx"
    only_x.mkdir()
    np.save(only_x / "x.npy", x)
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(out), "--data", str(only_x)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(x) + 1


def test_streamed_ids_outside_the_classes_or_the_vocabulary_are_named_not_a_nan_loss(data, tmp_path):
    """Resident ids are checked whole before training; streamed ones chunk by chunk, as read."""
    _, x, y = data
    p0 = NET.init(jax.random.key(0))
    bad = y.copy()
    bad[40] = 3  # the model has 3 classes
    batches = [(x[i : i + 16], bad[i : i + 16]) for i in range(0, 64, 16)]
    with pytest.raises(ValueError, match=r"^a streamed chunk of y holds the label 3 at row 40, outside the model's 3"):
        jn.fit(NET, p0, batches, None, **args(epochs=1))
    np.save(tmp_path / "y.npy", bad)
    mapped = np.load(tmp_path / "y.npy", mmap_mode="r")
    with pytest.raises(ValueError, match="a streamed chunk of y holds the label 3 at row"):
        jn.fit(NET, p0, np.load(data[0] / "x.npy", mmap_mode="r"), mapped, **args(epochs=1, shuffle=False))
    with pytest.raises(ValueError, match="^a streamed chunk of validation's y holds the label 3"):
        jn.fit(NET, p0, x, y, validation=batches, **args(epochs=1))
    with pytest.raises(ValueError, match="^a streamed chunk of y holds the label 3 at row"):  # evaluate alike
        jn.evaluate(NET, p0, batches, loss="cross_entropy")
    V, C = 11, 8
    gpt = jn.gpt(V, context=C, layers=1, heads=2, dim=16)
    params, state = gpt.init(jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, V, (32, C)).astype(np.int32)
    outside = ids.copy()
    outside[20, 3] = V
    stream = [(outside[i : i + 8], ids[i : i + 8]) for i in range(0, 32, 8)]
    with pytest.raises(ValueError, match=f"^a streamed chunk of x holds the id {V} at row 20, position 3, outside the"):
        jn.fit(
            gpt, params, stream, None, model_state=state, **args(epochs=1, loss="softmax_cross_entropy", batch_size=8)
        )
    good = [(ids[i : i + 8], ids[i : i + 8]) for i in range(0, 32, 8)]  # and a good stream trains
    fitted = jn.fit(
        gpt, params, good, None, model_state=state, **args(epochs=1, loss="softmax_cross_entropy", batch_size=8)
    )
    assert np.isfinite(fitted.history[-1]["train_loss"])
