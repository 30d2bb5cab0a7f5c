"""Starting from trained weights (load_params, --init-from) and low-rank adapters (jn.lora)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from incli import run_cli

import jaxnet as jn
from jaxnet import lowrank

ROOT = Path(__file__).resolve().parents[1]
NET = jn.mlp([4, 16, 2])


jaxnet = run_cli


def test_weights_load_by_path_with_renames_and_mismatches_are_listed_together():
    params = NET.init(jax.random.key(0))
    source = {"layer0/w": np.ones((4, 16)), "layer0/b": np.ones(16), "1/w": np.ones((3, 2)), "extra": np.ones(1)}
    expected = (r"do not fit the model \(7\): 0/b is missing; 0/w is missing; 1/b is missing; 1/w is \[3, 2\], "
                r"expected \[16, 2\]; extra is unexpected; layer0/b is unexpected; layer0/w is unexpected")  # fmt: skip
    with pytest.raises(ValueError, match=expected):
        jn.load_params(source, params)
    loaded = jn.load_params(source, params, rename={"^layer0/": "0/"}, partial=True)
    np.testing.assert_array_equal(loaded.params[0]["w"], np.ones((4, 16), np.float32))
    assert loaded.params[0]["w"].dtype == np.float32  # cast to the template's dtype
    np.testing.assert_array_equal(loaded.params[1]["w"], params[1]["w"])  # fresh: the template's own
    assert loaded.loaded == ["0/b", "0/w"] and loaded.fresh == ["1/b", "1/w"] and loaded.unused == ["1/w", "extra"]
    with pytest.raises(ValueError, match=r"rename '\^nothing' matches no name of the source; it has: layer0/w"):
        jn.load_params(source, params, rename={"^nothing": "x"})
    both = {"enc/1/w": np.ones((16, 2)), "1/w": np.zeros((16, 2))}  # one would be dropped, silently
    with pytest.raises(ValueError, match=r"rename gives 'enc/1/w' and '1/w' one name, '1/w': rename them apart"):
        jn.load_params(both, params, rename={"^enc/": ""}, partial=True)
    with pytest.raises(TypeError, match=r"rename must be a mapping \{regex: replacement\}, got str"):
        jn.load_params(source, params, rename="^layer0/=0/")
    with pytest.raises(TypeError, match="template must be the params to fill"):
        jn.load_params(source, None)
    with pytest.raises(TypeError, match=r"source must be a path or a \{name: array\} dict, got int"):
        jn.load_params(5, params)
    with pytest.raises(TypeError, match="merge takes the params of a jaxnet.lora model"):
        lowrank.merge(params, 1.0)


def test_weights_load_from_safetensors_and_a_non_weights_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    params = NET.init(jax.random.key(0))
    arrays = {f"params/{i}/{k}": np.asarray(params[i][k]) for i in (0, 1) for k in ("w", "b")}
    save_file(arrays, str(tmp_path / "w.safetensors"))
    loaded = jn.load_params(tmp_path / "w.safetensors", jax.eval_shape(lambda: params))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        jn.load_params(tmp_path / "bad.safetensors", params)
    with pytest.raises(ValueError, match="is not a jaxnet run"):
        jn.load_params(tmp_path, params)


def test_lora_starts_as_its_base_trains_only_its_adapters_and_merges():
    base = jn.mlp([4, 16, 16, 2])
    net = jn.lora(base, rank=2, alpha=4.0)
    params = net.init(jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    np.testing.assert_allclose(net.apply(params, x[0]), base.apply(params["base"], x[0]), rtol=1e-6)
    result = jn.fit(net, params, x, y, loss="softmax_cross_entropy", optimizer=optax.adam(1e-2), epochs=3,
                    batch_size=8, key=jax.random.key(1), trainable="^lora/")  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, result.train.params["base"], params["base"])
    adapters = sum(a.size for a in jax.tree.leaves(params["lora"]))
    moments = sum(a.size for a in jax.tree.leaves(result.train.opt_state) if jnp.issubdtype(a.dtype, jnp.floating))
    assert moments == 2 * adapters  # Adam's state for the adapters alone
    merged = lowrank.merge(result.train.params, 4.0 / 2)
    np.testing.assert_allclose(base.apply(merged, x[0]), net.apply(result.train.params, x[0]), rtol=1e-5)
    assert not np.allclose(merged[0]["w"], params["base"][0]["w"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 0}, "^rank must be a positive integer"),
        ({"rank": 3}, r"^rank 3 exceeds the smallest dimension of the adapted weights \(2\): use at most 2"),
        ({"rank": 2, "targets": "nothing"}, "^targets 'nothing' match no weight"),
    ],
)
def test_lora_refuses_ranks_and_targets_that_cannot_be(options, message):
    with pytest.raises(ValueError, match=message):
        jn.lora(jn.mlp([4, 16, 2]), **options)


def test_a_gpt_with_adapters_generates_from_its_merged_weights():
    gpt = jn.gpt(vocab_size=32, context=16, layers=2, heads=2, dim=16)
    net = jn.lora(gpt, rank=2, targets="attn/(q|v)/w")
    params, state = net.init(jax.random.key(0))
    assert params["lora"]["blocks/attn/q/w"]["a"].shape == (2, 16, 2)  # stacked blocks: adapters per layer
    params["lora"] = jax.tree.map(lambda a: a + 0.1, params["lora"])
    ids = jnp.arange(8)
    ctx = jn.Context(train=False)
    merged = lowrank.merge(params, 1.0)
    np.testing.assert_allclose(net.apply(params, state, ids, ctx)[0], gpt.apply(merged, state, ids, ctx)[0], rtol=1e-5)
    out = jn.generate(gpt, merged, jnp.array([1, 2]), 4, key=jax.random.key(0), temperature=0.0)
    assert out.shape[-1] >= 4


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init")
    result = jaxnet(
        "train", "--dataset", "digits", "--hidden", "16", "--epochs", "2", "--out", folder / "run", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    return folder


def test_init_from_a_run_starts_from_its_weights_and_records_it(mlp_run, tmp_path):
    out = tmp_path / "tuned"
    result = jaxnet("train", "--dataset", "digits", "--init-from", mlp_run / "run", "--epochs", "1", "--freeze", "^0/",
                    "--out", out, "--quiet", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["trainable_parameters"] < summary["parameters"]
    assert json.loads((out / "config.json").read_text())["init_from"] == str(mlp_run / "run")
    before, after = (np.load(p / "model.npz") for p in (mlp_run / "run", out))
    np.testing.assert_array_equal(after["params/0/w"], before["params/0/w"])  # frozen: the loaded weights
    assert not np.array_equal(after["params/1/w"], before["params/1/w"])
    shown = json.loads(jaxnet("summary", "--model", out, "--json").stdout)
    assert shown["trainable_parameters"] == summary["trainable_parameters"] == 16 * 10 + 10  # layer 1's
    assert shown["trained"] == "all but --freeze '^0/'" and shown["params"] == summary["parameters"]


def test_a_lora_run_trains_its_adapters_alone_and_its_summary_says_so(mlp_run, tmp_path):
    out = tmp_path / "lora"
    result = jaxnet("train", "--dataset", "digits", "--init-from", mlp_run / "run", "--epochs", "1", "--lora-rank",
                    "2", "--out", out, "--quiet", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    adapters = 2 * (64 + 16) + 2 * (16 + 10)  # r * (d_in + d_out) for 0/w (64, 16) and 1/w (16, 10)
    summary = json.loads(result.stdout)
    assert (
        summary["trainable_parameters"] == adapters and summary["parameters"] == 64 * 16 + 16 + 16 * 10 + 10 + adapters
    )
    with np.load(out / "adapters.npz") as saved:
        assert sum(saved[k].size for k in saved.files) == adapters
    before, after = (np.load(p / "model.npz") for p in (mlp_run / "run", out))
    np.testing.assert_array_equal(after["params/0/b"], before["params/0/b"])  # not adapted: unchanged
    assert not np.array_equal(after["params/0/w"], before["params/0/w"])  # the adapters merged in
    shown = jaxnet("summary", "--model", out)
    assert shown.returncode == 0, shown.stderr
    line = f"the run trained {adapters} parameters: LoRA adapters of rank 2 (--lora-targets '(^|/)w$'), merged into"
    assert line + " the saved weights" in shown.stdout
    assert "trainable_parameters" not in json.loads(jaxnet("summary", "--model", mlp_run / "run", "--json").stdout)
    # the run's own targets and alpha
    out = tmp_path / "last"
    result = jaxnet("train", "--dataset", "digits", "--init-from", mlp_run / "run", "--epochs", "1", "--lora-rank",
                    "2", "--lora-targets", "^1/w$", "--lora-alpha", "4", "--out", out, "--quiet", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = jaxnet("summary", "--model", out, "--json")
    assert shown.returncode == 0, shown.stderr
    trained = json.loads(result.stdout)["trainable_parameters"]
    assert json.loads(shown.stdout)["trainable_parameters"] == trained == 2 * (16 + 10)


def test_a_relative_init_from_is_recorded_whole_so_its_config_runs_from_anywhere(mlp_run, tmp_path, monkeypatch):
    monkeypatch.chdir(mlp_run)
    first = jaxnet("train", "--dataset", "digits", "--init-from", "run", "--epochs", "1", "--out", tmp_path / "a",
                   "--quiet")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "a" / "config.json").read_text())["init_from"] == str(mlp_run / "run")
    monkeypatch.chdir(tmp_path)  # elsewhere: "run" does not exist here
    again = jaxnet("train", "--config", tmp_path / "a" / "config.toml", "--out", tmp_path / "b", "--quiet")
    assert again.returncode == 0, again.stderr


def test_a_renamed_layer_is_refused_with_the_names_and_accepted_with_init_rename(mlp_run, tmp_path):
    from safetensors.numpy import save_file

    with np.load(mlp_run / "run" / "model.npz") as saved:
        arrays = {k.replace("params/0/", "params/first/"): saved[k] for k in saved.files if k.startswith("params/")}
    save_file(arrays, str(tmp_path / "renamed.safetensors"))
    args = ["train", "--dataset", "digits", "--hidden", "16", "--epochs", "1", "--quiet", "--init-from",
            tmp_path / "renamed.safetensors"]  # fmt: skip
    refused = jaxnet(*args, "--out", tmp_path / "a")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "0/b is missing; 0/w is missing; first/b is unexpected; first/w is unexpected" in refused.stderr
    accepted = jaxnet(*args, "--init-rename", "^first/=0/", "--out", tmp_path / "b")
    assert accepted.returncode == 0, accepted.stderr
    partial = jaxnet(
        *args[:-3], "--init-from", tmp_path / "renamed.safetensors", "--init-partial", "--out", tmp_path / "c"
    )
    assert partial.returncode == 0, partial.stderr  # not --quiet: it says what it did not load
    assert ("2 params loaded; 2 kept their fresh initialization (0/b, 0/w); 2 arrays of the source unused (first/b, "
            "first/w)") in partial.stderr  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--init-from", "{tmp}"], "is not a jaxnet run (no model.npz in it)"),
        (["--init-from", "{tmp}/x.txt"], "is not weights jaxnet reads"),
        (["--init-from", "{run}", "--init-rename", "zzz=a"], "rename 'zzz' matches no name of the source"),
        (["--freeze", "."], "--freeze '.' matches every parameter: nothing would train"),
        (["--freeze", "nothing"], "--freeze 'nothing' matches no parameter"),
        (["--freeze", "^0/", "--lr-mult", "^0/=5"], "--lr-mult '^0/' matches only frozen parameters (0/b, 0/w)"),
        (["--no-decay", "nothing", "--optimizer", "adamw"], "--no-decay 'nothing' matches no parameter"),
        (["--lora-rank", "0"], "--lora-rank must be a positive integer"),
        (["--init-from", "{run}", "--lora-rank", "100"], "--lora-rank 100 exceeds the smallest dimension"),
        (["--init-from", "{run}", "--lora-rank", "2", "--lora-targets", "nothing"], "--lora-targets 'nothing' match"),
        (["--freeze", "["], "--freeze '[' is not a valid regular expression"),
        (["--lora-rank", "2"], "--lora-rank trains adapters on a base that --init-from gives"),  # not a random one
        (["--lora-alpha", "4"], "--lora-alpha shapes the adapters of --lora-rank: give --lora-rank, or drop"),
        (["--ema", "1.5"], "--ema is a decay in (0, 1)"),
        (["--skip-spikes", "1,3"], "--skip-spikes needs a window of at least 2 steps"),
        (["--init-rename", "a=b"], "--init-rename and --init-partial shape what --init-from loads"),
    ],
)
def test_bad_fine_tuning_flags_are_one_line_and_exit_2(mlp_run, tmp_path, flags, message):
    (tmp_path / "x.txt").write_text("not weights")
    flags = [f.format(tmp=tmp_path, run=mlp_run / "run") for f in flags]
    result = jaxnet("train", "--dataset", "digits", "--hidden", "16", "--epochs", "1", *flags, "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_init_from_a_checkpoints_folder_takes_its_training_params(mlp_run, tmp_path):
    from jaxnet import checkpoint

    folder = mlp_run / "run" / "checkpoints"
    named = checkpoint.saved_params(folder)
    assert set(named) == {"0/w", "0/b", "1/w", "1/b"}
    params = jax.eval_shape(lambda: jn.mlp([64, 16, 10]).init(jax.random.key(0)))
    loaded = jn.load_params(folder, params)
    newest = checkpoint.steps(folder)[-1]
    np.testing.assert_array_equal(loaded.params[0]["w"], checkpoint.saved_params(folder / str(newest))["0/w"])
    result = jaxnet("train", "--dataset", "digits", "--hidden", "16", "--epochs", "1", "--init-from", folder,
                    "--out", tmp_path / "o", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_every_member_of_an_ensemble_starts_from_the_weights(mlp_run, tmp_path):
    out = tmp_path / "ensemble"
    result = jaxnet("train", "--dataset", "digits", "--init-from", mlp_run / "run", "--epochs", "1", "--seeds", "2",
                    "--ensemble", "--freeze", "^0/", "--out", out, "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with np.load(mlp_run / "run" / "model.npz") as before, np.load(out / "model.npz") as after:
        for name in ("params/0/w", "params/0/b"):  # frozen: each of the two members holds the loaded weights
            assert after[name].shape == (2, *before[name].shape)
            np.testing.assert_array_equal(after[name], np.broadcast_to(before[name], after[name].shape))
        assert not np.array_equal(after["params/1/w"][0], before["params/1/w"])


def test_init_from_a_table_run_needs_its_features_in_its_order(tmp_path):
    """Its weights meet the features by position: other columns, another order or other categories
    would train them on the wrong inputs, silently; refused, and the same columns train."""
    from csvfiles import write_csv

    rng = np.random.default_rng(0)
    area, rooms, city = rng.uniform(30, 200, 60), rng.integers(1, 6, 60), rng.choice(["lyon", "nice"], 60)
    rows = [(round(float(a), 1), int(r), c, round(3 * a + 10 * r, 1)) for a, r, c in zip(area, rooms, city)]
    write_csv(tmp_path / "h.csv", ["area", "rooms", "city", "price"], rows)
    write_csv(tmp_path / "swapped.csv", ["rooms", "area", "city", "price"], [(r, a, c, p) for a, r, c, p in rows])
    other = [(a, r, "paris" if c == "lyon" else c, p) for a, r, c, p in rows]  # another category
    write_csv(tmp_path / "cities.csv", ["area", "rooms", "city", "price"], other)
    common = ["--target", "price", "--epochs", "1", "--quiet"]
    assert jaxnet("train", "--data", tmp_path / "h.csv", *common, "--out", tmp_path / "h").returncode == 0
    for data, message in [
        ("swapped.csv", "its model reads 4 features and this data gives 4; feature 1 is 'area' there and 'rooms' here"),
        ("cities.csv", "feature 3 is 'city=lyon' there and 'city=nice' here"),
    ]:
        result = jaxnet(
            "train", "--data", tmp_path / data, *common, "--init-from", tmp_path / "h", "--out", tmp_path / "o"
        )
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr and not (tmp_path / "o").exists()
    same = jaxnet(
        "train", "--data", tmp_path / "h.csv", *common, "--init-from", tmp_path / "h", "--out", tmp_path / "s"
    )
    assert same.returncode == 0, same.stderr
