"""A run's configuration: the frozen :class:`TrainConfig`, dataset presets and the one optimizer factory.

A config is data: JSON-serializable, validated once when it is made (every message names the
field), stored in the run folder and in every checkpoint. A config describes a grid of members:
seeds ``seed ... seed + seeds - 1`` times each learning rate in ``lrs`` times each weight decay in
``weight_decays``; a plain run is the grid of one member.

Axis letters in shapes: :mod:`jaxnet.base`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import optax

from jaxnet import _checks as checks
from jaxnet import groups
from jaxnet._checks import ArgumentError
from jaxnet._weights import parse_class_weight
from jaxnet.app import corpora, recipes, tables
from jaxnet.app.arch import IMAGE_SHAPES, check_arch, is_file_arch
from jaxnet.app.configfields import (
    ADAMW_WEIGHT_DECAY,
    CNN_DROPOUT,
    LM_FIELDS,
    PRESETS,
    TABLE_PRESET,
    TASK_PRESETS,
    ConfigFields,
)
from jaxnet.app.data import BUILTINS, TASKS
from jaxnet.layers import ACTIVATIONS
from jaxnet.lm import decay_mask
from jaxnet.losses import get_loss
from jaxnet.members import member_grid
from jaxnet.metrics import get_metrics
from jaxnet.parts import check_parts
from jaxnet.text import BPE_MIN_VOCAB

DTYPES = ("float32", "bfloat16")
DEFAULT_EPOCHS = ConfigFields.epochs


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigFields):
    """Everything that defines a training run. Unset fields take the dataset's preset or defaults.

    Attributes:
      dataset: a built-in dataset name (``jaxnet.app.data.BUILTINS``), or None when ``data`` is given.
      data: path of a CSV or Parquet table (with ``target``), an ``.npz`` file (arrays ``x`` and
        ``y``) or a folder of ``.npy`` arrays; stored absolute, so that a resume does not depend on
        the current directory.
      target: a table's column to predict, or several separated by commas (multi-output regression).
      categorical: a table's integer columns to treat as categories (text columns always are).
      encoding: a table's categories ``onehot`` (one 0/1 feature each) or ``embedding`` (a learned
        ``embedding_dim`` vector per category, for ``mlp``).
      task: ``classification`` or ``regression``; None infers it from the targets when that is
        unambiguous (see :mod:`jaxnet.app.data`) and refuses otherwise.
      arch: the architecture: ``mlp``, ``cnn`` (see :func:`jaxnet.app.arch.cnn`), or
        ``path/to/file.py:factory``, a function ``factory(in_features, out_dim)`` returning a
        jaxnet model (the path stored absolute).
      hidden: hidden layer sizes (for ``cnn``, of the dense layers after the convolutions).
      dropout: dropout rate after every hidden layer of ``mlp`` and ``cnn`` (0: none; default
        ``CNN_DROPOUT`` for ``cnn``, 0 otherwise).
      input_shape: ``cnn``: the image shape ``(height, width, channels)`` of the flattened rows
        (default for the built-in image datasets, e.g. digits 8x8x1).
      channels: ``cnn``: the widths of its 3x3 convolutions.
      activation: hidden activation (a name in ``jaxnet.ACTIVATIONS``).
      output_activation: activation of the output layer (None: identity; logits for cross-entropy).
      loss: a name in ``jaxnet.LOSSES`` (or alias); None picks softmax cross-entropy for
        classification and mean squared error for regression.
      optimizer: an optax optimizer by name (``jaxnet.app.recipes.OPTIMIZERS``: sgd, adam, adamw,
        lion, lamb, rmsprop, adafactor ...); lr: its (peak) learning rate.
      weight_decay: decoupled weight decay for optimizers that take one (``adamw``: default 1e-4;
        lion, lamb ...: default 0); for the others an L2 term added to the gradient (PyTorch's
        ``weight_decay``; default 0).
      momentum, nesterov: for optimizers that have them (sgd, rmsprop, sm3); None: optax's default.
      lr_schedule: the rate's shape over the run's optimizer steps: ``constant``, ``cosine`` (to 0),
        ``linear`` (to 0), ``exponential`` (to 1% of ``lr``) or ``onecycle`` (optax's cosine one-cycle).
      warmup: linear warmup from 0 over this many optimizer steps before the schedule.
      clip_norm: clip the gradients' global L2 norm to this first (None: no clipping).
      grad_accum: one optimizer update per this many batches, with their mean gradient.
      label_smoothing: smooth the one-hot targets of softmax cross-entropy by this much.
      epochs, batch_size, seed: the schedule and the seed every random draw derives from.
      val_split, test_split: held-out fractions, drawn deterministically from ``seed``.
      patience: early-stopping patience in epochs on the validation loss (None: all epochs).
      standardize: standardize features with the training split's mean and std (for ``cnn``, one
        mean and std per image channel).
      dtype: compute dtype of the forward and backward pass: ``float32``, or ``bfloat16`` for mixed
        precision (float32 master params, optimizer state and loss).
      seeds, lrs, weight_decays: train a grid of members in one program: seeds ``seed ... seed +
        seeds - 1`` times each learning rate in ``lrs`` (empty: ``lr``) times each weight decay in
        ``weight_decays`` (empty: ``weight_decay``).
      ensemble: save every member (predictions average them) instead of the best one.
      skip_nonfinite: skip updates whose loss or gradients are not finite instead of stopping
        (counted in the metrics as ``skipped``).
      metrics: named metrics (:mod:`jaxnet.metrics`) of each epoch's training steps and of the
        validation split, recorded as ``train_<name>`` and ``val_<name>``.
      class_weight: ``"balanced"`` or ``"class:weight,..."`` (e.g. ``"0:1,1:5"``; classes not
        named weigh 1): each training example's loss weighted by its class's (classification).
    """

    def __post_init__(self):
        for name in ("hidden", "lrs", "weight_decays", "input_shape", "channels", "metrics", "categorical", "shard",
                     "init_rename", "lr_mult", "ignore"):  # fmt: skip
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("data", "init_from"):  # a config runs from any folder
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.path.abspath(os.fspath(getattr(self, name))))
        if str(self.tokenizer).endswith(".json"):
            object.__setattr__(self, "tokenizer", os.path.abspath(self.tokenizer))
        object.__setattr__(self, "arch", check_arch(self.arch))
        if self.arch == "cnn" and self.input_shape is None and self.dataset in IMAGE_SHAPES:
            object.__setattr__(self, "input_shape", IMAGE_SHAPES[self.dataset])
        if self.dropout is None:
            object.__setattr__(self, "dropout", CNN_DROPOUT if self.arch == "cnn" else 0.0)
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", ADAMW_WEIGHT_DECAY if self.optimizer == "adamw" else 0.0)
        if self.steps is not None and self.epochs == DEFAULT_EPOCHS:  # the default gives way to steps
            object.__setattr__(self, "epochs", None)
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The config of a stored ``to_dict()``; unknown fields are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}: this run was made by a different jaxnet version")
        return cls(**values)


def make_config(**overrides) -> TrainConfig:
    """A :class:`TrainConfig` from defaults, the dataset's and the task's presets, then ``overrides``
    (None = unset). Given ``steps``, a run has no epochs unless they are given too (then refused)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "data" not in overrides:
        overrides.setdefault("dataset", "digits")
    dataset = PRESETS.get(overrides.get("dataset") or "", {})
    preset = {**dataset, **TASK_PRESETS.get(overrides.get("task") or dataset.get("task") or "", {})}
    length_free = overrides.get("lr_schedule", ConfigFields.lr_schedule) == "constant"  # else it spans the epochs
    if _is_table(overrides) and length_free and "epochs" not in overrides and "steps" not in overrides:
        preset.update(TABLE_PRESET)
        if overrides.get("val_split", ConfigFields.val_split) == 0:
            preset.pop("patience")
    if "steps" in overrides:
        preset.pop("epochs", None)
        overrides.setdefault("epochs", None)
    return TrainConfig(**{**preset, **overrides})


