"""Tokenizer, Gemma 4 chat format, streaming detokenizer and thought splitting.

Uses the small offline tokenizer from tokenizer_fixture.py (real Gemma 4 control-token
ids, tiny trained vocabulary). Expected ids are built from the turn structure in
NOTES.md with `encode` on the plain-text pieces, never by calling the template.
"""

import json
import random
import shutil

import pytest
from tokenizer_fixture import SPECIAL_TOKENS, write_test_tokenizer

from mlx_diffgemma.thinking import split_thinking
from mlx_diffgemma.tokenizer import (
    GemmaStreamingDetokenizer,
    load_tokenizer,
    read_eos_token_ids,
)

PAD, EOS, BOS, UNK, MASK = 0, 1, 2, 3, 4
TOOL, TOOL_END, TOOL_CALL, TOOL_CALL_END = 46, 47, 48, 49
TOOL_RESPONSE, TOOL_RESPONSE_END, QUOTE = 50, 51, 52
THINK, CHANNEL, CHANNEL_END, TURN, TURN_END, NL = 98, 100, 101, 105, 106, 107


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_test_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    t = load_tokenizer(tok_dir)
    assert t is not None
    return t


def enc(tok, text):
    """Ids of a plain-text piece (no markers inside)."""
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and all(i >= NL for i in ids), (text, ids)
    return ids


def render(tok, messages, **kw):
    kw.setdefault("add_generation_prompt", True)
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids)


def render_text(tok, messages, **kw):
    kw.setdefault("add_generation_prompt", True)
    return tok.apply_chat_template(messages, tokenize=False, **kw)


HI = [{"role": "user", "content": "hi"}]


# --------------------------------------------------------------------------- fixture


