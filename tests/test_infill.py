"""Infilling and editing (mlx_diffgemma.infill) on the shipped trained model.

The model is examples/shift/model: its canvases converge, so what is written
between known text can be checked exactly. The step-by-step checks wrap
``model.denoise`` to see every canvas the decoder is given.
"""

import importlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import load
from mlx_diffgemma import sampler as sampler_module
from mlx_diffgemma.chat_template import plain_ids, render
from mlx_diffgemma.infill import (
    FillStep,
    Layout,
    candidate_lengths,
    check_spans,
    edit,
    end_of_turn,
    fill,
    infill,
    last,
    stream_edit,
    stream_infill,
)
from mlx_diffgemma.prompts import encode_prompt
from mlx_diffgemma.sampler_params import SamplerParams

infill_module = importlib.import_module("mlx_diffgemma.infill")  # the package's `infill` is the function
ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "shift" / "model"
QUESTION = (
    "jdko3qdmv309g5bujhxlujf0pyy8phw785ynobglmusy6519l67iquyzdrd8hq5syr4vxqovs2vq5hpr6pwc3prdywm1schjdsbszuqj6l4pny92v"
)
QUESTION = QUESTION + "." * (128 - len(QUESTION))
ANSWER = (
    "kelp4renw41ah6cvkiymvkg1qzz9qix896zopchmnvtz762am78jrvz0ese9ir6tzs5wyrpwt3wr6iqs7qxd4qsezxn2tdiketct0vrk7m5qoza3w"
)
TWICE = "Say a word twice."


@pytest.fixture(scope="module")
def shipped():
    return load(str(MODEL))


def chat(tokenizer, question):
    return render(tokenizer, [{"role": "user", "content": question}], True)


class Recorder:
    """Wraps ``model.denoise``: every canvas the decoder is given."""

    def __init__(self, model, monkeypatch):
        self.canvases = []
        original = model.denoise

        def denoise(canvas, cache, **kw):
            self.canvases.append(np.array(canvas))
            return original(canvas, cache, **kw)

        monkeypatch.setattr(model, "denoise", denoise)


def test_candidate_lengths():
    assert candidate_lengths(32) == list(range(1, 17)) + [24]
    lengths = candidate_lengths(256)
    assert lengths[:16] == list(range(1, 17)) and lengths[16:] == [24, 36, 54, 81, 122, 183, 192]
    assert all(b > a for a, b in zip(lengths, lengths[1:]))


def test_fixed_tokens_hold_in_every_step_and_in_the_result(shipped, monkeypatch):
    """Every canvas the decoder sees, every step's argmax, and the result keep the fixed tokens."""
    model, tokenizer = shipped
    recorder = Recorder(model, monkeypatch)
    prefix = chat(tokenizer, QUESTION) + plain_ids(tokenizer, ANSWER[:10])
    suffix = plain_ids(tokenizer, ANSWER[17:]) + end_of_turn(tokenizer)
    gap = 7
    responses = list(stream_infill(model, tokenizer, prefix, suffix, gap, seed=3))
    steps = [r for r in responses if not r.finished]
    assert steps and len(recorder.canvases) == len(steps)
    head = suffix[: model.canvas_length - gap]
    for canvas in recorder.canvases:
        assert canvas[0, gap : gap + len(head)].tolist() == head
    for r in steps:
        # The step's argmax window: the gap's draft, then the suffix's head as given.
        *_, (shown, fixed) = r.draft_parts()
        assert fixed and shown == tokenizer.decode(head)
    assert responses[-1].text == ANSWER[10:17]  # the model really fills it
    assert responses[-1].fixed_tokens == len(head)  # what the decoder read beside the prompt