def _is_table(overrides: dict) -> bool:
    data = overrides.get("data")
    return overrides.get("task") != "lm" and data is not None and tables.is_table_file(data)


def differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """The names of the fields in which ``a`` and ``b`` differ, in field order."""
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def _sizes(name: str, values, length: int | None = None) -> None:
    if not isinstance(values, tuple) or (length is not None and len(values) != length):
        count = f"{length} " if length else ""
        raise ArgumentError(f"{{0}} must be {count}positive integers, got {checks.literal(values)}", name)
    for i, size in enumerate(values):
        if not checks.is_int(size) or size <= 0:
            raise ArgumentError(
                f"{{0}} sizes must be positive integers, got {checks.literal(size)} at position {i + 1}", name
            )


def _validate_model(c: TrainConfig) -> None:
    _sizes("hidden", c.hidden)
    checks.fraction("dropout", c.dropout)
    _sizes("channels", c.channels)
    if c.input_shape is not None:
        _sizes("input_shape", c.input_shape, 3)
    if c.arch == "cnn" and c.input_shape is None:
        raise ArgumentError(
            "{0} cnn needs the image shape of the rows: give {1} HEIGHT,WIDTH,CHANNELS", "arch", "input_shape"
        )
    if c.arch != "cnn" and c.input_shape is not None:
        raise ArgumentError("{0} is for {1} cnn: drop it", "input_shape", "arch")
    if is_file_arch(c.arch) and c.dropout > 0:
        raise ArgumentError("{0} is for the built-in architectures: put dropout in your model", "dropout")
    checks.choice("activation", c.activation, sorted(ACTIVATIONS))
    if c.output_activation is not None:
        checks.choice("output_activation", c.output_activation, sorted(ACTIVATIONS))
    if c.loss is not None:
        get_loss(c.loss)
    checks.choice("optimizer", c.optimizer, recipes.OPTIMIZERS)
    checks.choice("dtype", c.dtype, DTYPES)


