"""fit by steps: rounds of eval_every steps across epochs, their losses, exact resume, iterators,
and token windows of a text (jaxnet.text)."""

import itertools

import jax
import numpy as np
import optax
import pytest
from stopping import StopAt

import jaxnet as jn
from jaxnet import text

V, C = 13, 8


def _net():
    return jn.serial(jn.embedding(V, 8), jn.dense(8, V))


def _tokens(n=700, seed=0):
    return np.random.default_rng(seed).integers(0, V, n).astype(np.int32)


def _fit(x, y=None, **options):
    net = _net()
    args = dict(loss="softmax_cross_entropy", optimizer=optax.adam(0.01), batch_size=8, key=jax.random.key(1))
    return jn.fit(net, net.init(jax.random.key(0)), x, y, **{**args, **options})


def test_round_losses_are_means_over_the_rounds_tokens_across_epochs():
    # 10 rows in batches of 4 (the last padded), in order, SGD at rate 0: rounds of 4 steps cross epochs
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (10, C)).astype(np.int32)
    y = rng.integers(0, V, (10, C)).astype(np.int32)
    y[3, :4] = jn.IGNORE_INDEX
    net = _net()
    params = net.init(jax.random.key(0))
    result = _fit(x, y, optimizer=optax.sgd(0.0), batch_size=4, shuffle=False, steps=11, eval_every=4)
    logits = np.asarray(jn.batched(net)(params, x), np.float64)
    terms = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, np.maximum(y, 0)[..., None], -1)[..., 0]
    real = y != jn.IGNORE_INDEX
    batches = [range(0, 4), range(4, 8), range(8, 10)]  # an epoch: 3 steps
    order = [batches[i % 3] for i in range(11)]
    rounds = [order[0:4], order[4:8], order[8:11]]
    assert [r["step"] for r in result.history] == [4, 8, 11]
    assert [r["steps"] for r in result.history] == [4, 4, 3]
    for record, steps in zip(result.history, rounds):
        rows = [i for batch in steps for i in batch]
        expected = sum(terms[i][real[i]].sum() for i in rows) / sum(real[i].sum() for i in rows)
        np.testing.assert_allclose(record["train_loss"], expected, rtol=1e-5)


@pytest.mark.parametrize("source", ["resident", "windows"])
def test_a_fit_by_steps_resumes_exactly_at_and_inside_rounds(source):
    tokens = _tokens()
    data = (text.windows(tokens, C),) if source == "windows" else (text.windows(tokens, C).x[np.arange(90)],)
    if source == "resident":
        data = (data[0], text.windows(tokens, C).y[np.arange(90)])
    options = dict(steps=30, eval_every=7, validation=(text.windows(tokens[:200], C, C),))
    options["validation"] = options["validation"][0]
    straight = _fit(*data, **options)

    first = _fit(*data, **{**options, "callbacks": [StopAt(10)]})  # inside the second round
    assert first.position is not None and first.steps == 10
    second = _fit(*data, **options, resume=first)
    np.testing.assert_array_equal(jax.tree.leaves(second.train.params)[0], jax.tree.leaves(straight.train.params)[0])
    for a, b in zip(jax.tree.leaves(second.train.params), jax.tree.leaves(straight.train.params)):
        np.testing.assert_array_equal(a, b)
    strip = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in straight.history]
    assert [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in second.history] == strip
    assert [r["step"] for r in straight.history] == [7, 14, 21, 28, 30]


def test_an_endless_iterator_trains_for_the_steps_given():
    tokens = _tokens()

    def batches():
        rng = np.random.default_rng(0)
        while True:
            starts = rng.integers(0, len(tokens) - C - 1, 8)
            yield np.stack([tokens[s : s + C] for s in starts]), np.stack([tokens[s + 1 : s + C + 1] for s in starts])

    result = _fit(batches(), steps=20, eval_every=10)
    assert result.steps == 20 and [r["step"] for r in result.history] == [10, 20]


def test_an_iterator_that_ends_before_the_steps_is_refused_not_replayed():
    """A one-pass iterator read up is not started over (it cannot be): its first batch is never
    fed twice, and the fit says the iterator ended."""
    tokens = _tokens()
    pairs = [(tokens[i : i + C][None].repeat(8, 0), tokens[i + 1 : i + C + 1][None].repeat(8, 0)) for i in (0, 9, 18)]
    exact = _fit(iter(pairs), steps=3, eval_every=3)
    assert exact.steps == 3
    with pytest.raises(ValueError, match="ended after 3 batches, before the fit's steps were done"):
        _fit(iter(pairs), steps=6, eval_every=3)
    once = _fit(iter(pairs), steps=3, eval_every=1)
    listed = _fit(pairs, steps=3, eval_every=1)  # a list: each batch once, in order
    for a, b in zip(jax.tree.leaves(once.train.params), jax.tree.leaves(listed.train.params)):
        np.testing.assert_array_equal(a, b)