def test_fixture_vocabulary(tok, tok_dir):
    names = {p.name for p in tok_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert 400 <= len(tok) <= 1000
    for i, s in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(s) == i
        assert tok.encode(s, add_special_tokens=False) == [i]
    assert tok.encode("\n", add_special_tokens=False) == [NL]
    # As in Gemma, no piece glues "\n" to text, so "user\nhi" is user + [107] + hi.
    merges = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and not any("\n" in "".join(m) for m in merges)
    assert tok.encode("user\nhi", add_special_tokens=False) == (enc(tok, "user") + [NL] + enc(tok, "hi"))
    assert tok.convert_ids_to_tokens([5, 99]) == ["<unused5>", "<unused99>"]
    # A character outside the small vocabulary falls back to its UTF-8 bytes.
    assert tok.convert_ids_to_tokens(tok.encode("🙂", add_special_tokens=False)) == [
        "<0xF0>",
        "<0x9F>",
        "<0x99>",
        "<0x82>",
    ]


def test_fixture_loads_with_transformers(tok, tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    text = "Hello <|turn>user\nhéllo 世界<turn|>"
    assert hf.encode(text) == tok.encode(text)
    assert hf.chat_template is not None
    ids = hf.apply_chat_template(
        HI, tokenize=True, add_generation_prompt=True, enable_thinking=False, return_dict=False
    )
    assert list(ids) == render(tok, HI, enable_thinking=False)


def test_encode_does_not_add_bos(tok):
    assert tok.encode("hi")[0] != BOS
    assert BOS not in tok.encode("hi") and EOS not in tok.encode("hi")
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


# ---------------------------------------------------------------------- chat format


def test_turn_structure_thinking_off(tok):
    expected = (
        [BOS, TURN]
        + enc(tok, "user")
        + [NL]
        + enc(tok, "hi")
        + [TURN_END, NL, TURN]
        + enc(tok, "model")
        + [NL, CHANNEL]
        + enc(tok, "thought")
        + [NL, CHANNEL_END]
    )
    assert render(tok, HI, enable_thinking=False) == expected
    assert (
        render_text(tok, HI, enable_thinking=False)
        == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_thinking_is_off_by_default(tok):
    # mlx-lm alone would default enable_thinking to has_thinking (True here).
    assert tok.has_thinking
    assert render(tok, HI) == render(tok, HI, enable_thinking=False)


def test_turn_structure_thinking_on(tok):
    expected = (
        [BOS, TURN]
        + enc(tok, "system")
        + [NL, THINK, NL, TURN_END, NL, TURN]
        + enc(tok, "user")
        + [NL]
        + enc(tok, "hi")
        + [TURN_END, NL, TURN]
        + enc(tok, "model")
        + [NL]
    )
    assert render(tok, HI, enable_thinking=True) == expected


def test_no_generation_prompt(tok):
    ids = render(tok, HI, add_generation_prompt=False)
    assert ids == [BOS, TURN] + enc(tok, "user") + [NL] + enc(tok, "hi") + [TURN_END, NL]


def test_system_prompt_lands_in_system_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}] + HI
    user_part = [TURN] + enc(tok, "user") + [NL] + enc(tok, "hi") + [TURN_END, NL, TURN] + enc(tok, "model") + [NL]
    off = render(tok, msgs, enable_thinking=False)
    assert off == (
        [BOS, TURN]
        + enc(tok, "system")
        + [NL]
        + enc(tok, "Be brief.")
        + [TURN_END, NL]
        + user_part
        + [CHANNEL]
        + enc(tok, "thought")
        + [NL, CHANNEL_END]
    )
    on = render(tok, msgs, enable_thinking=True)
    assert on == (
        [BOS, TURN] + enc(tok, "system") + [NL, THINK, NL] + enc(tok, "Be brief.") + [TURN_END, NL] + user_part
    )
    assert on.count(TURN) == 3 and on.count(THINK) == 1


def test_assistant_renders_as_model_and_drops_old_thoughts(tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<|channel>thought\nsecret plan<channel|>Hello! How are you?"},
        {"role": "user", "content": "fine"},
    ]
    text = render_text(tok, msgs, enable_thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n"
        "<|turn>user\nhi<turn|>\n"
        "<|turn>model\nHello! How are you?<turn|>\n"
        "<|turn>user\nfine<turn|>\n"
        "<|turn>model\n"
    )
    ids = render(tok, msgs, enable_thinking=True)
    assert ids == tok.encode(text)
    assert CHANNEL not in ids and ids.count(TURN) == 5
    # A plain answer with no channel is kept as is.
    msgs[1]["content"] = "Hello!"
    assert "<|turn>model\nHello!<turn|>\n<|turn>user\nfine" in render_text(tok, msgs)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "City"}},
            "required": ["location"],
        },
    },
}
DECLARATION = (
    '<|tool>declaration:get_weather{description:<|"|>Gets the weather<|"|>,'
    'parameters:{properties:{location:{description:<|"|>City<|"|>,'
    'type:<|"|>STRING<|"|>}},required:[<|"|>location<|"|>],'
    'type:<|"|>OBJECT<|"|>}}<tool|>'
)


