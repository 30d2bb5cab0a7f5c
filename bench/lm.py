"""A character GPT trained three ways from the same weights: jaxnet, hand-written JAX, PyTorch.

The model and recipe are nanoGPT's CPU run of character-level Shakespeare (4 layers, 4 heads, width
128, context 64, batch 12, AdamW 1e-3 with beta2 0.99, weight decay 0.1 off biases, norms and
embeddings, clipping at 1, 100 warmup steps then a cosine to 1e-4), on the text given with
``--data`` (a synthetic text when none is), its last 10% held out:

- ``jaxnet``: ``jn.gpt`` trained by ``jn.fit(steps=...)`` on ``jaxnet.text.windows`` of the token file
  (a memory map read in a background thread), the seconds it reports for each round of steps;
- ``raw-jax``: the same GPT hand-written in JAX, a donated ``jax.jit`` step called from a Python loop
  on batches drawn at random offsets on the host (as nanoGPT's JAX ports do);
- ``torch``: nanoGPT's GPT written in PyTorch (``nn.Linear`` without biases, tied head,
  ``F.scaled_dot_product_attention``), eager, with ``torch.optim.AdamW`` and its ``LambdaLR``
  schedule; ``torch-compile`` with ``--compile``.

All start from the same weights (jaxnet's initialization copied into the others), checked by
equal losses on one batch at step 0. Rounds are interleaved: after each round of ``--steps``
jaxnet steps (timed by ``fit``), a callback runs the same number of steps of every other
implementation. Reported: median tokens/s over the rounds after the first (which compiles),
ratios of medians, and each one's validation loss after the same number of steps.

    python bench/lm.py [--data FILE.txt] [--rounds 8] [--steps 50] [--dim 128] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxnet as jn  # noqa: E402
from jaxnet import text  # noqa: E402

LR, MIN_LR, WARMUP, BETA2, DECAY, CLIP = 1e-3, 1e-4, 100, 0.99, 0.1, 1.0


def tokens_of(path: str | None, folder: Path):
    """The text's tokens (char tokenizer) in a token file, and the vocabulary size."""
    if path is None:  # a synthetic text: words of a small alphabet
        rng = np.random.default_rng(0)
        words = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 8))) for _ in range(500)]
        corpus = folder / "synthetic.txt"
        corpus.write_text(" ".join(rng.choice(words, 200_000)))
        path = str(corpus)
    tokenizer = text.CharTokenizer.fit(text.read_text(path))
    return text.tokenize_files([path], tokenizer, folder / "tokens.bin"), tokenizer.vocab_size


def schedule(total: int):
    """nanoGPT's learning rate: linear warmup, then a cosine from LR to MIN_LR."""

    def rate(step):
        warm = LR * step / WARMUP
        ratio = jnp.clip((step - WARMUP) / max(total - WARMUP, 1), 0.0, 1.0)
        cosine = MIN_LR + 0.5 * (1 + jnp.cos(jnp.pi * ratio)) * (LR - MIN_LR)
        return jnp.where(step < WARMUP, warm, cosine)

    return rate


def optax_adamw(total: int):
    adamw = optax.adamw(schedule(total), b2=BETA2, weight_decay=DECAY, mask=jn.decay_mask)
    return optax.chain(optax.clip_by_global_norm(CLIP), adamw)


# ----------------------------------------------------------------------------- hand-written JAX


def _norm(x, scale):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale


def unstacked(params):
    """jaxnet's GPT params with its stacked blocks as a list of per-layer dicts (a hand-written layout)."""
    blocks = params["blocks"]
    if isinstance(blocks, list):
        return params
    layers = len(jax.tree.leaves(blocks)[0])
    return dict(params, blocks=[jax.tree.map(lambda a: a[i], blocks) for i in range(layers)])


def raw_forward(params, ids, heads):
    """The GPT of ``jn.gpt(bias=False)``, hand-written: ids ``(B, T)`` -> logits ``(B, T, V)``."""
    b, t = ids.shape
    x = params["embed"]["table"][ids] + params["pos"]["table"][:t][None]
    for p in params["blocks"]:
        h = _norm(x, p["ln1"]["scale"])
        q, k, v = (jnp.reshape(h @ p["attn"][n]["w"], (b, t, heads, -1)) for n in "qkv")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, -1)
        x = x + out @ p["attn"]["o"]["w"]
        hidden = jax.nn.gelu(_norm(x, p["ln2"]["scale"]) @ p["mlp"]["fc"]["w"], approximate=True)
        x = x + hidden @ p["mlp"]["proj"]["w"]
    return _norm(x, params["ln_f"]["scale"]) @ params["embed"]["table"].T