def _validate_data(c: TrainConfig) -> None:
    if (c.dataset is None) == (c.data is None):
        raise ArgumentError("give either a built-in dataset ({0}) or a data file ({1}), not both", "dataset", "data")
    if c.dataset is not None:
        checks.choice("dataset", c.dataset, (*BUILTINS, *corpora.CORPORA))
    if c.dataset in corpora.CORPORA and c.task != "lm":
        raise ArgumentError(f"{{0}} {c.dataset} is a text: it trains a language model ({{1}} lm)", "dataset", "task")

    table = c.data is not None and str(c.data).lower().endswith((".csv", ".parquet")) and c.task != "lm"
    if table and not c.target and c.task != "lm":
        raise ArgumentError(f"{checks.escape(c.data)} is a table: name the column to predict with {{0}}", "target")
    if not isinstance(c.categorical, tuple) or not all(isinstance(n, str) and n for n in c.categorical):
        raise ArgumentError(f"{{0}} must be column names, got {checks.literal(c.categorical)}", "categorical")
    checks.choice("encoding", c.encoding, tables.ENCODINGS)
    checks.integer("embedding_dim", c.embedding_dim)
    for name, default in (("categorical", ()), ("encoding", "onehot"), ("ignore", ())):
        if getattr(c, name) != default and not table:
            raise ArgumentError("{0} is for CSV and Parquet tables (a data file .csv or .parquet)", name)
    if c.delimiter is not None and not (table and tables.is_csv(c.data)):
        raise ArgumentError("{0} separates a CSV file's fields (a data file .csv)", "delimiter")
    if c.embedding_dim != ConfigFields.embedding_dim and c.encoding != "embedding":
        raise ArgumentError("{0} sizes the vectors of {1} embedding: give {1} embedding, or drop {0}", "embedding_dim",
                            "encoding")  # fmt: skip
    if c.encoding == "embedding" and c.arch != "mlp":
        raise ArgumentError("{0} embedding is for {1} mlp", "encoding", "arch")
    if c.task is not None:
        checks.choice("task", c.task, (*TASKS, "lm"))
    checks.fraction("val_split", c.val_split)
    checks.fraction("test_split", c.test_split)
    if c.val_split + c.test_split >= 1:
        raise ArgumentError("{0} and {1} together must leave some training data (sum < 1)", "val_split", "test_split")


