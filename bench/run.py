"""jaxnet benchmark suite: jaxnet against hand-written JAX, PyTorch, Flax NNX and Equinox.

Usage (from the repository root):
    python bench/run.py --suite quick|full [--json FILE] [--cases seed-sgd mlp784 ...] [--impls jaxnet raw-jax ...]

Writes ``bench/results/<device>-<date>.{md,json,png}`` (``--out`` to change the folder) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from bench import common  # noqa: E402
from bench.impls import equinox_impl, flax_impl, jaxnet_impl, raw_jax, torch_impl  # noqa: E402

MLP784 = [784, 512, 512, 10]
DIGITS = [64, 64, 64, 10]

# Per-suite, per-device sizes. "cpu" applies to the CPU backend, "accel" to GPU/TPU.
SUITES = {
    "quick": {
        "cpu": {
            "seed-sgd": dict(steps=200_000, loop_steps=1000, check_steps=100, repeats=5, min_seconds=0.2),
            "ensemble": dict(k=1024, steps=2000, check_steps=100, repeats=5, min_seconds=0.2),
            "mlp784": dict(
                batches={128: 16, 1024: 8},
                sizes=MLP784,
                lr=1e-3,
                check_batch=128,
                check_steps=5,
                repeats=3,
                min_seconds=0.3,
            ),
            "wide": dict(
                width=1024,
                batch=1024,
                steps=2,
                dtype="float32",
                lr=1e-3,
                check_batch=256,
                check_steps=3,
                repeats=3,
                min_seconds=0.0,
            ),
            "fit-epoch": dict(n=1440, batch=32, sizes=DIGITS, lr=1e-3, check_batch=32, check_steps=5, repeats=30),
        },
    },
    "full": {
        "cpu": {
            "seed-sgd": dict(steps=1_000_000, loop_steps=3000, check_steps=100, repeats=7, min_seconds=0.5),
            "ensemble": dict(k=1024, steps=10_000, check_steps=100, repeats=5, min_seconds=0.5),
            "mlp784": dict(
                batches={128: 32, 1024: 16, 8192: 4},
                sizes=MLP784,
                lr=1e-3,
                check_batch=128,
                check_steps=5,
                repeats=5,
                min_seconds=0.5,
            ),
            "wide": dict(
                width=1024,
                batch=1024,
                steps=4,
                dtype="float32",
                lr=1e-3,
                check_batch=256,
                check_steps=3,
                repeats=5,
                min_seconds=0.0,
            ),
            "fit-epoch": dict(n=1440, batch=32, sizes=DIGITS, lr=1e-3, check_batch=32, check_steps=5, repeats=50),
        },
        "accel": {
            "seed-sgd": dict(steps=200_000, loop_steps=2000, check_steps=100, repeats=5, min_seconds=0.3),
            "ensemble": dict(k=8192, steps=5000, check_steps=100, repeats=5, min_seconds=0.3),
            "mlp784": dict(
                batches={128: 200, 1024: 100, 8192: 32},
                sizes=MLP784,
                lr=1e-3,
                check_batch=128,
                check_steps=5,
                repeats=5,
                min_seconds=0.3,
            ),
            "wide": dict(
                width=8192,
                batch=8192,
                steps=4,
                dtype="bfloat16",
                lr=1e-3,
                check_batch=1024,
                check_steps=3,
                repeats=5,
                min_seconds=0.3,
            ),
            "fit-epoch": dict(n=1440, batch=32, sizes=DIGITS, lr=1e-3, check_batch=32, check_steps=5, repeats=30),
        },
    },
}
SUITES["quick"]["accel"] = SUITES["full"]["accel"]

# Relative tolerance of the loss check against raw JAX, per case (float32; bfloat16 is looser).
CHECK_RTOL = {"seed-sgd": 1e-4, "ensemble": 1e-4, "mlp784": 1e-3, "wide": 1e-3, "fit-epoch": 1e-3}
CHECK_RTOL_BF16 = 3e-2

UNITS = {
    "seed-sgd": "steps/s",
    "ensemble": "model-steps/s",
    "mlp784": "examples/s",
    "wide": "examples/s",
    "fit-epoch": "examples/s",
}


def _mb(case):
    return lambda module, **kw: lambda cfg: module.minibatch(case, cfg, **kw)


# case -> [(impl name, function(cfg) -> (check_loss, Timing), description)]
def implementations(case, suite):
    full = suite == "full"
    compile_note = "full suite only (compiling takes 3-25 s on a CPU)"

    def torch_compile(fn):
        if not full:
            return lambda cfg: (_ for _ in ()).throw(common.Skip(compile_note))
        return fn

    if case == "seed-sgd":
        return [
            (
                "raw-jax",
                raw_jax.seed_sgd,
                "jit + lax.scan over all steps, one call; sums the loss (fit reports it)",
            ),
            (
                "raw-jax-noloss",
                lambda cfg: raw_jax.seed_sgd(cfg, track_loss=False),
                "the same taking only the gradient: no loss value, no running sum",
            ),
            (
                "raw-jax-shuffled",
                raw_jax.seed_sgd_shuffled,
                "the same, shuffled in the call (permutation + gather)",
            ),
            ("raw-jax-loop", raw_jax.seed_sgd_loop, "donated jit step from a Python loop"),
            (
                "jaxnet",
                jaxnet_impl.seed_sgd,
                "fit(batch_size=1, shuffle=False): the stream in order, as raw-jax",
            ),
            (
                "jaxnet-shuffled",
                lambda cfg: jaxnet_impl.seed_sgd(cfg, shuffle=True),
                "fit(batch_size=1): reshuffled each epoch, as raw-jax-shuffled",
            ),
            ("jaxnet-epoch", jaxnet_impl.seed_sgd_epoch, "jit(make_epoch(make_update(...), shuffle=False))"),
            ("torch", torch_impl.seed_sgd, "PyTorch eager, optim.SGD"),
            (
                "torch-compile",
                torch_compile(lambda cfg: torch_impl.seed_sgd(cfg, compiled=True)),
                "torch.compile(model)",
            ),
            ("equinox", equinox_impl.seed_sgd, "eqx.filter_jit step from a Python loop"),
            ("flax-nnx", flax_impl.seed_sgd, "nnx.jit step via nnx.cached_partial"),
        ]
    if case == "ensemble":
        return [
            ("raw-jax", raw_jax.ensemble, "jit(vmap(scan)) over K nets; each sums its loss"),
            ("jaxnet", jaxnet_impl.ensemble, "fit with params (K, ...) and keys (K,): one vmapped program"),
            (
                "jaxnet-separate",
                jaxnet_impl.ensemble_separate,
                "4 separate fit calls, one per member, each compiling its own program (per-member rate)",
            ),
        ]
    if case in ("mlp784", "wide"):
        return [
            ("raw-jax", _mb(case)(raw_jax), "jit + lax.scan over pre-made batches, one call; mean loss"),
            (
                "raw-jax-loop",
                lambda cfg: raw_jax.minibatch_loop(case, cfg),
                "donated jit step from a Python loop",
            ),
            ("jaxnet", _mb(case)(jaxnet_impl), "fit(shuffle=False): the batches in order, as raw-jax"),
            (
                "jaxnet-shuffled",
                _mb(case)(jaxnet_impl, shuffle=True),
                "fit: reshuffled every epoch (permutation and gather in the compiled call)",
            ),
            (
                "jaxnet-epoch",
                lambda cfg: jaxnet_impl.minibatch_epoch(case, cfg),
                "jit(make_epoch(make_update(...), shuffle=False))",
            ),
            ("torch", _mb(case)(torch_impl), "PyTorch eager"),
            ("torch-compile", torch_compile(_mb(case)(torch_impl, compiled=True)), "torch.compile(model)"),
            ("equinox", _mb(case)(equinox_impl), "eqx.filter_jit step from a Python loop"),
            ("flax-nnx", _mb(case)(flax_impl), "nnx.jit step via nnx.cached_partial"),
        ]
    if case == "fit-epoch":
        return [
            ("raw-jax", raw_jax.fit_epoch, "hand-written epoch: permutation + gather + scan, one call"),
            ("jaxnet", lambda cfg: jaxnet_impl.minibatch("fit-epoch", cfg), "fit, per-epoch wall time"),
            (
                "jaxnet-epoch",
                lambda cfg: jaxnet_impl.minibatch_epoch("fit-epoch", cfg),
                "jit(make_epoch(...))",
            ),
        ]
    raise ValueError(case)


CASES = ["seed-sgd", "ensemble", "mlp784", "wide", "fit-epoch", "train-cli"]


def _versions():
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "optax", "torch", "flax", "equinox", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            out[name] = None
    try:
        import jaxnet

        out["jaxnet"] = jaxnet.__version__
    except Exception:  # noqa: BLE001
        out["jaxnet"] = None
    return out


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(suite):
    dev = jax.devices()[0]
    backend = jax.default_backend()
    kind = dev.device_kind if backend != "cpu" else f"{_cpu_name()} ({os.cpu_count()} cores)"
    slug_src = dev.device_kind if backend != "cpu" else f"cpu-{os.cpu_count()}core"
    env = {
        "suite": suite,
        "backend": backend,
        "device": kind,
        "device_count": jax.device_count(),
        "slug": re.sub(r"[^a-z0-9]+", "-", slug_src.lower()).strip("-"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": _versions(),
        "flags": {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("XLA_", "JAX_", "TF_", "CUDA_VISIBLE", "OMP_", "MKL_", "TORCH"))
        },
        "jax_config": {
            "jax_enable_x64": jax.config.jax_enable_x64,
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        },
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch_impl.torch is not None:
        env["torch_threads"] = torch_impl.torch.get_num_threads()
        env["torch_device"] = torch_impl.device()
    return env


def _flops(case, cfg):
    """(FLOPs per example as 6 x weights, FLOPs per example actually executed) of a minibatch case."""
    sizes = [cfg["width"]] * 5 if case == "wide" else cfg["sizes"]
    w = common.num_weights(sizes)
    return 6 * w, 6 * w - 2 * sizes[0] * sizes[1]  # no gradient is taken with respect to the inputs


def _peak_shapes(case, c):
    """The ``(m, k, n)`` matmuls whose best rate is a minibatch case's peak; none for other cases."""
    if case == "wide":
        return [(c["batch"], c["width"], c["width"])]
    if case == "mlp784":
        return [(c["batch"], 512, 512), (c["batch"], 784, 512), (1024, 1024, 1024)]
    return []


