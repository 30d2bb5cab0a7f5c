"""PyTorch eager (``nn.Module`` + ``torch.optim``) and ``torch.compile`` of the model, per the PyTorch docs."""

from __future__ import annotations

import time

import numpy as np

from bench import common

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    torch = None
    _IMPORT_ERROR = str(e)


def _require(compiled=False):
    if torch is None:
        raise common.Skip(f"torch not importable ({_IMPORT_ERROR}); pip install -e '.[bench]'")
    if compiled and not torch.cuda.is_available() and not __import__("shutil").which("g++"):
        raise common.Skip("torch.compile on CPU needs a C++ compiler (g++)")


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mlp(params, hidden, out=None, dtype=None):
    """``nn.Sequential`` of Linear layers initialised from ``(in, out)`` numpy weights."""
    layers = []
    for i, p in enumerate(params):
        lin = torch.nn.Linear(*p["w"].shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["w"].T)))
            lin.bias.copy_(torch.from_numpy(p["b"]))
        layers.append(lin)
        act = hidden if i < len(params) - 1 else out
        if act is not None:
            layers.append(act())
    model = torch.nn.Sequential(*layers).to(device())
    return model.to(dtype) if dtype is not None else model


def _maybe_compile(model, compiled):
    return torch.compile(model) if compiled else model


def _train_loop(model, opt, loss_fn, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return loss


def _check_steps(model, opt, loss_fn, batch, steps):
    """``steps`` steps on one batch; returns the first step's time minus the second's: the
    compilation of a ``torch.compile`` model (compiled graphs are cached for the timed copy)."""
    seconds = []
    for _ in range(min(steps, 2)):
        start = time.perf_counter()
        _train_loop(model, opt, loss_fn, [batch])
        _sync()
        seconds.append(time.perf_counter() - start)
    _train_loop(model, opt, loss_fn, [batch] * (steps - 2))
    return max(seconds[0] - seconds[-1], 0.0)


def _half_sse(y, t):
    return 0.5 * ((y - t) ** 2).sum()


def seed_sgd(cfg, compiled=False):
    _require(compiled)
    dev = device()
    model = _maybe_compile(_mlp(common.seed_params(), torch.nn.Sigmoid, torch.nn.Sigmoid), compiled)
    opt = torch.optim.SGD(model.parameters(), lr=common.SEED_LR)
    x0, t0 = torch.from_numpy(common.SEED_X).to(dev), torch.from_numpy(common.SEED_T).to(dev)
    compile_s = _check_steps(model, opt, _half_sse, (x0, t0), cfg["check_steps"])
    with torch.no_grad():
        check = float(_half_sse(model(x0), t0))

    model = _maybe_compile(_mlp(common.seed_params(), torch.nn.Sigmoid, torch.nn.Sigmoid), compiled)
    opt = torch.optim.SGD(model.parameters(), lr=common.SEED_LR)
    xs, ts = common.seed_stream(cfg["loop_steps"])
    batches = list(zip(torch.from_numpy(xs).to(dev).unbind(0), torch.from_numpy(ts).to(dev).unbind(0)))

    def run():
        _train_loop(model, opt, _half_sse, batches)
        _sync()

    first = (lambda: (_train_loop(model, opt, _half_sse, batches[:2]), _sync())) if compiled else run
    return check, common.time_calls(first, run, len(batches), cfg["repeats"], compile_s=compile_s if compiled else None)


def _problem(case, cfg):
    if case == "wide":
        sizes = [cfg["width"]] * 5
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.get("dtype", "float32")]

        def make():
            return _mlp(common.mlp_params(sizes), torch.nn.ReLU, None, dtype), dtype

        def loss(p, y):
            return ((p.float() - y) ** 2).mean()

        return make, loss, lambda m: torch.optim.SGD(m.parameters(), lr=cfg["lr"]), common.regression_data
    sizes = cfg["sizes"]
    make = lambda: (_mlp(common.mlp_params(sizes), torch.nn.ReLU), torch.float32)  # noqa: E731
    loss = torch.nn.CrossEntropyLoss()
    return make, loss, lambda m: torch.optim.Adam(m.parameters(), lr=cfg["lr"]), common.classification_data


def _tensors(x, y, dtype):
    dev = device()
    xt = torch.from_numpy(x).to(dev, dtype)
    yt = torch.from_numpy(y).to(dev)
    return xt, (yt.long() if yt.dtype == torch.int32 else yt)


def minibatch(case, cfg, compiled=False):
    _require(compiled)
    make, loss_fn, make_opt, data = _problem(case, cfg)
    sizes = [cfg["width"]] * 5 if case == "wide" else cfg["sizes"]
    model, dtype = make()
    model = _maybe_compile(model, compiled)
    opt = make_opt(model)
    x, y = data(cfg["check_batch"], sizes[0], sizes[-1], 1)
    batch = _tensors(x, y, dtype)
    compile_s = _check_steps(model, opt, loss_fn, batch, cfg["check_steps"])
    with torch.no_grad():
        check = float(loss_fn(model(batch[0]), batch[1]))

    b, steps = cfg["batch"], cfg["steps"]
    model, dtype = make()
    model = _maybe_compile(model, compiled)
    opt = make_opt(model)
    x, y = data(b * steps, sizes[0], sizes[-1], 0)
    xt, yt = _tensors(x, y, dtype)
    batches = list(zip(xt.split(b), yt.split(b)))

    def run():
        _train_loop(model, opt, loss_fn, batches)
        _sync()

    return check, common.time_calls(
        run, run, b * steps, cfg["repeats"], cfg["min_seconds"], compile_s=compile_s if compiled else None
    )
