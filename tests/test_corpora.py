"""Texts by name (--dataset shakespeare): downloaded once, checked, cached; offline in one line."""

import hashlib
import json

import pytest

from jaxnet.app import corpora

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40).encode()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A text 'served' from a file:// address as the shakespeare corpus, and an empty cache."""
    source = tmp_path / "served.txt"
    source.write_bytes(TEXT)
    corpus = corpora.Corpus(source.as_uri(), hashlib.sha256(TEXT).hexdigest(), len(TEXT), "tiny.txt", "a test text")
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", corpus)
    monkeypatch.setenv("JAXNET_DATA_DIR", str(tmp_path / "cache"))
    return source, corpus


def test_a_text_is_downloaded_once_then_read_from_the_cache(served, monkeypatch):
    source, corpus = served
    said = []
    path = corpora.fetch("shakespeare", note=said.append)
    assert path.read_bytes() == TEXT and path.parent == corpora.cache_dir() and len(said) == 1
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", corpus._replace(url="file:///nowhere/at/all.txt"))
    assert corpora.fetch("shakespeare", note=said.append) == path and len(said) == 1  # no second download


def test_other_bytes_are_refused_and_nothing_is_left(served, monkeypatch):
    source, corpus = served
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", corpus._replace(sha256="0" * 64))
    with pytest.raises(corpora.DownloadError, match=r"is not the expected one \(sha256 [0-9a-f]{64}; expected"):
        corpora.fetch("shakespeare", note=None)
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", corpus._replace(size=100))  # never reads past the size
    with pytest.raises(corpora.DownloadError, match=r"is not the expected one \(101 bytes; expected 100 bytes"):
        corpora.fetch("shakespeare", note=None)
    assert not corpora.cache_dir().exists()  # nothing left, not even the folder it made


def test_offline_is_one_line_naming_the_fix(served, monkeypatch, capsys):
    from jaxnet.app.cli import main

    source, corpus = served
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", corpus._replace(url="file:///nowhere/at/all.txt"))
    assert main(["train", "--dataset", "shakespeare", "--steps", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("jaxnet: error: cannot download the shakespeare text from file:///nowhere/at/all.txt")
    assert err[-1].endswith("connect to the internet, or download it yourself and give --data FILE")
    assert not (source.parent / "cache").exists()  # no empty cache folder left behind


def test_the_command_line_trains_a_character_model_on_it(served, tmp_path, capsys):
    from jaxnet.app.cli import main

    args = ["train", "--dataset", "shakespeare", "--context", "16", "--layers", "1", "--heads", "2", "--dim", "16",
            "--steps", "4", "--eval-every", "2", "--json", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dataset"] == "shakespeare" and summary["task"] == "lm" and summary["steps"] == 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tokenizer"] == "char"
