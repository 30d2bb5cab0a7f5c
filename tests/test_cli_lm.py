"""jaxnet train --task lm, evaluate and generate as a user runs them: exit codes, outputs, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from incli import run_cli

from jaxnet.app import cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"{w} the quick brown fox jumps over the lazy dog.\n" for w in ("ALPHA", "BETA", "GAMMA") * 60)
SMALL = ["--context", "16", "--layers", "1", "--heads", "2", "--dim", "16", "--batch-size", "8"]


jaxnet = run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT)
    out = folder / "run"
    args = ["train", "--data", corpus, "--task", "lm", "--tokenizer", "char", *SMALL, "--steps", "40"]
    result = jaxnet(*args, "--eval-every", "20", "--lr", "3e-3", "--out", out, "--json")
    return folder, out, result


def test_training_a_language_model_reports_its_figures(trained):
    folder, out, result = trained
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["task"] == "lm" and summary["steps"] == 40
    assert summary["epochs"] is None and summary["rounds"] == 2  # rounds of --eval-every steps, not epochs
    assert summary["val_loss"] < 3.0 and summary["parameters"] > 0 and summary["tokens_per_second"] > 0
    assert summary["val_perplexity"] == pytest.approx(2.718281828 ** summary["val_loss"], rel=1e-6)
    lines = result.stderr.splitlines()
    assert lines[0].startswith("task: language model, char tokenizer")
    assert any(line.startswith("step 20: ") and "tokens/s=" in line for line in lines)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40]
    assert (out / "tokenizer.json").is_file() and (out / "tokens.bin").is_file()


def test_generate_writes_the_prompt_and_new_text(trained):
    _, out, _ = trained
    result = jaxnet("generate", "--model", out, "--prompt", "ALPHA", "--tokens", "30", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ALPHA") and len(result.stdout.rstrip("\n")) == len("ALPHA") + 30
    again = jaxnet("generate", "--model", out, "--prompt", "ALPHA", "--tokens", "30", "--seed", "1")
    assert again.stdout == result.stdout  # the seed fixes the text
    greedy = jaxnet("generate", "--model", out, "--prompt", "ALPHA", "--tokens", "5", "--temperature", "0")
    assert greedy.returncode == 0 and set(greedy.stdout) <= set(TEXT)


def test_predict_on_a_language_model_names_the_commands_that_take_one(trained):
    folder, out, _ = trained
    result = jaxnet("predict", "--model", out, "--data", folder / "corpus.txt")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"jaxnet: error: {out} holds a language model: sample text from it with 'jaxnet generate', or score it on a "
        "text with 'jaxnet evaluate'\n"
    )


def test_evaluate_on_a_text_reports_loss_perplexity_and_bits(trained, capsys):
    folder, out, _ = trained
    other = folder / "other.txt"
    other.write_text(TEXT[:2000])
    result = jaxnet("evaluate", "--model", out, "--data", other, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["perplexity"] == pytest.approx(2.718281828 ** figures["loss"], rel=1e-6)
    assert figures["bits_per_character"] == pytest.approx(figures["bits_per_token"], rel=1e-2)  # char tokens
    top = jaxnet("evaluate", "--model", out, "--data", other, "--metrics", "top_3_accuracy", "--json")
    top = json.loads(top.stdout)
    assert top["loss"] == figures["loss"] and 0 < top["accuracy"] <= top["top_3_accuracy"] <= 1
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jaxnet.app", "evaluate", "--model", str(out), "--data", "-", "--json"]
    piped = subprocess.run(cmd, input=TEXT[:2000], capture_output=True, text=True, env=env, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == figures  # standard input reads as the same text
    empty = subprocess.run(cmd, input="", capture_output=True, text=True, env=env, timeout=300)
    assert empty.returncode == 2 and empty.stderr == (
        "jaxnet: error: standard input holds no text: give a text that is not empty\n"
    )
    (folder / "new.txt").write_text(TEXT[:200] + "Zebra\n")
    unknown = jaxnet("evaluate", "--model", out, "--data", folder / "new.txt")
    assert unknown.returncode == 2 and unknown.stderr.endswith(
        "has 1 character(s) the char tokenizer does not know: 'Z' (it knows the characters of its training text): "
        "score a text without them, or a model trained on them\n"
    )
    table = jaxnet("evaluate", "--model", out, "--data", other, "--target", "price")
    assert table.returncode == 2 and table.stderr == (
        "jaxnet: error: --target is for tables; a language model is scored on a text: drop it\n"
    )
    assert cli.main(["evaluate", "--model", str(out), "--data", str(other), "--text-field", "body"]) == 2
    assert capsys.readouterr().err.endswith(f"{other} is read as plain text\n")


def test_summary_of_a_language_model_lists_its_parameters_and_flops_per_token(trained):
    _, out, result = trained
    shown = jaxnet("summary", "--model", out)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    parameters = json.loads(result.stdout)["parameters"]
    assert lines[2].split()[0] == "GPT" and f"params: {parameters:,}" in lines
    assert any(line.startswith("per token: forward ") and "train step" in line for line in lines)


def test_a_run_by_steps_extends_with_resume(trained, tmp_path):
    folder, out, _ = trained
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    result = jaxnet("train", "--resume", copy, "--steps", "60", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 60
    assert "from its checkpoint at step 40" in result.stderr
    again = jaxnet("train", "--resume", copy, "--json")
    assert again.returncode == 0 and f"{copy} already finished at step 60; not training further" in again.stderr
    summary = json.loads(again.stdout)
    assert summary["steps"] == 60 and "best_epoch" not in summary and summary["best_step"] in (20, 40, 60)


def test_a_resume_keeps_the_runs_tokenizer_and_refuses_a_text_that_changed(tmp_path):
    corpus, out = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(TEXT)
    args = ["--data", corpus, "--task", "lm", "--tokenizer", "char", *SMALL, "--eval-batches", "2"]
    assert jaxnet("train", *args, "--steps", "4", "--out", out).returncode == 0
    cached = {name: (out / name).read_bytes() for name in ("tokenizer.json", "tokens.bin", "tokens.source.json")}
    for changed, message in (
        (TEXT + "Zebra!\n", "corpus.txt has 2 character(s) the char tokenizer does not know: '!', 'Z'"),
        (TEXT + "the dog\n", f"{len(TEXT) + 9:,} tokens now, {len(TEXT) + 1:,} then; the first differs at"),
    ):
        corpus.write_text(changed)
        result = jaxnet("train", "--resume", out, "--steps", "8")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "cannot resume: the text the run in" in result.stderr and message in result.stderr, result.stderr
        assert "restore it, or train a new run on it" in result.stderr
        assert {name: (out / name).read_bytes() for name in cached} == cached  # the run's own, untouched
    corpus.write_text(TEXT)  # the same text again, a newer file: the run's tokens, the stamp renewed
    result = jaxnet("train", "--resume", out, "--steps", "8", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["steps"] == 8, result.stderr
    assert (out / "tokens.source.json").read_bytes() != cached["tokens.source.json"]
    assert (out / "tokenizer.json").read_bytes() == cached["tokenizer.json"]


def test_eval_batches_all_validates_on_every_window_of_the_held_out_text(tmp_path, capsys):
    corpus, held, out = tmp_path / "corpus.txt", tmp_path / "held.txt", tmp_path / "run"
    corpus.write_text(TEXT * 4)
    tokens = 4 * len(TEXT) + 1  # and the separator
    cut = tokens - round(tokens * 0.1)  # the default --val-split, its last part
    held.write_text((TEXT * 4)[cut:])
    windows = (tokens - cut - 1) // 16  # disjoint windows of context 16 + 1 tokens
    assert windows > 20 * 8  # more than the default --eval-batches 20 of 8
    args = ["train", "--data", corpus, "--task", "lm", "--tokenizer", "char", *SMALL, "--steps", "10"]
    result = jaxnet(*args, "--eval-batches", "all", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    assert f", {windows} validation windows" in result.stderr.splitlines()[0]
    figures = json.loads(jaxnet("evaluate", "--model", out, "--data", held, "--json").stdout)
    assert figures["tokens"] == windows * 16
    assert json.loads(result.stdout)["val_loss"] == pytest.approx(figures["loss"], rel=1e-5)
    assert cli.main([*map(str, args), "--eval-batches", "some", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err == (
        "jaxnet: error: argument --eval-batches: 'some' is neither a number nor all (see 'jaxnet train --help')\n"
    )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("empty", [], "the text is empty"),
        ("latin1", [], "not UTF-8 text: byte offset 9"),
        ("tiny", [], "fewer than a window of context 16 + 1"),
        ("good", ["--epochs", "3"], "--epochs and --steps both set the run's length"),
        ("good", ["--device-invariant", "2", "--accumulate", "2"], "--device-invariant already splits each batch"),
        ("good", ["--vocab-size", "300"], "--vocab-size is the vocabulary --tokenizer bpe learns; --tokenizer char"),
        ("good", ["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size must be at least 257 for --tokenizer"),
        ("good", ["--text-field", "body"], "--text-field names the field of a JSONL or Parquet corpus;"),
        ("good", ["--device-invariant", "2", "--shard", "embed=fsdp"], "--device-invariant keeps the params whole"),
        ("table", [], "--task lm trains on text"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case, extra, message):
    files = {
        "empty": ("e.txt", b""),
        "latin1": ("l.txt", b"hello caf\xe9 ok"),
        "tiny": ("t.txt", b"abc"),
        "good": ("g.txt", TEXT.encode()),
        "table": ("t.csv", b"a,b\n1,2\n"),
    }
    name, data = files[case]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "run"
    args = ["train", "--data", tmp_path / name, "--task", "lm", *SMALL, "--steps", "5", "--val-split", "0"]
    result = jaxnet(*args, "--out", out, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()  # not even the text's token cache


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "--temperature must be 0 or more, got -1.0"),
        (["--top-k", "0"], "--top-k must be a positive integer, got 0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--tokens", "0"], "--tokens must be a positive integer, got 0"),
    ],
)
def test_bad_sampling_options_are_refused_before_the_prompt_is_written(trained, capsys, extra, message):
    _, out, _ = trained
    assert cli.main(["generate", "--model", str(out), "--prompt", "ALPHA", *extra]) == 2
    written = capsys.readouterr()
    assert written.out == "" and written.err == f"jaxnet: error: {message}\n"


def test_a_prompt_with_characters_the_model_does_not_know_is_refused(trained):
    _, out, _ = trained
    result = jaxnet("generate", "--model", out, "--prompt", "ALPHA ü", "--tokens", "5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "jaxnet: error: the prompt has 1 character(s) the char tokenizer does not know: 'ü' "
        "(it knows the characters of its training text): leave them out, or train with a tokenizer that reads "
        "any text (byte)"
    )


def test_a_long_prompt_is_cut_from_the_left_with_a_note(trained):
    _, out, _ = trained
    result = jaxnet("generate", "--model", out, "--prompt", "ALPHA the quick brown fox", "--tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "more than the context of 16: its first 9 tokens are left out" in result.stderr


def test_many_language_models_train_in_one_program(trained, tmp_path):
    folder, _, _ = trained
    args = ["train", "--data", folder / "corpus.txt", "--task", "lm", *SMALL, "--steps", "20", "--eval-every", "10"]
    result = jaxnet(*args, "--seeds", "2", "--lr", "1e-3,3e-3", "--out", tmp_path / "sweep", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert len(summary["members"]) == 4 and all(m["val_loss"] < 4.0 for m in summary["members"])
    best = min(summary["members"], key=lambda m: m["val_loss"])
    assert summary["best_member"] == best["member"] and summary["val_loss"] == pytest.approx(best["val_loss"])
    for member in summary["members"]:  # rounds of --eval-every steps, named by their steps
        assert "epochs" not in member and "best_epoch" not in member
        assert member["rounds"] == 2 and member["steps"] == 20 and member["best_step"] in (10, 20)


@pytest.mark.slow
def test_a_1gb_text_trains_in_under_1gb_of_memory(tmp_path):
    corpus = tmp_path / "big.txt"
    line = "".join(chr(97 + i % 26) for i in range(1023)) + "\n"
    with open(corpus, "w") as f:  # 1 GiB of text, written in blocks
        block = line * 1024
        for _ in range(1024):
            f.write(block)
    assert corpus.stat().st_size == 2**30
    code = (
        "import resource, subprocess, sys; "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    args = ["train", "--data", corpus, "--task", "lm", "--tokenizer", "byte", *SMALL, "--steps", "20"]
    args += ["--eval-every", "10", "--eval-batches", "4", "--out", tmp_path / "run", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "jaxnet.app", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    rc, peak_kib = map(int, out.stdout.split())
    assert rc == 0, out.stderr
    assert (tmp_path / "run" / "tokens.bin").stat().st_size == 2 * (2**30 + 1)  # uint16, and the separator
    assert peak_kib < 2**20, f"peak resident memory {peak_kib / 2**20:.2f} GiB"


def test_a_jsonl_corpus_trains_and_a_missing_field_is_named(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"body": line}) + "\n" for line in TEXT.splitlines()))
    args = ["train", "--data", corpus, "--task", "lm", *SMALL, "--steps", "10", "--out", tmp_path / "run"]
    result = jaxnet(*args, "--text-field", "body", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 10
    scored = jaxnet("evaluate", "--model", tmp_path / "run", "--data", corpus)  # the run's field, body
    assert scored.returncode == 0 and scored.stdout.startswith("loss "), scored.stderr
    other = jaxnet("evaluate", "--model", tmp_path / "run", "--data", corpus, "--text-field", "title")
    assert other.returncode == 2
    assert other.stderr.strip().endswith("line 1 has no text field 'title': name the field (--text-field=NAME)")
    missing = jaxnet(*args[:-2], "--out", tmp_path / "other")
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("line 1 has no text field 'text': name the field (--text-field=NAME)")
