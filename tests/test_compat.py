"""Files written by earlier releases still load: a run folder kept as version 0.1.0 wrote it.

``tests/data/run-0.1.0`` is the output of ``jaxnet train --dataset moons --hidden 8 --epochs 3 --out run``
at version 0.1.0 (commit c2e0c8b, before the command line moved into ``jaxnet.app``), its plot left out:
``config.json``, ``config.toml``, ``metrics.jsonl``, ``model.npz`` and an orbax checkpoint of epoch 3.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from csvfiles import write_csv

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "run-0.1.0"


def jaxnet(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jaxnet.app", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


@pytest.fixture
def run(tmp_path):
    """A copy of the kept run folder (a resume writes into it)."""
    return Path(shutil.copytree(LEGACY, tmp_path / "run"))


def test_an_old_model_predicts(run, tmp_path):
    rows = [[0.0, 0.5], [1.0, -0.5], [2.0, 0.5]]
    data = write_csv(tmp_path / "new.csv", ["x0", "x1"], rows)
    out = jaxnet("predict", "--model", run, "--data", data, "--probabilities")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 + len(rows), out.stdout
    probabilities = np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_an_old_run_resumes_and_extends(run):
    out = jaxnet("train", "--resume", run, "--epochs", "5", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["epochs"] == 5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    old = [json.loads(line) for line in (LEGACY / "metrics.jsonl").read_text().splitlines()]
    assert records[:3] == old  # the first three epochs are the saved ones, untouched


def test_an_old_run_summarizes(run):
    out = jaxnet("summary", "--model", run)
    assert out.returncode == 0, out.stderr
    assert "params: 42" in out.stdout.splitlines()  # 2*8+8 + 8*2+2 parameters


def test_an_old_config_file_runs_again(run, tmp_path):
    out = jaxnet("train", "--config", run / "config.toml", "--out", tmp_path / "again", "--json")
    assert out.returncode == 0, out.stderr
    old = [json.loads(line) for line in (LEGACY / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert len(new) == len(old) == 3