MEMBER_RUNS = "member runs ({0}, {1}, lists of {2} or {3})"
MEMBER_FLAGS = ("seeds", "ensemble", "lrs", "weight_decays")
"""What makes a run a member run, for errors: ``MEMBER_RUNS.format(*MEMBER_FLAGS)``, then {4} on."""


def check_delimiter(delimiter) -> None:
    """Refuses a ``--delimiter`` that is not one character a CSV can separate fields with."""
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '\n\r"'):
        raise ArgumentError("{0} is one character, such as ';' or a tab, got " + checks.literal(delimiter), "delimiter")


def validate(config: TrainConfig) -> None:
    """Raises ValueError/TypeError naming the first bad field of ``config`` and how to fix it."""
    c = config
    _validate_data(c)
    _validate_model(c)
    checks.number("lr", c.lr, 0.0, strict=True)
    checks.number("weight_decay", c.weight_decay, 0.0)
    _validate_length(c)
    if c.batch_size != "auto":
        checks.integer("batch_size", c.batch_size)
    elif is_member_run(c):
        raise ArgumentError(MEMBER_RUNS + " take a given {4}, not 'auto'", *MEMBER_FLAGS, "batch_size")
    checks.integer("seed", c.seed, 0, 2**32 - 1)
    checks.optional_integer("patience", c.patience)
    if c.patience is not None and c.val_split == 0:
        raise ArgumentError("early stopping ({0}) needs a validation split ({1} > 0)", "patience", "val_split")
    checks.integer("seeds", c.seeds)
    if c.seed + c.seeds - 1 > 2**32 - 1:
        raise ArgumentError("{0} + {1} - 1 must stay below 2**32", "seed", "seeds")
    for name, strict in (("lrs", True), ("weight_decays", False)):
        if not isinstance(getattr(c, name), tuple):
            raise TypeError(f"{name} must be a tuple of numbers, got {getattr(c, name)!r}")
        for value in getattr(c, name):
            checks.number(name, value, 0.0, strict=strict)
    for name in ("standardize", "ensemble", "skip_nonfinite"):
        checks.boolean(name, getattr(c, name))
    _validate_weights(c)
    _validate_recipe(c)
    _validate_text(c)


def _validate_length(c: TrainConfig) -> None:
    if c.epochs is not None and c.steps is not None:
        raise ArgumentError("{0} and {1} both set the run's length: give one", "epochs", "steps")
    if c.steps is None:
        checks.integer("epochs", c.epochs)
        if c.eval_every is not None:
            raise ArgumentError("{0} counts steps: give {1} (instead of {2}) with it", "eval_every", "steps", "epochs")
    else:
        checks.integer("steps", c.steps)
        checks.optional_integer("eval_every", c.eval_every)
    batches = c.eval_batches
    if batches != "all" and not (checks.is_int(batches) and batches >= 1):
        got = checks.escape(repr(batches))
        raise ArgumentError(f"{{0}} must be a positive integer or 'all', got {got}", "eval_batches")


ARCHITECTURE_FIELDS = (
    "task", "arch", "hidden", "activation", "output_activation", "dropout", "input_shape", "channels",
    "embedding_dim", "context", "layers", "heads", "dim", "positions", "vocab_size", "text_field",
)  # fmt: skip
"""What a run folder given to ``--init-from`` passes on to the run that starts from it."""


