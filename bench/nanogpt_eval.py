"""nanoGPT's own checkpoint, scored on the validation windows ``jaxnet train --task lm`` uses.

nanoGPT's README quotes "a loss of only 1.88" for its CPU recipe. Its train.py estimates the
validation loss from ``eval_iters`` (20 on CPU) random batches of 12 windows, redrawn at each
evaluation. This script loads the ``ckpt.pt`` that nanoGPT's train.py wrote and scores it three ways
on nanoGPT's own ``val.bin`` (the last 10% of the text): every disjoint window of the context, the
``eval_batches * batch_size`` windows spread evenly over the text that a jaxnet run of the same
recipe validates on (``jaxnet.text.windows(limit=...)``), and several redraws of nanoGPT's random
estimate, to show its spread.

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \\
      --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \\
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0          # in a nanoGPT checkout
    python bench/nanogpt_eval.py --nanogpt NANOGPT_DIR [--json FILE]

Needs torch and a nanoGPT checkout (its ``model.py``); neither is a dependency of jaxnet.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np


def score(model, torch, val: np.ndarray, offsets: np.ndarray, context: int) -> float:
    """The mean token loss of ``model`` over the windows of ``val`` at ``offsets``."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(offsets), 100):
            part = offsets[i : i + 100]
            x = torch.tensor(np.stack([val[j : j + context] for j in part]))
            y = torch.tensor(np.stack([val[j + 1 : j + context + 1] for j in part]))
            total += model(x, y)[1].item() * len(part)
    return total / len(offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", required=True, help="a nanoGPT checkout where train.py has run")
    parser.add_argument("--out-dir", default="out-shakespeare-char", help="its out_dir, inside the checkout")
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--redraws", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(args.nanogpt)
    sys.path.insert(0, str(root))
    import torch
    from model import GPT, GPTConfig

    saved = torch.load(root / args.out_dir / "ckpt.pt", map_location="cpu")
    model = GPT(GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    context = saved["model_args"]["block_size"]
    val = np.fromfile(root / "data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64)
    rows = (len(val) - context - 1) // context + 1
    limit = args.eval_batches * args.batch_size
    rng = np.random.default_rng(0)
    result = {
        "iter": saved["iter_num"],
        "nanogpt_best_val_loss": float(saved["best_val_loss"]),
        "every_disjoint_window": score(model, torch, val, np.arange(rows) * context, context),
        "jaxnet_validation_windows": score(model, torch, val, np.arange(limit) * context * (rows // limit), context),
        "random_estimates": [
            score(model, torch, val, rng.integers(0, len(val) - context, limit), context) for _ in range(args.redraws)
        ],
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