def test_tools_declared_in_system_turn(tok):
    text = render_text(tok, HI, tools=[WEATHER_TOOL], enable_thinking=False)
    assert text == (
        "<bos><|turn>system\n" + DECLARATION + "<turn|>\n<|turn>user\nhi<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    msgs = [{"role": "system", "content": "Be brief."}] + HI
    text = render_text(tok, msgs, tools=[WEATHER_TOOL], enable_thinking=True)
    assert text.startswith("<bos><|turn>system\n<|think|>\nBe brief." + DECLARATION + "<turn|>\n")
    ids = render(tok, msgs, tools=[WEATHER_TOOL])
    assert ids.count(TOOL) == 1 and ids.count(TOOL_END) == 1
    assert ids.index(TOOL) < ids.index(TURN_END)  # inside the system turn


def test_tool_call_and_response_render_with_markers(tok):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris", "days": 2}}}
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "15 C"},
    ]
    text = render_text(tok, msgs, tools=[WEATHER_TOOL])
    tail = (
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        '<|tool_call>call:get_weather{days:2,location:<|"|>Paris<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>15 C<|"|>}<tool_response|>'
    )
    # The tool exchange stays inside the model turn, which the model goes on with.
    assert text.endswith(tail)
    ids = render(tok, msgs, tools=[WEATHER_TOOL])
    for marker in (TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END):
        assert ids.count(marker) == 1
    assert ids.count(QUOTE) == 2 * (2 + 5)  # Paris, 15 C, and 5 strings in the declaration
    # mlx-lm's Gemma 4 tool parser reads back what the template wrote.
    start = text.index("<|tool_call>") + len("<|tool_call>")
    body = text[start : text.index("<tool_call|>")]
    assert tok.tool_call_start == "<|tool_call>" and tok.tool_call_end == "<tool_call|>"
    assert tok.tool_parser(body) == {"name": "get_weather", "arguments": {"days": 2, "location": "Paris"}}

    # A structured result, the model's final answer, then a new user turn.
    msgs[2] = {"role": "tool", "name": "get_weather", "content": {"temperature": 15, "unit": "celsius", "sunny": True}}
    msgs += [{"role": "assistant", "content": "It is 15 C."}, {"role": "user", "content": "Thanks"}]
    text = render_text(tok, msgs, enable_thinking=False)
    assert (
        "<|tool_response>response:get_weather{sunny:true,temperature:15,"
        'unit:<|"|>celsius<|"|>}<tool_response|>It is 15 C.<turn|>\n'
        "<|turn>user\nThanks<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    ) in text
    assert text.count("<|turn>model\n") == 2


def test_content_parts_are_joined(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert render(tok, msgs) == render(tok, HI)


# ------------------------------------------------------------------- detokenizing


def stream(tok, ids):
    d = tok.detokenizer
    seen, pieces = [], []
    for i in ids:
        d.add_token(i)
        seen.append(d.text)
        pieces.append(d.last_segment)
    d.finalize()
    pieces.append(d.last_segment)
    assert d.tokens == list(ids)
    # Text only ever grows by appending, and the segments add up to it.
    for a, b in zip(seen, seen[1:] + [d.text]):
        assert b.startswith(a)
    assert "".join(pieces) == d.text
    return d.text, seen


TEXTS = [
    "The quick brown fox",
    " jumps  over",
    "héllo",
    "wörld ",
    "世界",
    "🙂",
    "👩‍💻 code",
    "naïve café",
    "def f(x):\n    return x",
    "  ",
    "\n\n",
    "Ελληνικά",
    "Portugal",
    '{"a": 1}',
    "→ ∑",
]
MARKERS = [
    TOOL,
    TOOL_END,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_RESPONSE,
    TOOL_RESPONSE_END,
    QUOTE,
    THINK,
    CHANNEL,
    CHANNEL_END,
    TURN,
    TURN_END,
    EOS,
    BOS,
    PAD,
]


def test_detokenizer_is_exact_and_keeps_markers(tok):
    assert isinstance(tok._detokenizer, GemmaStreamingDetokenizer)
    rng = random.Random(1234)
    text_ids = [enc_any(tok, t) for t in TEXTS]
    for _ in range(300):
        ids = []
        for _ in range(rng.randrange(1, 12)):
            r = rng.random()
            if r < 0.45:
                ids += rng.choice(text_ids)
            elif r < 0.8:
                ids.append(rng.choice(MARKERS))
            else:
                ids.append(rng.randrange(NL, len(tok)))
        text, seen = stream(tok, ids)
        assert text == tok.decode(ids)
        assert tok.decode(ids) == tok.decode(ids, skip_special_tokens=False)
        for m in MARKERS:
            assert text.count(SPECIAL_TOKENS[m]) >= ids.count(m)


def test_detokenizer_matches_decode_on_arbitrary_ids(tok):
    # Lone and broken byte runs, unknown ids: still exactly what decode() gives.
    rng = random.Random(99)
    n = len(tok)
    for _ in range(1000):
        ids = [rng.randrange(n + 4) for _ in range(rng.randrange(0, 40))]
        assert stream(tok, ids)[0] == tok.decode(ids), ids


def test_detokenizer_holds_incomplete_characters(tok):
    ids = enc_any(tok, "a🙂b")
    assert len(ids) >= 6
    text, seen = stream(tok, ids)
    assert text == "a🙂b"
    assert all("\ufffd" not in s for s in seen)


def test_tool_call_and_thought_survive_streaming(tok):
    raw = (
        "<|channel>thought\nNeed the weather.<channel|>"
        '<|tool_call>call:get_weather{location:<|"|>Paris<|"|>}<tool_call|><turn|>'
    )
    ids = tok.encode(raw)
    assert TOOL_CALL in ids and CHANNEL in ids and TURN_END in ids
    text, _ = stream(tok, ids)
    assert text == raw
    thought, answer = split_thinking(text)
    assert thought == "Need the weather."
    assert answer.startswith("<|tool_call>") and answer.endswith("<tool_call|>")


def test_mlx_lm_spm_detokenizer_keeps_markers(tok):
    # The finding behind our detokenizer: mlx-lm's own one keeps special tokens too
    # (it maps ids through convert_ids_to_tokens) and agrees on valid UTF-8.
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    d = SPMStreamingDetokenizer(tok._tokenizer, trim_space=False)
    raw = '<|channel>thought\nx<channel|>héllo 世界 🙂 <|tool_call>call:f{a:<|"|>b<|"|>}<tool_call|>'
    for i in tok.encode(raw):
        d.add_token(i)
    d.finalize()
    assert d.text == raw


def enc_any(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------ split_thinking


@pytest.mark.parametrize(
    "text, thought, answer",
    [
        ("<|channel>thought\nLet me see.<channel|>Hello!<turn|>", "Let me see.", "Hello!"),
        ("<|channel>thought\n<channel|>Hello!", "", "Hello!"),
        ("<|channel><channel|>Hello!", "", "Hello!"),
        ("<|channel>thought\nStill thinking about", "Still thinking about", ""),
        ("<|channel>thought\n", "", ""),
        ("<|channel>thoughtful words<channel|>ok", "thoughtful words", "ok"),
        ("<|channel>thought<channel|>ok", "", "ok"),
        ("Just an answer.<turn|>", None, "Just an answer."),
        ("Just an answer.", None, "Just an answer."),
        ("", None, ""),
        ("Hi<turn|>\n<|turn>user\nmore", None, "Hi"),
        ("Hi<eos>", None, "Hi"),
        # The prompt opened the channel: only its end is in the generated text.
        ("hidden reasoning<channel|>Answer", "hidden reasoning", "Answer"),
        (
            "<|channel>thought\nA<channel|><|tool_call>call:f{}<tool_call|><|channel>thought\nB<channel|>Done",
            "A\nB",
            "<|tool_call>call:f{}<tool_call|>Done",
        ),
        ("<|channel>thought\nplan<channel|>\n\nThe answer is 4.\n<turn|>", "plan", "The answer is 4."),
    ],
)
def test_split_thinking(text, thought, answer):
    assert split_thinking(text) == (thought, answer)


# ---------------------------------------------------------------------- loading


def test_load_tokenizer_without_tokenizer_files(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 106, 50]}')
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(tmp_path / "missing") is None


def test_eos_ids_from_generation_config_or_argument(tok, tmp_path):
    assert tok.eos_token_ids == {EOS}  # no generation_config.json beside the fixture
    d = write_test_tokenizer(tmp_path / "ckpt")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106, 50]}))
    assert read_eos_token_ids(d) == [1, 106, 50]
    assert load_tokenizer(d).eos_token_ids == {1, 106, 50}
    assert load_tokenizer(d, eos_token_ids=[106]).eos_token_ids == {1, 106}
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 106}))
    assert load_tokenizer(d).eos_token_ids == {1, 106}
    # A null id is no id: config.json's is read instead.
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": [None, 50]}))
    assert read_eos_token_ids(d) == [50]


def test_chat_template_from_processor_json(tok, tok_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tok_dir, d)
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    t = load_tokenizer(d)
    assert t.has_chat_template and t.has_tool_calling
    assert render(t, HI) == render(tok, HI)