def inherited(given: dict) -> dict:
    """``given`` (config fields, None where unset) with the architecture of the run folder that
    ``init_from`` names filled in where unset, and its ``tokenizer.json`` as the tokenizer: the
    weights then fit, and a language model reads its tokens as the source did."""
    source = given.get("init_from")
    if source is None or not os.path.isdir(source) or not os.path.isfile(os.path.join(source, "config.json")):
        return given
    try:
        with open(os.path.join(source, "config.json")) as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        raise ArgumentError(f"{{0}} {checks.escape(source)}: its config.json is unreadable ({checks.escape(e)})",
                            "init_from") from None  # fmt: skip
    out = dict(given)
    for name in ARCHITECTURE_FIELDS:
        if out.get(name) is None and name in stored:
            out[name] = stored[name]
    tokenizer = os.path.join(source, "tokenizer.json")
    if out.get("tokenizer") is None and os.path.isfile(tokenizer):
        out["tokenizer"] = tokenizer
    return out


def lr_multipliers(c: TrainConfig) -> dict[str, float]:
    """``--lr-mult`` rules as ``{regex: factor}``."""
    out = {}
    for rule in c.lr_mult:
        pattern, _, factor = str(rule).rpartition("=")
        try:
            out[pattern] = float(factor)
        except ValueError:
            raise ArgumentError("{0} rules are REGEX=F, as 'head=10', got " + checks.literal(rule), "lr_mult") from None
    return out


def spike_window(c: TrainConfig) -> tuple[int, float] | None:
    """``--skip-spikes W,F`` as ``(W, F)``."""
    if c.skip_spikes is None:
        return None
    window, _, factor = str(c.skip_spikes).partition(",")
    try:
        return int(window), float(factor)
    except ValueError:
        raise ArgumentError("{0} is W,F (steps, standard deviations), as 100,6, got " + checks.literal(c.skip_spikes),
                            "skip_spikes") from None  # fmt: skip


def _validate_tuning(c: TrainConfig) -> None:
    """The fields of fine-tuning: what starts the params, what trains, the average, the spikes."""
    if c.ema is not None and not (isinstance(c.ema, (int, float)) and 0 < c.ema < 1):
        raise ArgumentError("{0} is a decay in (0, 1), such as 0.999, got " + checks.literal(c.ema), "ema")
    window = spike_window(c)
    if window is not None and (window[0] < 2 or not window[1] > 0):
        raise ArgumentError("{0} needs a window of at least 2 steps and a positive factor", "skip_spikes")
    for factor in lr_multipliers(c).values():
        if not factor > 0:
            raise ArgumentError("{0} factors must be positive", "lr_mult")
    if c.lora_rank is not None:
        checks.integer("lora_rank", c.lora_rank)
        if c.freeze is not None:
            raise ArgumentError("{0} trains the adapters alone: drop {1}", "lora_rank", "freeze")
        if c.init_from is None:
            raise ArgumentError("{0} trains adapters on a base that {1} gives (trained weights, frozen): give {1}",
                                "lora_rank", "init_from")  # fmt: skip
    for name in ("lora_alpha", "lora_targets"):
        if c.lora_rank is None and getattr(c, name) != getattr(ConfigFields, name):
            raise ArgumentError("{0} shapes the adapters of {1}: give {1}, or drop {0}", name, "lora_rank")
    if (c.init_rename or c.init_partial) and c.init_from is None:
        raise ArgumentError("{0} and {1} shape what {2} loads: give {2}", "init_rename", "init_partial", "init_from")