def test_a_step_counts_its_fixed_tokens_log_probability():
    """``fixed_logprob`` is log softmax of the processed logits at the fixed tokens, 0 elsewhere."""
    logits = mx.random.normal((1, 6, 11), key=mx.random.key(0)) * 3
    mask = mx.array([[False, True, False, True, True, False]])
    tokens = mx.array([[0, 4, 0, 9, 2, 0]], dtype=mx.int32)
    step = sampler_module.denoise_step_update(
        logits, 0.1, mx.random.key(1), sampler_module.FixedPositions(mask, tokens)
    )
    log_softmax = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    want = [
        log_softmax[0, i, int(t)] if m else 0.0 for i, (m, t) in enumerate(zip(mask[0].tolist(), tokens[0].tolist()))
    ]
    np.testing.assert_allclose(np.array(step.fixed_logprob)[0], want, rtol=1e-5, atol=1e-6)
    assert sampler_module.denoise_step_update(logits, 0.1, mx.random.key(1)).fixed_logprob is None


def test_automatic_length_finds_the_gap(shipped):
    model, tokenizer = shipped
    prefix = chat(tokenizer, QUESTION) + plain_ids(tokenizer, ANSWER[:40])
    for gap in (3, 11):
        suffix = plain_ids(tokenizer, ANSWER[40 + gap :]) + end_of_turn(tokenizer)
        *steps, result = stream_infill(model, tokenizer, prefix, suffix, seed=0)
        assert steps[-1].leading_length() == gap  # what the live view shows while it denoises
        assert result.length == gap and result.text == ANSWER[40 : 40 + gap]
        assert set(result.scores) == set(candidate_lengths(model.canvas_length))
        assert max(result.scores, key=result.scores.get) == gap


def test_max_tokens_bounds_the_candidates(shipped):
    model, tokenizer = shipped
    prefix = chat(tokenizer, QUESTION)
    result = last(stream_infill(model, tokenizer, prefix, plain_ids(tokenizer, ANSWER[20:]), max_tokens=5, seed=0))
    assert set(result.scores) == {1, 2, 3, 4, 5} and result.length <= 5


def test_a_gap_longer_than_a_canvas_is_written_in_windows(shipped, monkeypatch):
    """Only the last window sees the suffix; the first is all gap."""
    model, tokenizer = shipped
    C = model.canvas_length
    recorder = Recorder(model, monkeypatch)
    prefix = chat(tokenizer, QUESTION) + plain_ids(tokenizer, ANSWER[:5])
    gap = C + 6
    suffix = plain_ids(tokenizer, ANSWER[5 + gap :]) + end_of_turn(tokenizer)
    responses = list(stream_infill(model, tokenizer, prefix, suffix, gap, seed=1))
    assert {r.window for r in responses if not r.finished} == {0, 1}
    second = [c for c, r in zip(recorder.canvases, responses) if r.window == 1]
    for canvas in second:
        assert canvas[0, 6:C].tolist() == suffix[: C - 6]
    assert responses[-1].text == ANSWER[5 : 5 + gap]


def test_without_a_suffix_infill_is_generation(shipped):
    model, tokenizer = shipped
    prefix = chat(tokenizer, QUESTION)
    result = last(stream_infill(model, tokenizer, prefix, "", seed=0))
    assert result.text.removesuffix("<turn|>") == ANSWER
    assert infill(model, tokenizer, prefix, [], 9, seed=0) == ANSWER[:9]


def test_the_cache_is_encoded_once_for_all_candidates(shipped):
    model, tokenizer = shipped
    ids = chat(tokenizer, QUESTION)
    one = model.make_cache()
    encode_prompt(model, [ids], one)
    three = model.make_cache()
    encode_prompt(model, [ids] * 3, three)
    repeated = one.repeat(3)
    assert repeated.offset == three.offset
    for a, b in zip(repeated, three):
        np.testing.assert_allclose(np.array(a.keys), np.array(b.keys), atol=1e-5)
        np.testing.assert_allclose(np.array(a.values), np.array(b.values), atol=1e-5)


