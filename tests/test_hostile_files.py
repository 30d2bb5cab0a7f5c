"""Files that lie: every reader refuses them in one line, in bounded memory and time."""

import io
import json
import resource
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest

from jaxnet import _npz as npz
from jaxnet.app import cli, files, saved


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    args = ["train", "--dataset", "moons", "--epochs", "1", "--hidden", "4", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    return out


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def write_zip(path, entries: dict[str, bytes], compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_bomb(path, good: dict, name: str, nbytes: int, level: int = 1):
    """``good``'s members, ``name`` replaced by a float32 array of ``nbytes`` zero bytes, deflated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 4,)})
    header = header.getvalue()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as z:
        for member, data in good.items():
            if member != name:
                z.writestr(member, data, zipfile.ZIP_STORED)
        with z.open(name, "w", force_zip64=True) as out:
            out.write(header)
            zeros = bytes(1 << 24)
            for _ in range(nbytes >> 24):
                out.write(zeros)
    return path


def meta_bytes(meta: dict) -> bytes:
    return npy_bytes(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


def refused(path, match: str):
    with pytest.raises(ValueError, match=match) as e:
        files.load_model(path)
    assert "\n" not in str(e.value)


def test_a_good_model_reads_back_equal(model_dir):
    with np.load(model_dir / "model.npz") as z:
        expected = {name: z[name] for name in z.files}
    model = files.load_model(model_dir)
    for name, value in model.params.items():
        np.testing.assert_array_equal(value, expected[f"params/{name}"])
        assert value.flags.writeable
    np.testing.assert_array_equal(model.std, expected["norm/std"])


def test_unused_members_are_never_inflated_and_lying_headers_are_refused(model_dir, tmp_path):
    good = members(model_dir / "model.npz")
    path = tmp_path / "model.npz"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in good.items():
            z.writestr(name, data)
        info = zipfile.ZipInfo("junk.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, bytes(64 << 20))
    assert path.stat().st_size < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    files.load_model(path)  # the 64 MiB member is never read
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10  # KiB

    weight = "params/0/w.npy"
    huge = npy_bytes(np.zeros((1, 1), np.float32)).replace(b"(1, 1)", b"(1099511627776, 1)")  # 4 TiB declared
    write_zip(path, {**good, weight: huge})
    refused(path, r"array 'params/0/w' declares float32 \(1099511627776, 1\) .* but stores \d+ bytes")

    write_bomb(path, good, weight, 128 << 20)  # 128 MiB of zeros in about 130 KB
    refused(path, r"array 'params/0/w' declares 134217728 bytes, past what .* refused as a decompression bomb")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:  # many small members, none large alone
        for name, data in good.items():
            z.writestr(name, data)
        for i in range(300):
            z.writestr(f"params/extra{i}.npy", npy_bytes(np.zeros(1 << 18, np.float32)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(path, r"refused as a decompression bomb")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB

    write_zip(path, {**good, weight: npy_bytes(np.array([{"a": 1}], dtype=object))})
    refused(path, r"array 'params/0/w' holds Python objects, which would need pickle")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m.pop("loss"), "lacks the field 'loss'"),
        (lambda m: m.pop("feature_names"), "lacks the field 'feature_names'"),
        (lambda m: m.update(sizes="2,4,2"), "has 'sizes' of type str"),
        (lambda m: m.update(sizes=[2, -4, 2]), "'sizes' that are not positive integers"),
        (lambda m: m.update(task="ranking"), "task 'ranking'"),
        (lambda m: m.update(feature_names=[1, 2]), "'feature_names' that are not a non-empty list"),
        (lambda m: m.update(format_version="2"), "'format_version' of type str"),
        (lambda m: m.update(members=True), "'members' of type bool"),
        (lambda m: m.update(format="other"), "was not written by jaxnet"),
    ],
)
def test_metadata_fields_are_checked_by_name(model_dir, tmp_path, change, match):
    good = members(model_dir / "model.npz")
    meta = json.loads(np.load(io.BytesIO(good["meta.npy"])).tobytes())
    change(meta)
    refused(write_zip(tmp_path / "m.npz", {**good, "meta.npy": meta_bytes(meta)}), match)


def test_missing_arrays_are_named(model_dir, tmp_path):
    good = members(model_dir / "model.npz")
    for name in ("norm/std.npy", "norm/mean.npy"):
        rest = {k: v for k, v in good.items() if k != name}
        refused(write_zip(tmp_path / "m.npz", rest), f"lacks the array '{name[:-4]}'")
    rest = {k: v for k, v in good.items() if not k.startswith("params/")}
    refused(write_zip(tmp_path / "m.npz", rest), "has no 'params/' arrays")
    refused(write_zip(tmp_path / "m.npz", {k: v for k, v in good.items() if k != "meta.npy"}), "has no metadata")
    short = {**good, "norm/std.npy": npy_bytes(np.ones(5, np.float32))}
    refused(write_zip(tmp_path / "m.npz", short), "of different lengths")


def test_truncations_and_byte_flips_are_refused_or_read_exactly(model_dir, tmp_path):
    data = (model_dir / "model.npz").read_bytes()
    original = files.load_model(model_dir)
    rng = np.random.default_rng(0)
    cases = [data[:n] for n in (0, 10, 30, len(data) // 2, len(data) - 22, len(data) - 1)]
    for position in rng.integers(0, len(data), 150):
        flipped = bytearray(data)
        flipped[position] ^= 1 << int(rng.integers(0, 8))
        cases.append(bytes(flipped))
    path, outcomes = tmp_path / "model.npz", {"refused": 0, "read": 0}
    start = time.monotonic()
    for case in cases:
        path.write_bytes(case)
        try:
            model = files.load_model(path)
            bound = saved.bind_saved(model)
        except ValueError as e:
            assert "\n" not in str(e) and ("model" in str(e) or str(path) in str(e)), e
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1  # a flip outside anything read (e.g. a zip comment): the model is intact
        for got, expected in zip(jax.tree.leaves(bound.params), jax.tree.leaves(saved.bind_saved(original).params)):
            np.testing.assert_array_equal(got, expected)
        assert model.meta == original.meta
    assert outcomes["refused"] >= 0.8 * len(cases), outcomes
    assert time.monotonic() - start < 30


def test_compressed_archives_read_and_their_damage_is_one_line(tmp_path, capsys):
    sparse = (np.random.default_rng(0).random((20000, 200)) < 0.05).astype(np.float32)  # compresses ~50x
    np.savez_compressed(tmp_path / "sparse.npz", x=sparse, y=np.arange(20000) % 2)
    np.testing.assert_array_equal(npz.read_arrays(tmp_path / "sparse.npz", lambda n: n == "x")["x"], sparse)
    data = bytearray((tmp_path / "sparse.npz").read_bytes())
    rng, outcomes = np.random.default_rng(1), set()
    for position in rng.integers(200, len(data) - 200, 60):
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        (tmp_path / "bad.npz").write_bytes(damaged)
        try:
            npz.read_arrays(tmp_path / "bad.npz", lambda n: True)
            outcomes.add("read")
        except npz.ArchiveError as e:
            assert "\n" not in str(e)
            outcomes.add("refused")
    assert "refused" in outcomes


def test_data_archives_are_read_the_same_way(tmp_path, capsys):
    garbage = b"\x93NUMPY\x01\x00\x08\x00garbage\n"
    path = write_zip(tmp_path / "d.npz", {"x.npy": npy_bytes(np.zeros((3, 2))), "y.npy": garbage})
    assert cli.main(["train", "--data", str(path), "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "array 'y' has a malformed .npy header" in err, err
    (tmp_path / "junk.npz").write_bytes(b"PK junk")
    with pytest.raises(npz.ArchiveError, match="junk.npz is not a readable .npz archive"):
        npz.read_arrays(tmp_path / "junk.npz", lambda name: True)


PEAK = """
import sys
from jaxnet.app import cli
code = cli.main(sys.argv[1:])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # this process's own peak
print(code, int(peak.split()[1]) // 1024)
"""


@pytest.mark.slow
def test_a_3_mb_bomb_is_refused_by_predict_in_bounded_memory(model_dir, tmp_path):
    good = members(model_dir / "model.npz")
    path = tmp_path / "bomb" / "model.npz"
    path.parent.mkdir()
    write_bomb(path, good, "params/0/w.npy", 3 << 30, level=9)  # 3 GiB of zeros in about 3 MB
    assert path.stat().st_size < 4 << 20
    command = [sys.executable, "-c", PEAK, "predict", "--model", str(path.parent), "--data", "-"]
    run = subprocess.run(command, input="x0,x1\n0.5,0.5\n", capture_output=True, text=True)
    code, peak_mib = map(int, run.stdout.split())
    assert code == 2 and "refused as a decompression bomb" in run.stderr and run.stderr.count("\n") == 1
    assert peak_mib < 300, peak_mib


@pytest.mark.parametrize("field, value", [("history", 5), ("key_impl", 3), ("epoch", "1"), ("position", {"a": 1})])
def test_checkpoint_metadata_of_the_wrong_type_is_one_line(tmp_path, capsys, field, value):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "xor", "--hidden", "2", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    path = out / "checkpoints" / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta[field] = value
    path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and repr(field) in err, err


def test_an_npy_whose_header_overflows_int64_is_refused(tmp_path):
    from jaxnet import sources

    data = npy_bytes(np.zeros((2, 2), np.float32)).replace(b"(2, 2)", b"(4294967296, 4294967296)")
    (tmp_path / "x.npy").write_bytes(data)
    with pytest.raises(sources.DataError, match="is truncated: .* bytes where its header describes 7378697629483820"):
        sources.NpyFile(tmp_path / "x.npy")
