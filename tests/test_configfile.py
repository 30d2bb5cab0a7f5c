"""Configs as TOML files, and the command line generated from the config's fields."""

import dataclasses
import types
import typing

import numpy as np
import pytest

from jaxnet.app import cli, cliflags, configfile, files
from jaxnet.app import config as configlib

KINDS = {
    "str": {str, type(None)},
    "int": {int, type(None)},
    "number": {float, type(None)},
    "ints": {tuple, type(None)},
    "names": {tuple},
    "rules": {tuple},
    "bytes": {int, type(None)},
    "batch": {int, str},  # a batch size, or "auto"
    "count": {int, str},  # a number of batches, or "all"
    "switch": {bool},
    "numbers": {float, type(None)},
}


def test_every_flag_is_a_config_field_of_its_kind():
    hints = typing.get_type_hints(configlib.TrainConfig)
    names = {f.name for f in dataclasses.fields(configlib.TrainConfig)}
    assert set(cliflags.CONFIG_FLAGS) | {"standardize", "lrs", "weight_decays"} == names
    for field, flag in cliflags.CONFIG_FLAGS.items():
        hint = hints[field]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        types_ = {typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,))}
        assert types_ <= KINDS[flag.kind], (field, hint, flag.kind)


def test_the_dumped_config_reads_back_equal(tmp_path):
    config = configlib.make_config(dataset="moons", hidden=(8, 8), lrs=(0.01, 0.1), metrics=("f1",), class_weight="0:2")
    path_text = configfile.dumps(config.to_dict())
    assert "lrs = [0.01, 0.1]" in path_text and 'class_weight = "0:2"' in path_text and "None" not in path_text
    path = tmp_path / "run.toml"
    path.write_text(path_text)
    assert configlib.make_config(**configfile.load_config_file(path)) == config


def test_a_run_folders_config_toml_reproduces_the_run_bitwise_and_flags_override_it(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--dataset", "moons", "--hidden", "8", "--epochs", "3", "--lr-schedule", "cosine", "--quiet"]
    assert cli.main(["train", *args, "--out", str(first)]) == 0
    assert cli.main(["train", "--config", str(first / "config.toml"), "--out", str(second), "--quiet"]) == 0
    assert (first / "config.json").read_text() == (second / "config.json").read_text()
    for a, b in zip(files.load_model(first).params.values(), files.load_model(second).params.values()):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    capsys.readouterr()
    assert cli.main(["train", "--config", str(first / "config.toml"), "--epochs", "5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "epochs = 5" in printed and 'lr_schedule = "cosine"' in printed and "hidden = [8]" in printed
    assert not (tmp_path / "third").exists()
    assert cli.main(["train", "--resume", str(first), "--print-config"]) == 0
    assert "epochs = 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, message",
    [
        ("foo = 1\n", "unknown field 'foo'"),
        ("epochs = \n", "is not valid TOML"),
        ("[model]\nhidden = [4]\n", "'model' is a table; the config is flat"),
        ('epochs = "x"\n', "--epochs must be a positive integer"),
        ('task = "lm"\ndata = "a.txt"\neval_batches = "some"\n', "--eval-batches must be a positive integer or 'all'"),
    ],
)
def test_a_bad_config_file_is_one_line_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert cli.main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_help_shows_each_fields_default_and_presets_from_the_config_itself(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--hidden SIZES hidden layer sizes, e.g. 64,64 (default 64,64; seed 2; xor 8; moons 32,32)" in text
    assert "--epochs N epochs; with --resume, extends the run to this many (default 30; seed 1000; xor 300;" in text
    for field in dataclasses.fields(configlib.TrainConfig):
        if field.name in cliflags.CONFIG_FLAGS and field.default is not None:
            assert cliflags.defaults_text(field.name), field.name
            for name, preset in configlib.PRESETS.items():
                if field.name in preset and preset[field.name] != field.default:
                    assert f"{name} " in cliflags.defaults_text(field.name), (field.name, name)