def raw_loss(params, x, y, heads):
    logits = raw_forward(unstacked(params), x, heads)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class RawJax:
    """A donated jitted step from a Python loop, batches drawn on the host."""

    def __init__(self, params, heads: int, total: int, batch: int, context: int, tokens, seed: int):
        self.opt = optax_adamw(total)
        params = unstacked(params)  # its own layout: a list of blocks
        self.state = (jax.tree.map(jnp.array, params), self.opt.init(params))
        self.heads, self.batch, self.context, self.tokens = heads, batch, context, tokens
        self.rng = np.random.default_rng(seed)

        def step(state, x, y):
            params, opt_state = state
            loss, grads = jax.value_and_grad(raw_loss)(params, x, y, heads)
            updates, opt_state = self.opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        self.step = jax.jit(step, donate_argnums=(0,))

    def batch_of(self):
        starts = self.rng.integers(0, len(self.tokens) - self.context - 1, self.batch)
        x = np.stack([self.tokens[s : s + self.context] for s in starts]).astype(np.int32)
        y = np.stack([self.tokens[s + 1 : s + self.context + 1] for s in starts]).astype(np.int32)
        return x, y

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, loss = self.step(self.state, *self.batch_of())
        loss.block_until_ready()
        return time.perf_counter() - start

    def params(self):
        return self.state[0]


# ----------------------------------------------------------------------------- PyTorch


def torch_gpt(params, vocab: int, context: int, layers: int, heads: int, dim: int):
    """nanoGPT's GPT (bias=False, tied head, tanh GELU as jaxnet's) holding ``params``' weights."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.o = nn.Linear(dim, dim, bias=False)
            self.fc, self.proj = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (a.view(b, t, heads, d // heads).transpose(1, 2) for a in self.qkv(self.ln1(x)).split(d, 2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.o(y)
            return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
            self.blocks = nn.ModuleList([Block() for _ in range(layers)])
            self.ln_f = nn.LayerNorm(dim, bias=False)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    model = GPT()
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    with torch.no_grad():
        model.wte.weight.copy_(t(params["embed"]["table"]))
        model.wpe.weight.copy_(t(params["pos"]["table"]))
        model.ln_f.weight.copy_(t(params["ln_f"]["scale"]))
        for block, p in zip(model.blocks, unstacked(params)["blocks"]):
            block.ln1.weight.copy_(t(p["ln1"]["scale"]))
            block.ln2.weight.copy_(t(p["ln2"]["scale"]))
            block.qkv.weight.copy_(t(np.concatenate([np.asarray(p["attn"][n]["w"]) for n in "qkv"], 1).T))
            block.o.weight.copy_(t(np.asarray(p["attn"]["o"]["w"]).T))
            block.fc.weight.copy_(t(np.asarray(p["mlp"]["fc"]["w"]).T))
            block.proj.weight.copy_(t(np.asarray(p["mlp"]["proj"]["w"]).T))
    return model


class Torch:
    """nanoGPT's training step in PyTorch: AdamW with decay on the matrices, clipping, LambdaLR."""

    def __init__(self, params, dims, total: int, batch: int, tokens, seed: int, compiled: bool = False):
        import torch

        self.torch = torch
        self.model = torch_gpt(params, *dims)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and not n.startswith(("wte", "wpe"))]
        rest = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and not n.startswith(("wte", "wpe")))]
        groups = [{"params": decay, "weight_decay": DECAY}, {"params": rest, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, BETA2))
        rate = schedule(total)
        self.lr = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: float(rate(step)) / LR)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.batch, self.context, self.tokens = batch, dims[1], tokens
        self.rng = np.random.default_rng(seed)

    def batch_of(self):
        starts = self.rng.integers(0, len(self.tokens) - self.context - 1, self.batch)
        x = np.stack([self.tokens[s : s + self.context] for s in starts]).astype(np.int64)
        y = np.stack([self.tokens[s + 1 : s + self.context + 1] for s in starts]).astype(np.int64)
        return self.torch.from_numpy(x), self.torch.from_numpy(y)

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.forward(*self.batch_of())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            self.opt.step()
            self.lr.step()
        return time.perf_counter() - start

    def loss(self, x, y) -> float:
        with self.torch.no_grad():
            return float(
                self.model(self.torch.from_numpy(x.astype(np.int64)), self.torch.from_numpy(y.astype(np.int64)))
            )


# ----------------------------------------------------------------------------- the race


