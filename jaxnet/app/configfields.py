"""The fields of a run's config and their defaults, apart from everything else so that the
command line's ``--help`` shows them without importing JAX: :class:`ConfigFields` declares what
:class:`jaxnet.app.config.TrainConfig` holds (which adds the checks), :data:`PRESETS` what a built-in
dataset changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

CNN_DROPOUT = 0.3
"""The dropout of ``cnn`` when none is given (digits: 0.989 test accuracy over seeds 0-2, 0.981 without)."""
ADAMW_WEIGHT_DECAY = 1e-4
"""The weight decay of ``adamw`` when none is given (optax's default); other optimizers get 0."""


@dataclasses.dataclass(frozen=True)
class ConfigFields:
    """The fields of :class:`jaxnet.app.config.TrainConfig` and their defaults (documented there)."""

    dataset: str | None = None
    data: str | None = None
    target: str | None = None
    task: str | None = None
    categorical: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    delimiter: str | None = None
    encoding: str = "onehot"
    embedding_dim: int = 8
    arch: str = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    dropout: float | None = None
    input_shape: tuple[int, ...] | None = None
    channels: tuple[int, ...] = (32, 64)
    activation: str = "relu"
    output_activation: str | None = None
    loss: str | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float | None = None
    epochs: int = 30
    batch_size: int | str = 64  # or "auto": resolved when the run starts, and recorded
    seed: int = 0
    val_split: float = 0.1
    test_split: float = 0.2
    patience: int | None = None
    standardize: bool = True
    dtype: str = "float32"
    seeds: int = 1
    lrs: tuple[float, ...] = ()
    weight_decays: tuple[float, ...] = ()
    ensemble: bool = False
    skip_nonfinite: bool = False
    metrics: tuple[str, ...] = ()
    class_weight: str | None = None
    momentum: float | None = None
    nesterov: bool = False
    lr_schedule: str = "constant"
    warmup: int = 0
    clip_norm: float | None = None
    grad_accum: int = 1
    label_smoothing: float = 0.0
    steps: int | None = None
    eval_every: int | None = None
    eval_batches: int | str = 20  # or "all": every disjoint window of the held-out part
    min_lr: float = 0.0
    beta2: float | None = None
    tokenizer: str = "char"
    text_field: str = "text"
    vocab_size: int = 4096
    context: int = 64
    layers: int = 4
    heads: int = 4
    dim: int = 128
    positions: str = "learned"
    remat: str = "none"
    accumulate: int = 1
    device_invariant: int | None = None
    shard: tuple[str, ...] = ()
    memory_budget: int | None = None
    init_from: str | None = None
    init_rename: tuple[str, ...] = ()
    init_partial: bool = False
    freeze: str | None = None
    lr_mult: tuple[str, ...] = ()
    no_decay: str | None = None
    ema: float | None = None
    skip_spikes: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str = r"(^|/)w$"
    peak_tflops: float | None = None


LM_FIELDS = ("tokenizer", "text_field", "vocab_size", "context", "layers", "heads", "dim", "positions", "remat",
             "eval_batches")  # fmt: skip
"""The fields of a language model (``task`` lm) alone: another task refuses them when set."""


PRESETS: dict[str, dict[str, Any]] = {
    # The worked example's network and its single sample: 3-2-2 sigmoid, half-SSE, online SGD 0.1.
    "seed": dict(
        hidden=(2,),
        activation="sigmoid",
        output_activation="sigmoid",
        loss="half_sse",
        optimizer="sgd",
        lr=0.1,
        batch_size=1,
        epochs=1000,
        val_split=0.0,
        test_split=0.0,
        standardize=False,
    ),
    "xor": dict(hidden=(8,), activation="tanh", lr=0.05, batch_size=4, epochs=300, val_split=0.0, test_split=0.0),
    "moons": dict(hidden=(32, 32), lr=0.01, epochs=60),
    "spirals": dict(hidden=(64, 64), lr=0.01, epochs=150),
    "digits": dict(hidden=(64, 64), lr=1e-3, epochs=30, batch_size=64),
    # A text (jaxnet.app.corpora), downloaded on first use: a character-level language model.
    "shakespeare": dict(task="lm", tokenizer="char"),
}
"""Per-dataset defaults, applied to every field the user leaves unset."""

TASK_PRESETS: dict[str, dict[str, Any]] = {
    # A language model: a GPT over the text's tokens, no test split (the validation part is the text's end).
    "lm": dict(arch="gpt", test_split=0.0, standardize=False, batch_size=12),
}
"""Per-task defaults (``--task lm``), applied like a dataset's preset."""

TABLE_PRESET: dict[str, Any] = dict(epochs=200, patience=20)
"""The defaults of a table (a CSV or Parquet ``data`` file) when neither ``epochs`` nor ``steps`` is
given and the learning rate is constant: up to 200 epochs, stopping 20 epochs after the validation
loss last improved (the saved model is the best validation epoch's). A small table has few steps
per epoch (iris: 2), and 30 epochs left it undertrained (bench/results/seven-tables-*.json); a
large one stops when it stops improving. Without a validation split there is no early stopping:
200 epochs. A schedule spans the run's epochs, and early stopping would cut it short: a run with
one keeps the general default of 30 epochs."""