def _interleave(timers, on_error):
    """Seconds of every repeat of each started timer, repeat i of all before repeat i + 1 of any, the
    starting timer rotating. A timer whose repeat raises is finished, dropped from ``timers`` and
    reported through ``on_error(name, exception)``."""
    order = list(timers)
    seconds = {name: [] for name in order}
    for i in range(max((t.repeats for t in timers.values()), default=0)):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            if name in timers and len(seconds[name]) < timers[name].repeats:
                try:
                    seconds[name].append(timers[name].repeat())
                except Exception as e:  # noqa: BLE001 - one failing peer must not stop the suite
                    timers.pop(name).finish([])
                    on_error(name, e)
    return seconds


def run_case(case, cfg, suite, wanted, env, log, reverse=False):
    """Rows of one round of ``case``.

    Every implementation is first prepared: its loss check runs and its first call compiles
    (``reverse`` prepares them in the opposite order; alternate rounds do). Then the repeats are
    interleaved (:func:`_interleave`), with the matmul peak of minibatch cases timed among them, so
    that a shared machine's drift hits all alike and ratios can pair repeat i with repeat i
    (:func:`ratio`).
    """
    rows = []
    sub = (
        [(f"{case}-b{b}", dict(cfg, batch=b, steps=s)) for b, s in cfg["batches"].items()]
        if case == "mlp784"
        else [(case, cfg)]
    )
    for name, c in sub:
        impls = [i for i in implementations(case, suite) if not wanted or i[0] in wanted or i[0] == "raw-jax"]
        case_rows = {
            impl: {"case": name, "impl": impl, "how": desc, "unit": UNITS[case], "config": _jsonable(c)}
            for impl, _, desc in impls
        }
        timers, checks, began = {}, {}, {}
        for impl, fn, _ in reversed(impls) if reverse else impls:
            row = case_rows[impl]
            if (
                impl.startswith("torch")
                and torch_impl.torch is not None
                and env["backend"] != "cpu"
                and torch_impl.device() == "cpu"
            ):
                row.update(status="skipped", note="torch has no accelerator in this environment")
                continue
            began[impl] = time.perf_counter()
            try:
                checks[impl], timer = fn(c)
                timer.start()
                timers[impl] = timer
            except common.Skip as e:
                row.update(status="skipped", note=str(e))
                log(f"  {name:14s} {impl:17s} skipped: {e}")
            except Exception as e:  # noqa: BLE001 - one failing peer must not stop the suite
                _failed(row, e, log, name)
        timers = {impl: timers[impl] for impl, _, _ in impls if impl in timers}  # the table's order
        repeats = max((t.repeats for t in timers.values()), default=0)
        shapes = _peak_shapes(case, c)
        dtype = jax.numpy.dtype(c.get("dtype", "float32"))
        for shape in shapes:
            timers[shape] = raw_jax.matmul_timer(*shape, dtype, repeats, c.get("min_seconds") or 0.2)
            timers[shape].start()

        def on_error(key, e, name=name, case_rows=case_rows):
            _failed(case_rows[key] if key in case_rows else {"impl": f"matmul {key}"}, e, log, name)

        seconds = _interleave(timers, on_error)
        peaks = None
        if shapes and all(shape in timers for shape in shapes):  # per repeat, the best rate of the shapes
            per_shape = [timers.pop(shape).finish(seconds[shape]).rates for shape in shapes]
            peaks = [max(rates) for rates in zip(*per_shape)]
            log(
                f"  {name}: matmul peak {statistics.median(peaks):.3f} TFLOP/s ({dtype.name}, best of {shapes}, "
                "median over the repeats)"
            )
        for impl, timer in timers.items():
            if impl not in case_rows:  # a peak matmul left after another one failed
                timer.finish(seconds[impl])
                continue
            t = timer.finish(seconds[impl])
            rates = t.rates
            row, check = case_rows[impl], checks[impl]
            row.update(
                status="ok",
                median=statistics.median(rates),
                min=min(rates),
                max=max(rates),
                rates=rates,
                compile_s=t.compile_s,
                check_loss=check,
                wall_s=time.perf_counter() - began[impl],
            )
            if peaks is not None:
                nominal, executed = _flops(case, c)
                row.update(flops_per_example=nominal, flops_executed_per_example=executed, peak_repeats=peaks)
                _add_tflops(row)
            loss = "no check" if check is None else f"loss {check:.6g}"
            log(f"  {name:14s} {impl:17s} {row['median']:>14,.0f} {UNITS[case]} (compile {t.compile_s:.2f} s, {loss})")
        rows += [
            _check_loss(case_rows[impl], case_rows.get("raw-jax", {}).get("check_loss"), case, c)
            for impl, _, _ in impls
        ]
    return rows


