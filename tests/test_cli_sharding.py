"""jaxnet train --mesh, --shard and --accumulate as a user runs them: a sharded run resumed on
another mesh and on one device, and the one-line errors of bad meshes and rules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(["the quick brown fox jumps over the lazy dog and then it sleeps."] * 300)  # 28 ids and eot


def gpt_run(context=16, batch=8, dim=128) -> list:
    model = ["--task", "lm", "--tokenizer", "char", "--context", context, "--layers", "1", "--heads", "2", "--dim", dim]
    run = ["--batch-size", batch, "--lr", "1e-3", "--eval-every", "5", "--eval-batches", "2", "--quiet", "--json"]
    return [*model, *run]


RUN = gpt_run()
# Parts of 16 rows of 64 tokens: small matmuls of 1,024-term sums, which XLA's CPU runtime splits
# by its threads, whose number follows the devices unless the CLI gives each process the same.
INVARIANT = [*gpt_run(context=64, batch=64, dim=32), "--clip-norm", "0.5", "--device-invariant", "4"]


def jaxnet(*args, devices=4):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jaxnet.app", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "corpus.txt"
    path.write_text(TEXT)
    return path


def weights(run: Path) -> dict:
    with np.load(run / "model.npz") as saved:
        return {k: saved[k] for k in saved.files if saved[k].dtype.kind == "f"}


@pytest.mark.slow
@pytest.mark.parametrize("invariant", [False, True])
def test_a_sharded_run_resumes_on_two_devices_and_on_one(corpus, tmp_path, invariant):
    """To 1e-5; with --device-invariant, to the bit (processes of 1, 2 and 4 devices). A run's own
    --shard rules lay out its params on the mesh it resumes on, and on one device nothing."""
    flags = INVARIANT if invariant else [*RUN, "--shard", "attn/q/w=None,None,fsdp"]
    straight = jaxnet("train", "--data", corpus, *flags, "--steps", "20", "--mesh", "fsdp=4", "--out", tmp_path / "a")
    assert straight.returncode == 0, straight.stderr
    for devices, mesh in ((2, ["--mesh", "fsdp=2"]), (1, [])):
        out = tmp_path / f"cut{devices}"
        cut = jaxnet("train", "--data", corpus, *flags, "--steps", "10", "--mesh", "fsdp=4", "--out", out)
        assert cut.returncode == 0, cut.stderr
        resumed = jaxnet("train", "--resume", out, "--steps", "20", *mesh, "--quiet", "--json", devices=devices)
        assert resumed.returncode == 0, resumed.stderr
        figures = [json.loads(r.stdout) for r in (resumed, straight)]
        assert figures[0]["steps"] == 20
        assert figures[0]["val_loss"] == pytest.approx(figures[1]["val_loss"], rel=1e-5)
        ours, theirs = weights(out), weights(tmp_path / "a")
        assert ours.keys() == theirs.keys()
        worst = max(float(np.max(np.abs(ours[k] - theirs[k]), initial=0.0)) for k in ours)
        assert worst == 0.0 if invariant else worst < 1e-5
    if invariant:
        conflict = jaxnet("train", "--resume", tmp_path / "a", "--steps", "30", "--device-invariant", "2", devices=1)
        assert conflict.returncode == 2 and "--device-invariant 2 conflicts with the run's 4" in conflict.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mesh", "data=3"], "a mesh of data=3, fsdp=1, model=1 needs 3 devices, but there are 4"),
        (["--mesh", "tensor=2"], "unknown mesh axis 'tensor'"),
        (["--mesh", "fsdp=4", "--devices", "2"], "--devices and --mesh both say which devices train"),
        (["--mesh", "fsdp=4", "--shard", "nothing/here=fsdp"], "sharding rule 'nothing/here' matches no parameter"),
        (["--mesh", "fsdp=4", "--shard", "embed=fsdp,None,None"], "the spec fsdp,None,None, longer than its rank"),
        (["--mesh", "fsdp=4", "--shard", "embed=fsdp"], "dimension 0 of embed/table (29, 128) is not divisible"),
        (["--mesh", "fsdp=4", "--shard", "embed=bogus"], "sharding rule 'embed': unknown mesh axis 'bogus' in"),
        (["--shard", "embed=fsdp"], "--shard lays params out on a device mesh: give --mesh too"),
        (["--shard", "embed"], "argument --shard: expected a rule REGEX=VALUE, got 'embed'"),
        (["--accumulate", "3"], "--accumulate 3 does not divide --batch-size 8 into equal microbatches"),
        (["--device-invariant", "3"], "--device-invariant must be a power of two (1, 2, 4, 8, ...), got 3"),
        (["--device-invariant", "16"], "--device-invariant 16 does not divide --batch-size 8 into equal parts"),
        (
            ["--mesh", "fsdp=4", "--device-invariant", "2"],
            "split it over 1 or 2 devices (a new run may instead give --device-invariant 4)",
        ),
        (
            ["--mesh", "fsdp=2,data=2", "--shard", "embed=fsdp", "--device-invariant", "4"],
            "--device-invariant keeps the params whole on every device: drop --shard",
        ),
    ],
)
def test_bad_meshes_and_rules_are_one_line_and_exit_2_before_training(corpus, tmp_path, flags, message):
    result = jaxnet("train", "--data", corpus, *RUN, "--steps", "5", *flags, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # not even the text's token cache


@pytest.mark.slow
def test_accumulated_microbatches_train_from_the_command_line(corpus, tmp_path):
    runs = [jaxnet("train", "--data", corpus, *RUN, "--steps", "5", "--accumulate", k, devices=1) for k in (1, 4)]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr
    one, four = (json.loads(r.stdout) for r in runs)
    assert four["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