def test_fill_writes_only_free_positions(shipped, monkeypatch):
    """Two gaps in different windows: the text between them goes into the cache, not a canvas."""
    model, tokenizer = shipped
    C = model.canvas_length
    recorder = Recorder(model, monkeypatch)
    cache = model.make_cache()
    encode_prompt(model, [chat(tokenizer, QUESTION)], cache)
    answer = plain_ids(tokenizer, ANSWER)
    free = [False] * len(answer)
    for i in list(range(3, 8)) + list(range(70, 74)):
        free[i] = True
    layout = Layout([0 if f else t for t, f in zip(answer, free)], free)
    events = list(fill(model, cache, [layout], [0], SamplerParams.resolve(model)))
    starts = sorted({e.start for e in events if isinstance(e, FillStep)})
    assert starts == [3, 70]
    written = events[-1][0]
    assert [t for t, f in zip(written, free) if not f] == [t for t, f in zip(answer, free) if not f]
    assert tokenizer.decode(written) == ANSWER
    assert all(c.shape == (1, C) for c in recorder.canvases)


def test_edit_rewrites_spans_in_place(shipped, monkeypatch):
    model, tokenizer = shipped
    recorder = Recorder(model, monkeypatch)
    wrong = ANSWER[:4] + "zzzzz" + ANSWER[9:60] + "000" + ANSWER[63:]
    result = edit(model, tokenizer, wrong, [(60, 63), (4, 9)], QUESTION, seed=2)
    assert result.text == ANSWER
    assert result.spans == [(60, 63), (4, 9)]
    # The text around the spans is in every canvas the spans' windows were given.
    for canvas in recorder.canvases:
        row = canvas[0].tolist()
        assert row[5:] == plain_ids(tokenizer, ANSWER[9:36]) or row[3:] == plain_ids(tokenizer, ANSWER[63:92])


def test_edit_without_instruction_and_new_lengths(shipped):
    model, tokenizer = shipped
    text = ANSWER[:30]
    result = last(stream_edit(model, tokenizer, text, [(5, 10), (20, 20)], lengths=[2, 3], seed=0))
    (a, b), (c, d) = result.spans
    assert result.text[:a] == text[:5] and result.text[b:c] == text[10:20] and result.text[d:] == text[20:]
    assert result.finished and result.text != text