def _check_loss(row, ref, case, c):
    """The row with its loss check against raw JAX's (``ref``) noted."""
    if row.get("status") != "ok":
        return row
    check = row["check_loss"]
    if check is None:
        row["note"] = "no loss check (members alone equal vmapped members: tests/test_members.py)"
    elif ref is not None:
        rtol = CHECK_RTOL_BF16 if c.get("dtype") == "bfloat16" else CHECK_RTOL[case]
        diff = abs(check - ref) / max(abs(ref), 1e-12)
        row.update(check_ref=ref, check_rel_diff=diff, check_rtol=rtol, check_ok=diff <= rtol)
        if diff > rtol:
            row["note"] = f"LOSS MISMATCH: {check!r} vs raw JAX {ref!r} (rel {diff:.2e} > {rtol:g})"
    return row


def _failed(row, error, log, name):
    """Marks ``row`` as an error with the exception's first line, and logs it with its traceback."""
    row.update(status="error", note=f"{type(error).__name__}: {error}".splitlines()[0][:300])
    log(f"  {name:14s} {row['impl']:17s} ERROR {row['note']}")
    traceback.print_exc(file=sys.stderr)


def _add_tflops(row):
    """TFLOP/s of the row's median and its fractions of the matmul peak: the median over repeats
    of each repeat's rate over the peak timed beside it (their medians' ratio if unpaired)."""
    peaks = row["peak_repeats"]
    row["peak_tflops"] = statistics.median(peaks)
    for suffix, key in (("", "flops_per_example"), ("_executed", "flops_executed_per_example")):
        row["tflops" + suffix] = row["median"] * row[key] / 1e12
        if len(peaks) == len(row["rates"]):
            row["frac_peak" + suffix] = statistics.median(r * row[key] / 1e12 / p for r, p in zip(row["rates"], peaks))
        else:
            row["frac_peak" + suffix] = row["tflops" + suffix] / row["peak_tflops"]


