"""A trained language model put to use: ``jaxnet evaluate`` on a text and ``jaxnet generate``.

A language model's ``model.npz`` holds its GPT's description and its tokenizer (a JSON document),
so that both commands need nothing but the run folder.
"""

from __future__ import annotations

import codecs
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxnet import text
from jaxnet.app import saved
from jaxnet.app.files import SavedModel
from jaxnet.decoding import check_sampling, generate
from jaxnet.inference import evaluate
from jaxnet.members import take_member

EVAL_BATCH = 64
"""Windows per evaluation batch."""


class LanguageModel(NamedTuple):
    """A saved language model, ready: its GPT, one member's params, its tokenizer and context."""

    model: object
    params: object
    tokenizer: text.Tokenizer
    context: int


def is_language_model(model: SavedModel) -> bool:
    return model.meta.get("task") == "lm"


def load_language_model(model: SavedModel) -> LanguageModel:
    """The GPT, params (an ensemble's first member) and tokenizer of a saved language model."""
    if not is_language_model(model):
        raise ValueError(f"this model is a {model.meta.get('task')} model, not a language model (train with --task lm)")
    bound = saved.bind_saved(model)
    params = take_member(bound.params, 0)
    tokenizer = text.tokenizer_from_json(model.meta["tokenizer"], "the model's tokenizer")
    return LanguageModel(bound.model, params, tokenizer, int(model.meta["gpt"]["context"]))


def evaluate_text(model: SavedModel, data: str, field: str = "text", metrics=()) -> dict:
    """``{"loss", "perplexity", "bits_per_token", "bits_per_character", "accuracy", <metric> ...,
    "tokens"}`` of ``model`` on the text ``data`` (a file or a folder of .txt), tokenized with the
    model's tokenizer: disjoint windows of the context cover the text, each token predicted once
    (the mean over them; a last part shorter than a window is left out). ``metrics``: named
    metrics per token (``top_5_accuracy``)."""
    lm = load_language_model(model)
    files = text.text_files(data)
    with tempfile.TemporaryDirectory(prefix="jaxnet-eval-") as folder:
        try:
            tokens = text.tokenize_files(files, lm.tokenizer, Path(folder) / "tokens.bin", field)
        except text.UnknownCharactersError as e:
            raise text.TextError(f"{e}: score a text without them, or a model trained on them") from None
        windows = text.windows(tokens, lm.context, stride=lm.context, name=str(data))
        covered = windows.num_rows * lm.context + 1
        out = evaluate(
            lm.model, lm.params, windows, None, loss="softmax_cross_entropy", batch_size=EVAL_BATCH, model_state={},
            metrics=list(metrics),
        )  # fmt: skip
        characters = len(lm.tokenizer.decode(tokens[1:covered]).replace(text.EOT, ""))
    loss, count = float(out["loss"]), windows.num_rows * lm.context
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / math.log(2),
        "bits_per_character": loss * count / max(characters, 1) / math.log(2),
        **{name: float(value) for name, value in out.items() if name != "loss"},
        "tokens": count,
    }


def prompt_ids(lm: LanguageModel, prompt: str) -> tuple[np.ndarray, int]:
    """``(ids, dropped)``: the prompt's token ids (at most the context's, the rest ``dropped`` from
    its left); a prompt a char tokenizer cannot encode is refused, naming its characters."""
    try:
        ids = lm.tokenizer.encode(prompt, "the prompt") if prompt else np.array([lm.tokenizer.eot], np.int32)
    except text.UnknownCharactersError as e:
        raise text.TextError(f"{e}: leave them out, or train with a tokenizer that reads any text (byte)") from None
    if len(ids) == 0:
        ids = np.array([lm.tokenizer.eot], np.int32)
    dropped = max(0, len(ids) - lm.context)
    return ids[dropped:], dropped


class _Writer:
    """Writes tokens' text as it comes: decodes the ids so far and writes what is new (a BPE or
    byte token may end inside a character: its bytes wait for the rest)."""

    def __init__(self, tokenizer: text.Tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token) -> None:
        self.ids.append(int(token))
        if isinstance(self.tokenizer, text.ByteTokenizer):
            token = int(token)
            self.write(self.decoder.decode(bytes([token])) if token < 256 else "")
            return
        decoded = self.tokenizer.decode(self.ids)
        if decoded.endswith("\ufffd"):  # an unfinished character: wait for its next bytes
            return
        self.write(decoded[len(self.shown) :])
        self.shown = decoded


def generate_text(
    model: SavedModel,
    prompt: str,
    tokens: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    write: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> str:
    """``tokens`` new tokens after ``prompt`` from a saved language model, as text; ``write`` gets
    the prompt once it is encoded, then each piece as soon as it is produced; ``note`` hears of a
    prompt cut to the context."""
    lm = load_language_model(model)
    ids, dropped = prompt_ids(lm, prompt)
    check_sampling(lm.model, tokens, temperature, top_k, top_p)  # before the prompt is written
    if write is not None:
        write(prompt)
    if dropped and note is not None:
        note(f"the prompt is {len(ids) + dropped} tokens, more than the context of {lm.context}: its first "
             f"{dropped} tokens are left out")  # fmt: skip
    pieces: list[str] = []
    writer = _Writer(lm.tokenizer, lambda piece: (pieces.append(piece), write(piece) if write else None))
    key = jax.random.key(seed)
    new = generate(
        lm.model, lm.params, ids, tokens, key=key, temperature=temperature, top_k=top_k, top_p=top_p, on_token=writer
    )
    jax.effects_barrier()  # every token's callback has run
    return lm.tokenizer.decode(new)