def _validate_text(c: TrainConfig) -> None:
    """The fields of a language model (``task`` lm) and the GPT it trains."""
    lm = c.task == "lm"
    if lm != (c.arch == "gpt"):
        raise ArgumentError("{0} lm trains {1} gpt, and {1} gpt is for {0} lm", "task", "arch")
    for name in ("context", "layers", "heads", "dim", "vocab_size"):
        checks.integer(name, getattr(c, name))
    checks.choice("positions", c.positions, ("learned", "rope"))
    checks.choice("remat", c.remat, ("none", "dots", "full"))
    if c.dim % c.heads:
        raise ArgumentError(f"{{0}} {c.dim} must be divisible by {{1}} {c.heads}", "dim", "heads")
    if not lm:
        check_lm_fields(c)
        return
    if c.data is None and c.dataset not in corpora.CORPORA or str(c.data).lower().endswith((".csv", ".npz")):
        shown = checks.escape(c.data or c.dataset)
        raise ArgumentError(f"{{0}} lm trains on text: give {{1}} FILE.txt, a folder of .txt files, or a .jsonl or "
                            f".parquet file with a text field, not {shown}", "task", "data")  # fmt: skip
    if not isinstance(c.text_field, str) or not c.text_field:
        raise ArgumentError("{0} must name a field", "text_field")
    if c.test_split:
        raise ArgumentError("{0} lm holds out the text's last part for validation ({1}): set {0} 0", "test_split",
                            "val_split")  # fmt: skip
    if c.tokenizer not in ("byte", "char", "bpe") and not str(c.tokenizer).endswith(".json"):
        raise ArgumentError(f"{{0}} must be byte, char, bpe or a tokenizer.json file, got {checks.escape(c.tokenizer)}",
                            "tokenizer")  # fmt: skip
    _validate_tokenizer(c)
    for name in ("target", "class_weight"):
        if getattr(c, name) is not None:
            raise ArgumentError("{0} is for tables, not {1} lm", name, "task")


def check_lm_fields(c: TrainConfig, named=()) -> None:
    """Refuses, for a task other than ``lm``, a language model's field set to other than its
    default, or ``named`` (given on the command line; a config file holds them all, at their
    defaults)."""
    if c.task == "lm":
        return
    for name in LM_FIELDS:
        if name in named or getattr(c, name) != getattr(ConfigFields, name):
            raise ArgumentError("{0} is for {1} lm (a language model): drop {0}", name, "task")


def _validate_tokenizer(c: TrainConfig) -> None:
    """``vocab_size`` is what a BPE learns (at least its bytes and separator); ``text_field`` names
    the field of a JSONL or Parquet corpus."""
    if c.tokenizer == "bpe" and c.vocab_size < BPE_MIN_VOCAB:
        raise ArgumentError(f"{{0}} must be at least {BPE_MIN_VOCAB} for {{1}} bpe (its 256 bytes and the document "
                            f"separator), got {c.vocab_size}", "vocab_size", "tokenizer")  # fmt: skip
    if c.tokenizer != "bpe" and c.vocab_size != ConfigFields.vocab_size:
        raise ArgumentError(f"{{0}} is the vocabulary {{1}} bpe learns; {{1}} {checks.escape(c.tokenizer)} has its "
                            "own: drop {0}", "vocab_size", "tokenizer")  # fmt: skip
    plain = c.data is not None and not str(c.data).lower().endswith((".jsonl", ".parquet"))
    if plain and c.text_field != ConfigFields.text_field:
        raise ArgumentError(f"{{0}} names the field of a JSONL or Parquet corpus; {checks.escape(c.data)} is plain "
                            "text: drop {0}", "text_field")  # fmt: skip