def validation_loss(params, val, heads) -> float:
    x, y = val.read(np.arange(val.num_rows))
    return float(jax.jit(raw_loss, static_argnums=3)(params, x, y, heads))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a text file (default: a synthetic text)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="steps per round")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also torch.compile")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for model FLOPs utilization (MFU)")
    parser.add_argument("--json", help="write the results here (and the table beside it, .txt)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="jaxnet-bench-lm-"))
    tokens, vocab = tokens_of(args.data, folder)
    train, held = text.split_tokens(tokens, 0.1)
    val = text.windows(held, args.context, stride=args.context, limit=20 * args.batch)
    total = args.rounds * args.steps
    net = jn.gpt(vocab, args.context, args.layers, args.heads, args.dim)
    params, state = net.init(jax.random.key(0))
    dims = (vocab, args.context, args.layers, args.heads, args.dim)

    others = {"raw-jax": RawJax(params, args.heads, total, args.batch, args.context, train, seed=1)}
    if not args.no_torch:
        others["torch"] = Torch(params, dims, total, args.batch, train, seed=2)
        if args.compile:
            others["torch-compile"] = Torch(params, dims, total, args.batch, train, seed=3, compiled=True)

    # the same weights everywhere: equal losses on one batch at step 0
    x0, y0 = val.read(np.arange(args.batch))
    start_loss = {"jaxnet": float(jn.make_loss_fn(net, "softmax_cross_entropy")(params, (x0, y0), state)[0])}
    start_loss["raw-jax"] = float(raw_loss(params, x0, y0, args.heads))
    start_loss.update({name: impl.loss(x0, y0) for name, impl in others.items() if isinstance(impl, Torch)})
    for name, value in start_loss.items():
        assert abs(value - start_loss["jaxnet"]) < 1e-4 * max(1.0, abs(value)), (name, start_loss)

    seconds: dict[str, list[float]] = {name: [] for name in ("jaxnet", *others)}
    for impl in others.values():  # compile (or warm up) outside the timed rounds
        impl.run(1)

    def race(fit_state, record):  # after each jaxnet round: the same steps of every other one
        seconds["jaxnet"].append(record["seconds"] - record.get("val_seconds", 0.0))
        names = list(others) if len(seconds["jaxnet"]) % 2 else list(reversed(others))
        for name in names:
            seconds[name].append(others[name].run(args.steps))

    result = jn.fit(
        net, params, text.windows(train, args.context), None, loss="softmax_cross_entropy",
        optimizer=optax_adamw(total), steps=total, eval_every=args.steps, batch_size=args.batch,
        key=jax.random.key(1), model_state=state, callbacks=[race],
    )  # fmt: skip
    per_round = args.steps * args.batch * args.context
    rates = {name: [per_round / s for s in times[1:]] for name, times in seconds.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    n_params = sum(x.size for x in jax.tree.leaves(params))
    # training FLOPs per token (PaLM's count): 6 per weight, and 12 * layers * context * width for attention
    flops_per_token = 6 * n_params + 12 * args.layers * args.context * args.dim
    losses = {"jaxnet": validation_loss(result.train.params, val, args.heads)}
    losses["raw-jax"] = validation_loss(others["raw-jax"].params(), val, args.heads)
    x_val, y_val = val.read(np.arange(val.num_rows))
    losses.update({name: impl.loss(x_val, y_val) for name, impl in others.items() if isinstance(impl, Torch)})

    lines = [
        f"lm: GPT {args.layers} layers x {args.dim} wide, {args.heads} heads, context {args.context}, batch "
        f"{args.batch}, vocab {vocab}, {sum(x.size for x in jax.tree.leaves(params)):,} parameters; "
        f"{args.rounds} rounds of {args.steps} steps, the first left out",
        "step-0 loss on one batch: " + ", ".join(f"{n} {v:.6f}" for n, v in start_loss.items()),
        "",
        f"{'impl':<14}{'tokens/s (median)':>20}{'jaxnet / impl':>16}{f'val loss @ {total}':>18}{'TFLOP/s':>10}"
        + (f"{'MFU':>8}" if args.peak_tflops else ""),
    ]
    for name in seconds:
        ratio, tflops = medians["jaxnet"] / medians[name], medians[name] * flops_per_token / 1e12
        mfu = f"{tflops / args.peak_tflops:>8.1%}" if args.peak_tflops else ""
        lines.append(f"{name:<14}{medians[name]:>20,.0f}{ratio:>16.2f}{losses[name]:>18.4f}{tflops:>10.3f}{mfu}")
    env = {
        "date": datetime.date.today().isoformat(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "torch": __import__("torch").__version__ if not args.no_torch else None,
        "load": os.getloadavg(),
    }
    lines += ["", " ".join(f"{k}={v}" for k, v in env.items())]
    table = "\n".join(lines)
    print(table)
    if args.json:
        import json

        out = {"config": vars(args), "env": env, "start_loss": start_loss, "tokens_per_second": rates}
        out.update(medians=medians, val_loss=losses)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        Path(args.json).with_suffix(".txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
