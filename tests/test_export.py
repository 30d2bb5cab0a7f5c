"""Exported prediction programs: run with jax alone, equal to jaxnet predict."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from jaxnet.app import cli

pytest.importorskip("flatbuffers")
datasets = pytest.importorskip("sklearn.datasets")

LOADER = """
import sys
sys.modules["jaxnet"] = None  # any import of jaxnet fails: the program needs jax alone
import jax, numpy as np
program = jax.export.deserialize(open(sys.argv[1], "rb").read())
x = np.loadtxt(sys.argv[2], delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
np.save(sys.argv[3], np.asarray(program.call(x)))
"""


def _regression_csv(folder):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = 100 + 20 * x[:, 0] - 7 * x[:, 1] ** 2
    np.savetxt(folder / "train.csv", np.c_[x, y], delimiter=",", header="a,b,c,price", comments="")
    return ["--data", str(folder / "train.csv"), "--target", "price", "--task", "regression"], x[:17], "a,b,c"


def _digits(folder):
    names = ",".join(f"pixel_{i}_{j}" for i in range(8) for j in range(8))
    return ["--dataset", "digits", "--seeds", "2", "--ensemble"], datasets.load_digits().data[:17], names


@pytest.mark.parametrize("case", [pytest.param(_digits, marks=pytest.mark.slow), _regression_csv])
def test_an_exported_model_runs_without_jaxnet_and_equals_predict(tmp_path, capsys, case):
    args, features, names = case(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", *args, "--epochs", "2", "--hidden", "16", "--out", str(out), "--quiet"]) == 0
    data = tmp_path / "new.csv"
    np.savetxt(data, features, delimiter=",", header=names, comments="", fmt="%.8g")
    program = tmp_path / "model.jaxexport"
    assert cli.main(["export", "--model", str(out), "--out", str(program)]) == 0
    got = tmp_path / "got.npy"
    run = subprocess.run([sys.executable, "-c", LOADER, program, data, got], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    exported = np.load(got)
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(out), "--data", str(data), "--probabilities"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    header, values = rows[0], np.array(rows[1:], dtype=float)
    if header[0] == "prediction" and len(header) > 1:  # classes: the label, then one probability each
        assert header[1:] == [f"prob_{k}" for k in range(10)]
        np.testing.assert_array_equal(values[:, 0], exported.argmax(axis=1))
        values = values[:, 1:]
    assert exported.shape == values.shape
    np.testing.assert_allclose(exported, values, rtol=2e-5, atol=2e-6)  # predict prints 6 digits


def test_export_refuses_what_is_not_a_model(tmp_path, capsys):
    assert cli.main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "m.jaxexport")]) == 2
    assert "not a jaxnet model" in capsys.readouterr().err
    assert not (tmp_path / "m.jaxexport").exists()


def test_weights_as_safetensors_read_back_without_jaxnet(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.numpy")
    out = tmp_path / "run"
    assert (
        cli.main(["train", "--dataset", "moons", "--epochs", "1", "--hidden", "4", "--out", str(out), "--quiet"]) == 0
    )
    assert cli.main(["export", "--model", str(out), "--out", str(tmp_path / "w.safetensors")]) == 0
    got = safetensors.load_file(str(tmp_path / "w.safetensors"))
    with np.load(out / "model.npz") as npz:
        expected = {name: npz[name] for name in npz.files if name != "meta"}
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as f:
        assert '"loss"' in f.metadata()["jaxnet"]


def test_a_language_model_exports_its_next_token_probabilities(tmp_path, capsys):
    import jax

    from jaxnet.app import files, language

    corpus, out, program = tmp_path / "corpus.txt", tmp_path / "run", tmp_path / "lm.jaxexport"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["--task", "lm", "--tokenizer", "char", "--context", "16", "--layers", "1", "--heads", "2", "--dim", "16"]
    assert cli.main(["train", "--data", str(corpus), *args, "--steps", "5", "--out", str(out), "--quiet"]) == 0
    assert cli.main(["export", "--model", str(out), "--out", str(program)]) == 0
    assert "next-token probabilities of (n, context) int32 windows" in capsys.readouterr().err
    about = json.loads((tmp_path / "lm.jaxexport.json").read_text())
    assert about["task"] == "lm" and about["context"] == 16 and about["tokenizer"]["jaxnet_tokenizer"] == "char"
    lm = language.load_language_model(files.load_model(out))
    ids = np.array([lm.tokenizer.encode("the quick brown ", "p"), lm.tokenizer.encode("lazy dog. the qu", "p")])
    exported = np.asarray(jax.export.deserialize(program.read_bytes()).call(ids.astype(np.int32)))
    logits = jax.vmap(lambda row: lm.model.apply(lm.params, {}, row, None)[0])(ids)
    assert exported.shape == (2, 16, about["vocab_size"])
    np.testing.assert_allclose(exported, jax.nn.softmax(logits, axis=-1), rtol=1e-5, atol=1e-7)