def merge_rounds(rounds):
    """One row per (case, implementation) from several rounds of a case: the repeats of every
    round pooled in order (median, min, max over all of them; paired repeats stay paired, see
    :func:`ratio`), and ``round_medians`` with each round's median."""
    if len(rounds) == 1:
        return rounds[0]
    merged, by_key = [], {}
    for rows in rounds:
        for r in rows:
            key = (r["case"], r["impl"])
            if key not in by_key:
                by_key[key] = dict(
                    r,
                    round_medians=[r["median"]] if r.get("status") == "ok" else [],
                    round_compile_s=[r["compile_s"]] if r.get("compile_s") is not None else [],
                )
                merged.append(by_key[key])
                continue
            m = by_key[key]
            if r.get("status") != "ok" or m.get("status") != "ok":
                if (r.get("status"), r.get("note")) != (m.get("status"), m.get("note")):
                    m["note"] = (
                        m.get("note", "") + f" (a later round: {r.get('status')}: {r.get('note', '')})"
                    ).strip()
                continue
            m["rates"] = m["rates"] + r["rates"]
            m["round_medians"].append(r["median"])
            if "peak_repeats" in r:
                m["peak_repeats"] = m["peak_repeats"] + r["peak_repeats"]
            m["round_compile_s"] += [r["compile_s"]] if r.get("compile_s") is not None else []
    for m in merged:
        if m.get("status") != "ok":
            continue
        m.update(median=statistics.median(m["rates"]), min=min(m["rates"]), max=max(m["rates"]))
        if m["round_compile_s"]:
            m["compile_s"] = statistics.median(m["round_compile_s"])
        if "peak_repeats" in m:
            _add_tflops(m)
    return merged


