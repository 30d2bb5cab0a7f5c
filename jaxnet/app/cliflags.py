"""The command-line flags of ``jaxnet train``'s config, generated from one table of its fields.

:data:`CONFIG_FLAGS` has one entry per :class:`jaxnet.app.config.TrainConfig` field that the command line
sets (``tests/test_cli.py`` checks that the names and kinds match the dataclass): its help group,
kind, metavar and help. :func:`add_flags` turns the table into argparse options (``--name-with-dashes``
and the kind's parser) and :func:`given` the parsed arguments back into config
fields (None: not given), so that a field is added to the CLI by one line here. A small generator of
our own rather than tyro or jsonargparse: the config is flat, argparse is already the parser, and
the one-line errors (``jaxnet: error: --epochs must be ...``) stay ours. Each flag's help ends with
the field's default and the built-in datasets' presets, read from :mod:`jaxnet.app.configfields`; the
module imports no JAX, so ``--help`` stays fast. ``--print-config`` prints a run's resolved config.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from jaxnet.app.configfields import PRESETS, ConfigFields


class Flag(NamedTuple):
    """One field's flag: its help ``group``, ``kind`` (``str``, ``int``, ``number``, ``ints``,
    ``names``, ``switch`` or ``numbers``: a list that sets the field, or with several values its
    plural field), ``metavar`` and ``help``."""

    group: str
    kind: str
    metavar: str | None
    help: str


DATA, MODEL, RECIPE, LM = "data", "model and training", "optimizer and schedule", "language models (--task lm)"
DEVICES = "devices and processes (see docs/distributed.md)"
TUNE = "fine-tuning (see docs/finetuning.md)"

CONFIG_FLAGS: dict[str, Flag] = {
    "dataset": Flag(DATA, "str", "NAME", "built-in dataset: seed, xor, moons, spirals, digits (default: digits)"),
    "data": Flag(
        DATA, "str", "FILE", "a CSV or Parquet table (with --target), an .npz file (arrays x, y) or a folder of .npy"
    ),
    "target": Flag(DATA, "str", "COLUMN[,COLUMN]", "the table's column to predict (several: multi-output regression)"),
    "categorical": Flag(DATA, "names", "COLUMNS", "integer columns to treat as categories (text columns always are)"),
    "ignore": Flag(DATA, "names", "COLUMNS", "columns that are not features (ids, leaks, notes)"),
    "delimiter": Flag(DATA, "str", "C", "a CSV's field separator (default: sniffed from the header: , ; tab |)"),
    "encoding": Flag(DATA, "str", "NAME", "categories as onehot features, or as a learned embedding (mlp)"),
    "embedding_dim": Flag(DATA, "int", "N", "--encoding embedding: the size of each category's vector"),
    "task": Flag(
        DATA,
        "str",
        "TASK",
        "classification, regression (default: inferred when unambiguous), or lm: a language model "
        "of a text (--data FILE.txt or a folder of .txt)",
    ),
    "val_split": Flag(DATA, "number", "F", "validation fraction"),
    "test_split": Flag(DATA, "number", "F", "test fraction"),
    "arch": Flag(MODEL, "str", "ARCH", "mlp, cnn (see docs/models.md), or path/to/file.py:factory (your own model)"),
    "hidden": Flag(MODEL, "ints", "SIZES", "hidden layer sizes, e.g. 64,64"),
    "dropout": Flag(MODEL, "number", "P", "mlp, cnn: dropout rate after hidden layers (cnn default 0.3)"),
    "input_shape": Flag(MODEL, "ints", "H,W,C", "cnn: the image shape of a row"),
    "channels": Flag(MODEL, "ints", "C1,C2", "cnn: convolution widths"),
    "activation": Flag(MODEL, "str", "NAME", "hidden activation, e.g. relu, tanh, sigmoid"),
    "output_activation": Flag(MODEL, "str", "NAME", "activation of the output layer (default none: logits)"),
    "loss": Flag(
        MODEL, "str", "NAME", "mse, half_sse, softmax_cross_entropy (cross_entropy), sigmoid_binary_cross_entropy (bce)"
    ),
    "epochs": Flag(MODEL, "int", "N", "epochs; with --resume, extends the run to this many"),
    "steps": Flag(MODEL, "int", "N", "train for N optimizer steps instead of epochs (language models)"),
    "eval_every": Flag(MODEL, "int", "N", "with --steps: validate (and record, log, checkpoint) every N steps"),
    "batch_size": Flag(
        MODEL,
        "batch",
        "B|auto",
        "examples per step; auto: the largest power of two whose step fits the memory (--memory-budget, else "
        "the device's), by XLA's memory analysis",
    ),
    "seed": Flag(MODEL, "int", "S", "seed of every random draw"),
    "patience": Flag(MODEL, "int", "N", "early stopping after N epochs without improvement"),
    "dtype": Flag(
        MODEL, "str", "DTYPE", "compute dtype: float32, or bfloat16 (mixed precision, float32 master params)"
    ),
    "seeds": Flag(MODEL, "int", "N", "train N members from seeds seed..seed+N-1 in one program (times each lr)"),
    "ensemble": Flag(MODEL, "switch", None, "with several members, save them all; predict and evaluate average them"),
    "skip_nonfinite": Flag(MODEL, "switch", None, "skip updates with non-finite gradients instead of stopping"),
    "metrics": Flag(
        MODEL,
        "names",
        "NAMES",
        "also record these metrics of training and validation, e.g. f1,precision,recall,top_5_accuracy "
        "(accuracy, cross_entropy, mse, mae, r2)",
    ),
    "class_weight": Flag(
        MODEL,
        "str",
        "balanced|C:W,...",
        "weigh each training example's loss by its class: balanced (n / (classes * count)) or e.g. 0:1,1:5",
    ),
    "optimizer": Flag(
        RECIPE,
        "str",
        "NAME",
        "any of optax's: sgd, adam, adamw, lion, lamb, rmsprop, adafactor, adagrad, adamax, nadam, radam, "
        "novograd, lars, yogi, adabelief, amsgrad, adan, sm3 ...",
    ),
    "lr": Flag(
        RECIPE, "numbers", "LR[,LR...]", "(peak) learning rate; a comma-separated list trains one member per value"
    ),
    "weight_decay": Flag(
        RECIPE,
        "numbers",
        "WD[,WD...]",
        "weight decay (decoupled for optimizers that take one: adamw default 1e-4, lion, lamb ... default 0; "
        "for the others L2 in the gradient, default 0); a comma-separated list trains one member per value",
    ),
    "momentum": Flag(RECIPE, "number", "M", "sgd, rmsprop, sm3: momentum"),
    "nesterov": Flag(RECIPE, "switch", None, "sgd, rmsprop: Nesterov momentum"),
    "lr_schedule": Flag(
        RECIPE,
        "str",
        "NAME",
        "constant, cosine, linear, exponential (to 1%% of --lr) or onecycle, over the run's steps",
    ),
    "warmup": Flag(RECIPE, "int", "STEPS", "linear warmup of the learning rate from 0"),
    "clip_norm": Flag(RECIPE, "number", "C", "clip the gradients' global norm to C"),
    "grad_accum": Flag(
        RECIPE, "int", "N", "one update per N batches (their mean gradient; keeps an optimizer-sized buffer)"
    ),
    "accumulate": Flag(
        RECIPE, "int", "K", "each step's gradient over K microbatches of the batch, inside the step (less memory)"
    ),
    "label_smoothing": Flag(RECIPE, "number", "A", "cross-entropy against smoothed labels"),
    "min_lr": Flag(RECIPE, "number", "LR", "the floor a decaying schedule ends at (cosine, linear, exponential)"),
    "beta2": Flag(RECIPE, "number", "B", "adam, adamw, nadam, lamb ...: the second moment's decay"),
    "tokenizer": Flag(
        LM, "str", "NAME", "byte, char (the text's characters), bpe (trained on the text), or a tokenizer.json"
    ),
    "text_field": Flag(LM, "str", "NAME", "a JSONL or Parquet corpus: the field (column) holding each document's text"),
    "vocab_size": Flag(LM, "int", "V", "--tokenizer bpe: the vocabulary to learn"),
    "context": Flag(LM, "int", "T", "tokens per sequence: the model's context"),
    "layers": Flag(LM, "int", "N", "gpt: transformer blocks"),
    "heads": Flag(LM, "int", "H", "gpt: attention heads"),
    "dim": Flag(LM, "int", "D", "gpt: width"),
    "positions": Flag(LM, "str", "KIND", "gpt: learned or rope position embeddings"),
    "remat": Flag(
        LM, "str", "POLICY", "gpt: recompute activations in the backward pass: none, dots (keep matmul outputs), full"
    ),
    "eval_batches": Flag(
        LM,
        "count",
        "N|all",
        "validation batches of each evaluation (disjoint windows spread over the held-out text); all: every window",
    ),
    "init_from": Flag(
        TUNE,
        "str",
        "RUN|FILE",
        "start from these weights: a run folder (also its architecture and tokenizer), "
        "a model.npz or a .safetensors file",
    ),  # fmt: skip
    "init_rename": Flag(TUNE, "rules", "REGEX=NEW", "--init-from: rename the source's weights (re.sub); repeatable"),
    "init_partial": Flag(TUNE, "switch", None, "--init-from: keep the fresh values of weights the source lacks"),
    "freeze": Flag(TUNE, "str", "REGEX", "params whose path matches do not train (e.g. 'embed|blocks/.*ln')"),
    "lr_mult": Flag(TUNE, "rules", "REGEX=F", "params whose path matches train at F times the rate; repeatable"),
    "no_decay": Flag(TUNE, "str", "REGEX", "params whose path matches get no weight decay"),
    "ema": Flag(TUNE, "number", "D", "keep a moving average of the weights (decay D, e.g. 0.999): validated and saved"),
    "skip_spikes": Flag(
        TUNE, "str", "W,F", "skip a step whose loss exceeds the last W steps' mean by F standard deviations"
    ),
    "lora_rank": Flag(TUNE, "int", "R", "train low-rank adapters of rank R on the weights (LoRA) instead of them"),
    "lora_alpha": Flag(TUNE, "number", "A", "LoRA: the update is (A / R) * a @ b (default R)"),
    "lora_targets": Flag(TUNE, "str", "REGEX", "LoRA: the weights that get adapters, by path"),
    "memory_budget": Flag(
        DEVICES,
        "bytes",
        "BYTES",
        "refuse a step that needs more memory per device than this (e.g. 512M, 8G), before it runs",
    ),  # fmt: skip
    "peak_tflops": Flag(
        DEVICES, "number", "T", "one device's peak TFLOP/s, for model FLOPs utilization (default: known GPUs, TPUs)"
    ),
    "device_invariant": Flag(
        DEVICES,
        "int",
        "K",
        "sum each step's gradient over K parts of the batch in one fixed order, the same on any device count "
        "dividing K (a power of two), so that --resume may change --mesh and continue to the bit",
    ),  # fmt: skip
    "shard": Flag(
        DEVICES,
        "rules",
        "REGEX=SPEC",
        "with --mesh: lay out the params whose path matches REGEX as SPEC (e.g. 'attn/o/w=model,fsdp'); repeatable",
    ),  # fmt: skip
}
"""The config's fields on the command line, in help order (``standardize``, ``lrs`` and
``weight_decays`` have no flag of their own: ``--lr`` and ``--weight-decay`` lists set the latter)."""

PLURAL = {"lr": "lrs", "weight_decay": "weight_decays"}
"""A ``numbers`` flag given several values sets its plural field instead."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ConfigFields)}


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def defaults_text(field: str) -> str:
    """`` (default X; moons Y, ...)``: the field's default and the presets that change it."""
    default = _DEFAULTS.get(field)
    presets = [f"{name} {_shown(p[field])}" for name, p in PRESETS.items() if field in p and p[field] != default]
    if default is None and not presets:
        return ""
    parts = ([] if default is None else [f"default {_shown(default)}"]) + presets
    return (" (" + "; ".join(parts) + ")").replace("%", "%%")


def add_flags(groups: dict, parsers: dict) -> None:
    """Adds every :data:`CONFIG_FLAGS` flag to ``groups[flag.group]``, parsed by ``parsers[flag.kind]``,
    its help followed by the field's default and presets."""
    for field, flag in CONFIG_FLAGS.items():
        options = {"help": flag.help + ("" if "default" in flag.help else defaults_text(field)), "dest": field}
        if flag.kind == "switch":
            options["action"] = "store_true"
        elif flag.kind == "rules":
            options.update(action="append", type=parsers[flag.kind], metavar=flag.metavar)
        else:
            options.update(type=parsers[flag.kind], metavar=flag.metavar)
        groups[flag.group].add_argument(flag_name(field), **options)


def given(args) -> dict:
    """The config fields given on the command line (None: not given)."""
    out = {}
    for field, flag in CONFIG_FLAGS.items():
        value = getattr(args, field)
        if flag.kind == "switch":
            value = value or None
        elif flag.kind == "rules":
            value = tuple(value) if value else None
        elif flag.kind == "numbers":
            values = value or ()
            out[PLURAL[field]] = tuple(values) if len(values) > 1 else None
            value = values[0] if len(values) == 1 else None
        out[field] = value
    return out