def _validate_recipe(c: TrainConfig) -> None:
    for name in ("momentum", "nesterov"):
        value = getattr(c, name)
        if value not in (None, False) and not recipes.takes(c.optimizer, name):
            raise ArgumentError(f"{{0}} is for optimizers that have one (sgd, rmsprop ...), not {c.optimizer}", name)
    if c.momentum is not None:
        checks.number("momentum", c.momentum, 0.0)
        if c.momentum >= 1:
            raise ArgumentError("{0} must be below 1, got " + checks.escape(repr(c.momentum)), "momentum")
    checks.boolean("nesterov", c.nesterov)
    checks.choice("lr_schedule", c.lr_schedule, recipes.SCHEDULES)
    checks.integer("warmup", c.warmup, 0)
    if c.warmup and c.lr_schedule == "onecycle":
        raise ArgumentError("{0} onecycle warms up by itself: drop {1}", "lr_schedule", "warmup")
    if c.clip_norm is not None:
        checks.number("clip_norm", c.clip_norm, 0.0, strict=True)
    checks.integer("grad_accum", c.grad_accum)
    checks.integer("accumulate", c.accumulate)
    _validate_tuning(c)
    check_delimiter(c.delimiter)
    checks.optional_integer("memory_budget", c.memory_budget)
    if c.peak_tflops is not None:
        checks.number("peak_tflops", c.peak_tflops, 0.0, strict=True)
    if c.device_invariant is not None:
        check_parts(c.device_invariant, 1)
        if c.batch_size != "auto" and c.batch_size % c.device_invariant:
            raise ArgumentError(f"{{0}} {c.device_invariant} does not divide {{1}} {c.batch_size} into equal parts",
                                "device_invariant", "batch_size")  # fmt: skip
        if c.accumulate != 1:
            raise ArgumentError("{0} already splits each batch into parts: drop {1}", "device_invariant", "accumulate")
        if c.shard:
            raise ArgumentError("{0} keeps the params whole on every device: drop {1}", "device_invariant", "shard")
    if c.batch_size != "auto" and c.batch_size % c.accumulate:
        raise ArgumentError(f"{{0}} {c.accumulate} does not divide {{1}} {c.batch_size} into equal microbatches",
                            "accumulate", "batch_size")  # fmt: skip
    for rule in c.shard:
        if not isinstance(rule, str) or "=" not in rule:
            raise ArgumentError("{0} rules are REGEX=SPEC, as 'attn/o/w=model,fsdp', got " + checks.literal(rule),
                                "shard")  # fmt: skip
    checks.number("label_smoothing", c.label_smoothing, 0.0)
    if c.label_smoothing >= 1:
        raise ArgumentError("{0} must be below 1", "label_smoothing")
    if c.label_smoothing and c.loss not in (None, "softmax_cross_entropy", "cross_entropy"):
        raise ArgumentError("{0} is for softmax cross-entropy, not " + checks.escape(c.loss), "label_smoothing")
    checks.number("min_lr", c.min_lr, 0.0)
    if c.min_lr >= c.lr:
        raise ArgumentError("{0} must be below {1}: the schedule decays from {1} to {0}", "min_lr", "lr")
    if c.min_lr and c.lr_schedule not in ("cosine", "linear", "exponential"):
        raise ArgumentError("{0} is the floor of a decaying {1} (cosine, linear, exponential)", "min_lr", "lr_schedule")
    if c.beta2 is not None:
        checks.number("beta2", c.beta2, 0.0)
        if c.beta2 >= 1:
            raise ArgumentError("{0} must be below 1", "beta2")
        if not recipes.takes(c.optimizer, "b2"):
            raise ArgumentError(f"{{0}} is for optimizers with a second moment (adam, adamw ...), not {c.optimizer}",
                                "beta2")  # fmt: skip


def checked_metrics(names) -> None:
    """Refuses metric names (``--metrics``) that :mod:`jaxnet.metrics` does not know, naming the flag."""
    try:
        get_metrics(names)
    except (ValueError, TypeError) as e:
        text = str(e).replace(", or a callable (prediction, target)", "")  # (names only, here)
        raise ArgumentError(f"{{0}}: {checks.escape(text)}", "metrics") from None


def _validate_weights(c: TrainConfig) -> None:
    checked_metrics(c.metrics)
    try:
        parse_class_weight(c.class_weight)
    except ValueError as e:
        raise ArgumentError(f"{{0}}: {checks.escape(str(e))}", "class_weight") from None
    if c.class_weight is not None and c.task == "regression":
        raise ArgumentError("{0} weighs classes: it needs a classification task", "class_weight")


def hyperparameter_grid(config: TrainConfig) -> dict[str, list[float]]:
    """The optimizer's hyperparameters and their values: ``learning_rate``, and ``weight_decay``
    when the optimizer applies one (adamw, or any weight decay above 0)."""
    grid = {"learning_rate": list(config.lrs) or [config.lr]}
    decays = list(config.weight_decays) or [config.weight_decay]
    if config.optimizer == "adamw" or any(d > 0 for d in decays):  # decoupled or an L2 term
        grid["weight_decay"] = decays
    return grid