def ratio(a, b):
    """``a``'s throughput over ``b``'s: for two rows of one case with the same number of repeats,
    the median of the ratios of paired repeats (repeat i of both ran back to back, so that a shared
    machine's drift cancels); otherwise the ratio of the medians."""
    ra, rb = a.get("rates") or [], b.get("rates") or []
    if ra and len(ra) == len(rb) and a.get("case") == b.get("case"):
        return statistics.median(x / y for x, y in zip(ra, rb))
    return a["median"] / b["median"]


def _jsonable(cfg):
    return {k: ({str(b): s for b, s in v.items()} if isinstance(v, dict) else v) for k, v in cfg.items()}


def run_train_cli(log):
    """Time from process start to the end of the first epoch of ``jaxnet train`` (a subprocess)."""
    row = {
        "case": "train-cli",
        "impl": "jaxnet",
        "unit": "s",
        "how": "jaxnet train --epochs 1 --quiet --json",
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jaxnet.app", "train"]
    probe = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    if probe.returncode != 0:
        row.update(
            status="skipped",
            note="`jaxnet train` is not available yet: "
            + (probe.stderr.strip().splitlines() or ["no output"])[-1][:200],
        )
        log(f"  train-cli skipped: {row['note']}")
        return [row]
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run(
            cmd + ["--epochs", "1", "--quiet", "--json", "--out", out],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=600,
        )
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        row.update(status="error", note=(proc.stderr.strip().splitlines() or ["no output"])[-1][:300])
    else:
        row.update(
            status="ok",
            median=seconds,
            min=seconds,
            max=seconds,
            rates=[seconds],
            compile_s=None,
            note="wall time of the whole command: start-up, data, compilation and one epoch",
        )
        try:
            row["result"] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    log(f"  train-cli {row.get('median', float('nan')):.2f} s ({row['status']})")
    return [row]


def add_ratios(rows):
    by = {(r["case"], r["impl"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok" or r["case"] == "train-cli":
            continue
        for ref, key in (("raw-jax", "vs_raw_jax"), ("torch", "vs_torch")):
            if (r["case"], ref) in by:
                r[key] = ratio(r, by[(r["case"], ref)])


def targets(rows, backend):
    """Issue targets, each (name, measured value, threshold, met)."""
    get = {(r["case"], r["impl"]): r for r in rows if r.get("status") == "ok"}
    out = []

    def case_ratio(case, a, b):
        if (case, a) in get and (case, b) in get:
            return ratio(get[(case, a)], get[(case, b)])
        return None

    for case in sorted({r["case"] for r in rows if r["case"] != "train-cli"}):
        v = case_ratio(case, "jaxnet", "raw-jax")
        if v is not None:
            out.append((f"{case}: jaxnet / raw JAX", v, 0.95 if case != "fit-epoch" else 0.90))
    # Issue targets for K members in one program, against one copy's fit and the PyTorch loop of the
    # same network (the seed-sgd rows of this same run: same network, SGD, one example per step).
    ens, single = get.get(("ensemble", "jaxnet")), get.get(("seed-sgd", "jaxnet"))
    torch_loop = get.get(("seed-sgd", "torch"))
    if ens and single:
        out.append(
            (
                "ensemble: jaxnet model-steps/s / one copy's fit (seed-sgd jaxnet)",
                ratio(ens, single),
                3 if backend == "cpu" else 1000,
            )
        )
    if ens and torch_loop and backend == "cpu":
        out.append(("ensemble: jaxnet model-steps/s / PyTorch loop (seed-sgd torch)", ratio(ens, torch_loop), 10_000))
    v = case_ratio("seed-sgd", "jaxnet-shuffled", "raw-jax-shuffled")
    if v is not None:
        out.append(("seed-sgd: jaxnet-shuffled / raw-jax-shuffled", v, 0.95))
    cpu = backend == "cpu"
    for name, v, t in [
        ("seed-sgd: jaxnet / PyTorch eager", case_ratio("seed-sgd", "jaxnet", "torch"), 2000 if cpu else 100),
        ("seed-sgd: jaxnet / Equinox", case_ratio("seed-sgd", "jaxnet", "equinox"), 1000 if cpu else None),
        (
            "mlp784-b128: jaxnet / PyTorch eager",
            case_ratio("mlp784-b128", "jaxnet", "torch"),
            1.6 if cpu else None,
        ),
        (
            "mlp784-b1024: jaxnet / PyTorch eager",
            case_ratio("mlp784-b1024", "jaxnet", "torch"),
            None if cpu else 15,
        ),
    ]:
        if v is not None and t is not None:
            out.append((name, v, t))
    r = get.get(("mlp784-b1024", "jaxnet"))
    if cpu and r:
        out.append(("mlp784-b1024: jaxnet executed FLOP/s / matmul peak", r["frac_peak_executed"], 0.85))
    r = get.get(("wide", "jaxnet"))
    if r and not cpu:
        out.append(("wide: jaxnet / matmul peak", r["frac_peak"], 0.90))
    return [{"target": n, "measured": v, "threshold": t, "met": v >= t} for n, v, t in out]


def _fmt(v):
    if v >= 1e6:
        return f"{v / 1e6:.3g}M"
    if v >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


def markdown(env, rows, tgts):
    v = env["versions"]
    lines = [
        f"# jaxnet benchmarks: {env['device']}",
        "",
        f"Suite `{env['suite']}`, {env['date']}, backend {env['backend']}. "
        + ", ".join(f"{k} {v[k]}" for k in v if v[k])
        + ".",
        f"Flags: `{json.dumps(env['flags'])}`. Load average at start: {env.get('loadavg_start')}.",
        "",
        "Throughput is the median over repeats (min–max in brackets); compilation is excluded and shown apart.",
        "Repeats are interleaved: repeat i of every implementation of a case runs before repeat i + 1 of any."
        + (
            f" Each case ran {env['rounds']} rounds back to back (every implementation recompiled each round); "
            "their repeats are pooled."
            if env.get("rounds", 1) > 1
            else ""
        ),
        "Ratios are against raw JAX and PyTorch eager in this same run: the median of the ratios of paired "
        "repeats. `loss check`: relative difference of the",
        "loss after a fixed number of steps from the same weights and data, against raw JAX.",
        "",
        "| case | implementation | throughput (min–max) | unit | vs raw JAX | vs PyTorch | TFLOP/s | of peak "
        "| compile s | loss check | how / note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['impl']} | — | | | | | | | | {r['status']}: {r.get('note', '')} |")
            continue
        tf = f"{r['tflops']:.3g}" if "tflops" in r else ""
        if "tflops_executed" in r and r["case"].startswith("mlp784"):
            tf += f" ({r['tflops_executed']:.3g} exec.)"
        frac = f"{100 * r['frac_peak']:.0f}%" if "frac_peak" in r else ""
        if "frac_peak_executed" in r and r["case"].startswith("mlp784"):
            frac += f" ({100 * r['frac_peak_executed']:.0f}%)"
        check = ""
        if "check_rel_diff" in r:
            check = f"{r['check_rel_diff']:.1e} {'ok' if r['check_ok'] else 'MISMATCH'}"
        comp = f"{r['compile_s']:.2f}" if r.get("compile_s") is not None else ""
        thr = (
            f"{_fmt(r['median'])} ({_fmt(r['min'])}–{_fmt(r['max'])})"
            if r["case"] != "train-cli"
            else f"{r['median']:.2f}"
        )
        vs_raw = f"{r['vs_raw_jax']:.3g}x" if "vs_raw_jax" in r else ""
        vs_t = f"{r['vs_torch']:.3g}x" if "vs_torch" in r else ""
        note = r.get("how", "") + (f"; {r['note']}" if r.get("note") else "")
        lines.append(
            f"| {r['case']} | {r['impl']} | {thr} | {r['unit']} | {vs_raw} | {vs_t} | {tf} | {frac} "
            f"| {comp} | {check} | {note} |"
        )
    peaks = {r["case"]: r["peak_tflops"] for r in rows if "peak_tflops" in r}
    if peaks:
        lines += [
            "",
            "Matmul peak measured in this run, timed among the implementations (jitted matmuls of the "
            "case's sizes and dtype, the best shape per repeat, median over repeats); `of peak` is the median "
            "over repeats of each repeat's rate over the peak beside it: "
            + ", ".join(f"{c} {p:.3g} TFLOP/s" for c, p in peaks.items())
            + ". For mlp784 the bracketed TFLOP/s counts the FLOPs actually executed "
            "(no gradient with respect to the inputs).",
        ]
    if tgts:
        lines += ["", "## Targets", "", "| target | measured | threshold | met |", "|---|---:|---:|---|"]
        for t in tgts:
            lines.append(
                f"| {t['target']} | {t['measured']:.3g} | {t['threshold']:g} | {'yes' if t['met'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def chart(env, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in dict.fromkeys(r["case"] for r in rows) if c != "train-cli"]
    cases = [c for c in cases if any(r["case"] == c and r["status"] == "ok" for r in rows)]
    if not cases:
        return False
    fig, axes = plt.subplots(
        len(cases),
        1,
        figsize=(
            9,
            1.0 + 0.45 * sum(1 for r in rows if r["case"] in cases and r["status"] == "ok") + 0.6 * len(cases),
        ),
        squeeze=False,
    )
    for ax, case in zip(axes[:, 0], cases):
        ok = [r for r in rows if r["case"] == case and r["status"] == "ok"]
        names = [r["impl"] for r in ok]
        med = [r["median"] for r in ok]
        err = [[m - r["min"] for m, r in zip(med, ok)], [r["max"] - m for m, r in zip(med, ok)]]
        colors = [
            "tab:green" if n.startswith("jaxnet") else "tab:gray" if n.startswith("raw") else "tab:blue" for n in names
        ]
        ax.barh(names, med, xerr=err, color=colors)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"{case} ({ok[0]['unit']}, higher is better)", fontsize=9)
        ax.tick_params(labelsize=8)
        for y, m in enumerate(med):
            ax.text(m, y, " " + _fmt(m), va="center", fontsize=7)
    fig.suptitle(f"jaxnet benchmarks: {env['device']}, {env['date'][:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title above the first plot
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--impls", nargs="+", help="implementations to run (raw JAX always runs: it is the reference)")
    parser.add_argument("--json", type=Path, help="also write the JSON rows to this file")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which remaining cases are skipped (noted in the output)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each case this many times back to back and pool the repeats; ratios are then "
        "medians of per-round ratios (steadier on a shared, noisy machine)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply step counts and repeats' work by this (e.g. 0.05 for a smoke run)",
    )
    args = parser.parse_args(argv)

    began = time.perf_counter()
    env = environment(args.suite)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"jaxnet bench: suite {args.suite} on {env['device']} ({env['backend']}); versions {env['versions']}")
    sizes = SUITES[args.suite]["cpu" if env["backend"] == "cpu" else "accel"]
    wanted = set(args.impls) if args.impls else None
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rows = []
    for case in args.cases:
        if args.time_limit is not None and time.perf_counter() - began > args.time_limit:
            rows.append(
                {
                    "case": case,
                    "impl": "-",
                    "unit": "",
                    "status": "skipped",
                    "note": f"time limit of {args.time_limit:g} s reached",
                }
            )
            log(f"{case}: skipped, time limit reached")
            continue
        if case == "train-cli":  # one wall time of a fresh process: rounds would only repeat it
            log(f"{case}:")
            rows += run_train_cli(log)
            continue
        # The rounds of a case run back to back, so that the implementations a ratio pairs are
        # measured seconds apart, not minutes (a shared machine's load drifts in between).
        rounds = []
        for round_index in range(args.rounds):
            log(f"{case}:" + (f" round {round_index + 1} of {args.rounds}" if args.rounds > 1 else ""))
            rounds.append(
                run_case(
                    case,
                    scaled(sizes[case], args.scale),
                    args.suite,
                    wanted,
                    env,
                    log,
                    reverse=round_index % 2 == 1,
                )
            )
        rows += merge_rounds(rounds)
    env["rounds"] = args.rounds
    add_ratios(rows)
    tgts = targets(rows, env["backend"])
    env["seconds"] = time.perf_counter() - began
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{env['slug']}-{env['date'][:10]}"
    md = markdown(env, rows, tgts)
    payload = {"environment": env, "rows": rows, "targets": tgts}
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    drew = chart(env, rows, stem.with_suffix(".png"))
    print()
    print(md)
    print(f"wrote {stem}.md, {stem}.json" + (f", {stem}.png" if drew else "") + f" in {env['seconds']:.0f} s")
    return 0


def scaled(cfg, scale):
    if scale == 1.0:
        return cfg
    out = dict(cfg)
    for key in ("steps", "loop_steps"):
        if key in out:
            out[key] = max(1, int(out[key] * scale))
    if "batches" in out:
        out["batches"] = {b: max(1, int(s * scale)) for b, s in out["batches"].items()}
    if "k" in out:
        out["k"] = max(2, int(out["k"] * scale))
    out["repeats"] = max(2, min(out["repeats"], int(out["repeats"] * scale) + 2))
    out["min_seconds"] = out.get("min_seconds", 0.0) * scale
    return out


if __name__ == "__main__":
    sys.exit(main())