def test_an_endless_iterator_is_read_once_across_rounds():
    """Each round continues the iterator where the last stopped (not read again from its start,
    which an iterator cannot be): the same training as a list of the batches it gave."""
    tokens, drawn = _tokens(), []

    def batch(i):
        starts = np.random.default_rng(i).integers(0, len(tokens) - C - 1, 8)
        return np.stack([tokens[s : s + C] for s in starts]), np.stack([tokens[s + 1 : s + C + 1] for s in starts])

    def endless():
        for i in itertools.count():
            drawn.append(i)
            yield batch(i)

    once = _fit(endless(), steps=12, eval_every=4)
    listed = _fit([batch(i) for i in range(12)], steps=12, eval_every=4)
    assert len(drawn) <= 12 + 6  # what the last round read ahead, at most
    assert [r["train_loss"] for r in once.history] == [r["train_loss"] for r in listed.history]
    for a, b in zip(jax.tree.leaves(once.train.params), jax.tree.leaves(listed.train.params)):
        np.testing.assert_array_equal(a, b)


def test_a_one_pass_generator_trains_one_epoch():
    tokens = _tokens()
    pairs = ((tokens[i : i + C][None], tokens[i + 1 : i + C + 1][None]) for i in range(0, 80, C))
    assert _fit(pairs, epochs=1).history[0]["steps"] == 2  # 10 rows in batches of 8


@pytest.mark.parametrize(
    "options, match",
    [
        ({"epochs": 2, "steps": 5}, "not both"),
        ({}, "give epochs"),
        ({"epochs": 2, "eval_every": 5}, "eval_every"),
        ({"steps": 0}, "steps"),
    ],
)
def test_the_length_of_a_fit_is_epochs_or_steps(options, match):
    tokens = _tokens()
    with pytest.raises(ValueError, match=match):
        _fit(text.windows(tokens, C), **options)


def test_tokenizers_round_trip_and_refuse_what_they_cannot_encode(tmp_path):
    sample = "To be, or not to be: that is the question. — Hamlet, ½ ü\n"
    for tokenizer in (text.ByteTokenizer(), text.CharTokenizer.fit([sample])):
        assert tokenizer.decode(tokenizer.encode(sample)) == sample
        again = text.tokenizer_from_json(text.tokenizer_to_json(tokenizer))
        np.testing.assert_array_equal(again.encode(sample), tokenizer.encode(sample))
    chars = text.CharTokenizer.fit(["abc"])
    with pytest.raises(text.TextError, match="'z'"):
        chars.encode("abz")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(text.TextError, match="byte offset 6"):
        list(text.read_text(bad))
    with pytest.raises(text.TextError, match="not JSON"):
        text.tokenizer_from_json("{nope")


def test_a_corpus_becomes_a_token_file_and_windows_of_it(tmp_path):
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    docs[0].write_text("hello world\n")
    docs[1].write_text("goodbye\n")
    tokenizer = text.CharTokenizer.fit(itertools.chain.from_iterable(text.read_text(p) for p in docs))
    tokens = text.tokenize_files(docs, tokenizer, tmp_path / "tokens.bin")
    assert tokens.dtype == np.uint16 and len(tokens) == len("hello world\n") + 1 + len("goodbye\n") + 1
    assert tokens[len("hello world\n")] == tokenizer.eot
    assert tokenizer.decode(tokens) == "hello world\ngoodbye\n"
    train, val = text.split_tokens(tokens, 0.25)
    assert len(train) + len(val) == len(tokens)
    np.testing.assert_array_equal(val, tokens[len(train) :])  # the last part, contiguous
    source = text.windows(train, 4)
    x, y = source.read(np.array([0, 3]))
    np.testing.assert_array_equal(x[1], train[3:7])
    np.testing.assert_array_equal(y[1], train[4:8])
    assert text.windows(train, 4, stride=4).num_rows == (len(train) - 5) // 4 + 1
    (tmp_path / "tokens.bin.json").write_text('{"dtype": "<u2", "tokens": 99, "vocab_size": 5}')
    with pytest.raises(text.TextError, match="header says 99"):
        text.open_tokens(tmp_path / "tokens.bin")


