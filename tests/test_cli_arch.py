"""``jaxnet train --arch``: the built-in mlp (with dropout) and cnn, and a user's own model file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxnet.app import cli, files

ROOT = Path(__file__).resolve().parents[1]


def _jaxnet(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jaxnet.app", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=600
    )


def _digits_npz(path, rows=400):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    np.savez(path, x=x[:rows], y=y[:rows])
    return path


@pytest.mark.slow
def test_mlp_with_dropout_trains_saves_and_predicts(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(["train", "--dataset", "moons", "--dropout", "0.2", "--epochs", "5", "--out", str(out), "--quiet"])
        == 0
    )
    saved = files.load_model(out)
    assert saved.meta["arch"] == "mlp" and saved.meta["dropout"] == 0.2 and saved.state == {}
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 2), np.float32))
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(out), "--data", str(tmp_path / "x.npz")]) == 0
    first = capsys.readouterr().out
    assert cli.main(["predict", "--model", str(out), "--data", str(tmp_path / "x.npz")]) == 0
    assert capsys.readouterr().out == first and len(first.splitlines()) == 4  # eval mode: no dropout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "resnet"], "--arch 'resnet' is neither mlp nor cnn nor gpt nor path/to/file.py:factory"),
        (["--arch", "missing.py:build"], "--arch names missing.py, which is not a file"),
        (["--dataset", "moons", "--arch", "cnn"], "--arch cnn needs the image shape of the rows: give --input-shape"),
        (["--arch", "cnn", "--input-shape", "4,4,1"], "--input-shape 4x4x1 holds 16 values, the data has 64"),
        (["--input-shape", "8,8,1"], "--input-shape is for --arch cnn: drop it"),
        (["--dropout", "1.5"], "--dropout must be a fraction in [0, 1)"),
    ],
)
def test_bad_architectures_are_one_line_usage_errors(args, message, tmp_path, capsys):
    assert cli.main(["train", *args, "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxnet: error: ") and message in lines[0], lines
    assert not (tmp_path / "r" / "model.npz").exists()


FLAX_MODEL = """
import flax.linen as nn
import numpy as np

import jaxnet

CONV = {conv}


class Net(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, x, train: bool):
        if CONV:
            x = x.reshape((x.shape[0], 8, 8, 1))
            x = nn.relu(nn.Conv(32, (3, 3))(x))
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(nn.Conv(64, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(self.classes)(nn.Dropout(0.3, deterministic=not train)(x))


def build(in_features, out_dim):
    return jaxnet.from_flax(Net(out_dim), np.zeros(in_features, np.float32))
"""


# Flax's convolutions are lax.conv, whose kernel gradient XLA's CPU backend computes slowly inside
# the compiled epoch (docs/models.md): the default suite trains the dense part alone (batch norm
# and dropout through Flax's collections and rngs), the slow suite the CNN.
FLAX_CASES = [
    pytest.param(False, 12, 0.93, id="dense", marks=pytest.mark.slow),
    pytest.param(True, 20, 0.97, id="cnn", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("conv, epochs, accuracy", FLAX_CASES)
def test_a_flax_model_from_a_file_trains_evaluates_deterministically_and_needs_its_arch_again(
    tmp_path, capsys, conv, epochs, accuracy
):
    pytest.importorskip("flax")
    (tmp_path / "my_model.py").write_text(FLAX_MODEL.replace("{conv}", repr(conv)))
    arch, out = f"{tmp_path / 'my_model.py'}:build", tmp_path / "run"
    train = ["train", "--arch", arch, "--out", str(out), "--json", "--quiet", "--epochs", str(epochs)]
    assert cli.main(train) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test_accuracy"] >= accuracy
    assert set(files.load_model(out).state) >= {"batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"}
    data = str(_digits_npz(tmp_path / "digits.npz"))
    outputs = []
    for _ in range(2):
        assert cli.main(["evaluate", "--model", str(out), "--data", data, "--arch", arch, "--json"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and json.loads(outputs[0])["accuracy"] > accuracy - 0.05
    assert cli.main(["predict", "--model", str(out), "--data", data]) == 2
    refused = capsys.readouterr()
    assert len(refused.err.strip().splitlines()) == 1 and not refused.out
    assert "give --arch path/to/file.py:factory to load it" in refused.err
    assert cli.main(["train", "--resume", str(out), "--epochs", str(epochs + 1), "--quiet"]) == 2
    resumed = capsys.readouterr()
    assert "give --arch with it again to resume" in resumed.err


@pytest.mark.slow
def test_cnn_on_digits_reaches_98_percent_over_three_seeds():
    accuracies = []
    for seed in (0, 1, 2):
        done = _jaxnet("train", "--dataset", "digits", "--arch", "cnn", "--seed", str(seed), "--json", "--quiet")
        assert done.returncode == 0, done.stderr
        accuracies.append(json.loads(done.stdout)["test_accuracy"])
    assert np.mean(accuracies) >= 0.98, accuracies