@pytest.mark.parametrize(
    "spans, message",
    [
        ([], "non-empty list"),
        ("0:3", "non-empty list"),
        ([(0, 3, 4)], "span 0 must be a pair"),
        ([(0.5, 3)], "span 0 must be a pair"),
        ([(5, 3)], "span 0 (5, 3) is outside the text"),
        ([(0, 31)], "span 0 (0, 31) is outside the text of 30 characters"),
        ([(-1, 3)], "outside the text"),
        ([(0, 5), (4, 8)], "spans 0 (0, 5) and 1 (4, 8) overlap"),
        ([(10, 12), (2, 11)], "spans 1 (2, 11) and 0 (10, 12) overlap"),
        ([(3, 3)], "span 0 (3, 3) is empty: give its length"),
    ],
)
def test_bad_spans_are_named(spans, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_spans("x" * 30, spans)


def test_bad_infill_input(shipped):
    model, tokenizer = shipped
    with pytest.raises(ValueError, match="needs a prefix or a suffix"):
        infill(model, tokenizer, "", "")
    with pytest.raises(ValueError, match="length must be a positive integer"):
        infill(model, tokenizer, "a", "b", 0)
    with pytest.raises(ValueError, match="suffix holds token id 99999 outside the vocabulary"):
        infill(model, tokenizer, "a", [5, 99999])
    too_long = [110] * model.args.max_position_embeddings
    with pytest.raises(ValueError, match="infill is too long: .* more than the model's context of 4096"):
        infill(model, tokenizer, "a", too_long)
    with pytest.raises(ValueError, match="lengths must give one length"):
        edit(model, tokenizer, "abc", [(0, 1)], lengths=[1, 2])


def test_edit_reads_text_and_instruction_as_plain_text(shipped, monkeypatch):
    """A file that spells <turn|> cannot close the turn: it is text, not the control token."""
    model, tokenizer = shipped
    seen = []
    original = model.encode

    def encode(ids, cache, **kw):
        seen.extend(np.array(ids)[0].tolist())
        return original(ids, cache, **kw)

    monkeypatch.setattr(model, "encode", encode)
    turn = tokenizer.convert_tokens_to_ids("<turn|>")
    edit(model, tokenizer, "ab<turn|>cd" + "e" * 40, [(0, 1)], "x<turn|>y", max_denoising_steps=2)
    # The one <turn|> in the prompt closes the instruction's turn.
    assert seen.count(turn) == 1


def test_fixed_read_counts_what_the_windows_hold():
    """The known tokens ``fill`` shows the decoder: before each window's gap and in it."""
    one_gap = Layout([5] * 10, [False, False, True, True] + [False] * 6)
    assert one_gap.fixed_read(4) == 4  # window [2, 6): two gap tokens, two known
    two_windows = Layout([5] * 10, [False] * 3 + [True] * 2 + [False] * 3 + [True] + [False])
    assert two_windows.fixed_read(4) == 7  # windows [3, 7) and [8, 10), the known text between read too
    assert Layout([5] * 3, [False] * 3).fixed_read(4) == 0


def _with_a_control_token(monkeypatch, token):
    """``fill``, with its written documents holding ``token`` at their first free position."""
    original = infill_module.fill

    def fill(model, cache, layouts, seeds, sp):
        for event in original(model, cache, layouts, seeds, sp):
            if not isinstance(event, FillStep):
                event = [list(doc) for doc in event]
                for doc, layout in zip(event, layouts):
                    doc[layout.free.index(True)] = token
            yield event

    monkeypatch.setattr(infill_module, "fill", fill)


def test_written_control_tokens_are_not_document_text(shipped, monkeypatch):
    """A gap or span is document text: a control token the model writes there is dropped, not spelled."""
    model, tokenizer = shipped
    channel = tokenizer.convert_tokens_to_ids("<|channel>")
    _with_a_control_token(monkeypatch, channel)
    prefix = chat(tokenizer, QUESTION) + plain_ids(tokenizer, ANSWER[:10])
    suffix = plain_ids(tokenizer, ANSWER[17:]) + end_of_turn(tokenizer)
    text = infill(model, tokenizer, prefix, suffix, 7, seed=3)
    assert "<|channel>" not in text and ANSWER[10:17].endswith(text) and len(text) < 7
    result = edit(model, tokenizer, ANSWER[:4] + "zzzzz" + ANSWER[9:40], [(4, 9)], QUESTION, seed=2)
    assert "<|channel>" not in result.text and result.text.startswith(ANSWER[:4])


def test_rows_of_one_fill_share_their_window(shipped):
    model, tokenizer = shipped
    cache = model.make_cache()
    encode_prompt(model, [chat(tokenizer, QUESTION)], cache)
    near = Layout([5] * 40, [False] * 3 + [True] * 2 + [False] * 35)
    far = Layout([5] * 40, [False] * 3 + [True] * 2 + [False] * 30 + [True] + [False] * 4)
    with pytest.raises(ValueError, match="row 1: several rows must share"):
        next(fill(model, cache.repeat(2), [near, far], [0, 0], SamplerParams.resolve(model)))


def test_a_list_of_lengths_is_the_candidates(shipped):
    model, tokenizer = shipped
    prefix = chat(tokenizer, QUESTION) + plain_ids(tokenizer, ANSWER[:40])
    suffix = plain_ids(tokenizer, ANSWER[46:]) + end_of_turn(tokenizer)
    result = last(stream_infill(model, tokenizer, prefix, suffix, [8, 6, 4], seed=0))
    assert set(result.scores) == {4, 6, 8} and result.length == 6 and result.text == ANSWER[40:46]
    for bad in ([], [3, 0], [3, 40], "7"):
        with pytest.raises(ValueError, match="length|candidate lengths"):
            infill(model, tokenizer, prefix, suffix, bad)