def test_a_bpe_tokenizer_trains_on_a_corpus_and_saves():
    pytest.importorskip("tokenizers")
    corpus = ["the cat sat on the mat. " * 50, "the dog ate the cat's dinner. " * 50]
    bpe = text.BPETokenizer.train(corpus, vocab_size=300)
    assert bpe.vocab_size <= 300 and bpe.decode(bpe.encode("the cat sat")) == "the cat sat"
    assert len(bpe.encode("the cat sat on the mat")) < len("the cat sat on the mat")
    again = text.tokenizer_from_json(text.tokenizer_to_json(bpe))
    assert again.encode("the dog").tolist() == bpe.encode("the dog").tolist() and again.eot == bpe.eot


@pytest.mark.parametrize("stop", [5, 10, 13, 15])
def test_a_round_across_an_epoch_end_resumes_exactly_from_either_side(stop):
    # 90 rows in batches of 8: 12 steps an epoch; rounds of 7 steps: the second spans steps 7-14
    tokens = _tokens()
    x, y = text.windows(tokens, C).x[np.arange(90)], text.windows(tokens, C).y[np.arange(90)]
    options = dict(steps=21, eval_every=7)
    straight = _fit(x, y, **options)
    first = _fit(x, y, **options, callbacks=[StopAt(stop)])
    assert first.position is not None and first.steps == stop
    second = _fit(x, y, **options, resume=first)
    untimed = [
        [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in h]
        for h in (straight.history, second.history)
    ]
    assert untimed[1] == untimed[0]
    for a, b in zip(jax.tree.leaves(second.train.params), jax.tree.leaves(straight.train.params)):
        np.testing.assert_array_equal(a, b)


def test_rounds_over_a_finite_sequence_of_batches_end_on_their_boundaries():
    tokens = _tokens()
    batches = [(tokens[i : i + C][None].repeat(8, 0), tokens[i + 1 : i + C + 1][None].repeat(8, 0)) for i in range(7)]
    result = _fit(batches, steps=20, eval_every=10)  # 7 batches an epoch: rounds end inside epochs
    assert result.steps == 20
    assert [(r["step"], r["steps"], r["tokens"]) for r in result.history] == [(10, 10, 640), (20, 10, 640)]


def test_a_member_that_diverges_in_a_later_epoch_of_a_round_is_found():
    from jaxnet.loop import _round_metrics, _Tally

    finite = _Tally(np.array([1.0, 2.0], np.float32), None, 16.0, np.array([4, 4]), None)
    later = _Tally(np.array([np.nan, 5.0], np.float32), None, 32.0, np.array([2, 7]), None)
    both = _Tally(np.array([np.nan, np.nan], np.float32), None, 48.0, np.array([2, 3]), None)
    metrics = _round_metrics([(finite, 0, 4), (later, 4, 8), (both, 8, 12)], 0)
    np.testing.assert_array_equal(metrics["first_nonfinite"], [6, 11])  # member 0 in the 2nd piece, 1 in the 3rd


def test_class_weight_with_token_targets_is_refused():
    tokens = _tokens()
    with pytest.raises(ValueError, match="class_weight"):
        _fit(text.windows(tokens, C), steps=2, class_weight="balanced")


def test_jsonl_and_parquet_corpora_are_documents_separated_by_eot(tmp_path):
    import json as jsonlib

    records = [{"text": "first doc"}, {"text": "second"}, {"id": 3, "text": "third one"}]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(jsonlib.dumps(r) for r in records) + "\n\n")
    tokenizer = text.CharTokenizer.fit(text.text_chunks(jsonl))
    tokens = text.tokenize_files(jsonl, tokenizer, tmp_path / "t.bin")
    eots = np.flatnonzero(np.asarray(tokens) == tokenizer.eot)
    assert eots.tolist() == [9, 16, 26] and tokenizer.decode(tokens) == "first docsecondthird one"
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.table({"body": [r["text"] for r in records]}), tmp_path / "docs.parquet")
    again = text.tokenize_files(tmp_path / "docs.parquet", tokenizer, tmp_path / "p.bin", field="body")
    np.testing.assert_array_equal(again, tokens)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(text.TextError, match="line 2 has no text field 'text'"):
        list(text.text_chunks(bad))
    with pytest.raises(text.TextError, match="no column 'text'"):
        list(text.text_chunks(tmp_path / "docs.parquet"))
