"""``jaxnet seed``: text, one JSON object, a figure, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from chain_rule import chain_rule, flatten

from jaxnet.app.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "jaxnet.app", "seed", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def assert_matches_reference(out, x, target=(0.9, 0.1), lr=0.1):
    assert out.count("\n") == 1 and out.endswith("\n")  # exactly one JSON object on one line
    got = json.loads(out)
    want = chain_rule(list(x), list(target), lr)
    assert set(got) == set(want)
    g, w = flatten(got), flatten(want)
    assert [p for p, _ in g] == [p for p, _ in w]
    # The CLI computes in float64, so it matches the float64 chain rule to rounding.
    np.testing.assert_allclose([v for _, v in g], [v for _, v in w], rtol=1e-12, atol=1e-15)


def test_json_matches_float64_chain_rule_for_the_notes_input():
    proc = run_cli("--json")
    assert proc.returncode == 0, proc.stderr
    assert_matches_reference(proc.stdout, [0.5, 0.5, 0.1])


def test_json_matches_float64_chain_rule_for_x_half():
    proc = run_cli("--x", "0.5", "0.5", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert_matches_reference(proc.stdout, [0.5, 0.5, 0.5])
    assert [round(a, 3) for a in json.loads(proc.stdout)["layers"][1]["a"]] == [0.658, 0.636]


def test_overrides_in_process(capsys):
    assert main(["seed", "--x", "-1", "2", "0.25", "--target", "0", "1", "--lr", "0.5", "--json"]) == 0
    assert_matches_reference(capsys.readouterr().out, [-1.0, 2.0, 0.25], (0.0, 1.0), 0.5)


def test_text_output(capsys):
    assert main(["seed"]) == 0
    out = capsys.readouterr().out
    for line in ("z_1^1 = 0.1*0.5 + 0.2*0.5 + 0.5*0.1 + 0.2 = 0.4", "dC/dw_11^1", "w_22^2'", "b_2^2'"):
        assert line in out


def test_figure_writes_a_png_and_keeps_json_clean(tmp_path, capsys):
    path = tmp_path / "net.png"
    assert main(["seed", "--json", "--figure", str(path)]) == 0
    assert_matches_reference(capsys.readouterr().out, [0.5, 0.5, 0.1])
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, words",
    [
        (["--x", "0.5", "0.5"], "x must have 3 numbers"),
        (["--x", "0.5", "0.5", "0.5", "0.5"], "x must have 3 numbers"),
        (["--x", "a", "0.5", "0.5"], "'a' is not a number"),
        (["--x", "0.5", "nan", "0.5"], "'nan' is not a finite number"),
        (["--target", "inf", "0.1"], "'inf' is not a finite number"),
        (["--target", "0.9"], "target must have 2 numbers"),
        (["--lr", "0"], "must be greater than 0"),
        (["--lr", "fast"], "'fast' is not a number"),
        (["--figure", "net.jpg"], "must end in one of .png"),
        (["--figure", "/no/such/folder/net.png"], "does not exist"),
    ],
)
def test_bad_input_one_line_exit_2(args, words, capsys):
    assert main(["seed", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("jaxnet: error:") and captured.err.count("\n") == 1
    assert words in captured.err


def test_bad_input_no_traceback_in_a_process():
    proc = run_cli("--x", "0.5", "inf", "0.5")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