def members(config: TrainConfig) -> list[dict]:
    """One dict per member, ``{"seed": int, "learning_rate": float[, "weight_decay": float]}``;
    seeds vary fastest (:func:`jaxnet.member_grid`). A plain run has one member."""
    return member_grid(config.seeds, first_seed=config.seed, **hyperparameter_grid(config))


def grid_size(config: TrainConfig) -> int:
    """K: the number of members of ``config``'s grid (1 for a plain run)."""
    k = config.seeds
    for values in hyperparameter_grid(config).values():
        k *= len(values)
    return k


def is_member_run(config: TrainConfig) -> bool:
    """True when ``config`` trains several members in one program (or asks for an ensemble)."""
    return grid_size(config) > 1 or config.ensemble


def make_optimizer(config: TrainConfig, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """The optax optimizer of ``config`` (:func:`jaxnet.app.recipes.optimizer`), its hyperparameters
    injected (``optax.inject_hyperparams``): a member run sets each member's values in its optimizer
    state, and every run's logged steps report the learning rate it applied. The schedule spans the
    run's ``steps``, or its ``epochs * steps_per_epoch`` batches (``/ grad_accum`` optimizer steps).
    A GPT's weight decay leaves its biases, norms and embeddings alone (:func:`jaxnet.decay_mask`),
    and ``no_decay``'s params too; ``freeze``, ``lr_mult``, LoRA (only the adapters train), ``ema``
    and ``skip_spikes`` wrap it (:func:`jaxnet.groups.finetuning`)."""
    grid = hyperparameter_grid(config)
    batches = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    tx = recipes.optimizer(
        config.optimizer,
        {name: values[0] for name, values in grid.items()},
        schedule=config.lr_schedule,
        total_steps=max(1, batches // config.grad_accum),
        warmup=config.warmup,
        momentum=config.momentum,
        nesterov=config.nesterov,
        clip_norm=config.clip_norm,
        grad_accum=config.grad_accum,
        min_lr=config.min_lr,
        beta2=config.beta2,
        decay_mask=groups.decay_mask_except(config.no_decay, decay_mask if config.arch == "gpt" else None),
    )
    return groups.finetuning(
        tx,
        freeze=config.freeze,
        trainable="^lora/" if config.lora_rank is not None else None,
        lr_mult=lr_multipliers(config) or None,
        ema=config.ema,
        skip_spikes=spike_window(config),
    )


def _shown(value) -> str:
    """A config value as a flag would give it: on/off for a switch, none for nothing, a list by commas."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or (isinstance(value, (tuple, list)) and not value):
        return "none"
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


MACHINE_FIELDS = ("memory_budget", "peak_tflops")
"""Fields that describe the machine a run trains on, not the run: a resumed run takes them anew."""


def check_overrides(config: TrainConfig, given: dict) -> None:
    """Raises ArgumentError naming the first field in ``given`` (None = not given) whose value
    differs from ``config``'s: a resumed run keeps its config (but for :data:`MACHINE_FIELDS`). A
    run of a user's own model resumes only when ``given`` names its architecture again (no code is
    imported unasked)."""
    if is_file_arch(config.arch) and given.get("arch") is None:
        raise ArgumentError(
            f"this run trains {checks.escape(config.arch)}: give {{0}} with it again to resume "
            "(jaxnet imports no code that was not named on the command line)",
            "arch",
        )
    for name, value in given.items():
        if value is None or name in MACHINE_FIELDS:
            continue
        have = getattr(config, name)
        if name == "loss" and have is not None:
            same = get_loss(value).name == get_loss(have).name
        elif name in ("data", "init_from") or (name == "tokenizer" and str(value).endswith(".json")):
            same = have is not None and os.path.abspath(value) == have
        elif name == "arch":
            same = check_arch(value) == have
        else:
            same = (tuple(value) if isinstance(value, list) else value) == have
        if not same:
            shown = [_shown(v) for v in (value, have)]
            raise ArgumentError(
                f"{{0}} {checks.escape(shown[0])} conflicts with the run's {checks.escape(shown[1])}: a resumed run "
                "keeps its config (drop {0}, or train into another folder)",
                name,
            )
