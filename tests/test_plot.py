"""Figures: the worked example's annotated network, written atomically."""

import os
import sys

import pytest

from jaxnet.app.plot import draw_network
from jaxnet.app.worked_example import worked_example

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    return worked_example()


def test_draw_network_writes_a_png(tmp_path, result):
    path = tmp_path / "net.png"
    draw_network(result, path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert os.listdir(tmp_path) == ["net.png"]  # no temporary file left behind


def test_draw_network_replaces_an_existing_file(tmp_path, result):
    path = tmp_path / "net.png"
    path.write_bytes(b"old")
    draw_network(result, str(path))
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert os.listdir(tmp_path) == ["net.png"]


def test_draw_network_svg_has_every_annotation(tmp_path, result):
    path = tmp_path / "net.svg"
    draw_network(result, path)
    svg = path.read_text()
    # matplotlib writes each line of text as an svg comment: one gradient label per edge (6 + 4) and
    # per neuron bias (2 + 2), one z and a per computed neuron.
    assert svg.count("<!-- dC/dw=") == 10
    assert svg.count("dC/db=") == 4
    assert svg.count("<!-- z$_") == 4 and svg.count("a$_") >= 4
    assert f"dC/dw={result['grads'][1]['w'][0][0]:.4g}" in svg


def test_bad_extension_and_missing_folder(tmp_path, result):
    with pytest.raises(ValueError, match=r"must end in one of \.png"):
        draw_network(result, tmp_path / "net.jpg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        draw_network(result, tmp_path / "missing" / "net.png")
    assert os.listdir(tmp_path) == []


def test_missing_matplotlib_names_the_extra(tmp_path, result, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'jaxnet-trainer\[plot\]'"):
        draw_network(result, tmp_path / "net.png")
    assert os.listdir(tmp_path) == []
