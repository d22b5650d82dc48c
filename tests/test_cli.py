"""The command lines and examples, run as a user runs them, on a tiny checkpoint.

The checkpoint is random, so the text is gibberish; what is tested is that it
gets from the model to the screen intact, with the figures and errors a user
needs. Its generation_config.json sets max_denoising_steps=3, which both keeps
the runs short and shows the sampler's defaults come from the checkpoint.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import build_reference
from tokenizer_fixture import write_test_tokenizer

from mlx_diffgemma import cli, files, live
from mlx_diffgemma.server.output import ChatOutput
from mlx_diffgemma.thinking import ThoughtFormatter, split_thinking
from mlx_diffgemma.utils import LoadError

ROOT = Path(__file__).resolve().parent.parent
# PYTHONPATH so the examples, run as scripts from examples/, import this checkout.
ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    PYTHONIOENCODING="utf-8",
    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
)
FAST = ["--max-tokens", "32", "--max-denoising-steps", "3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_model")
    build_reference(path, seed=0)
    write_test_tokenizer(path)
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    config["max_denoising_steps"] = 3
    config_file.write_text(json.dumps(config))
    return path


def run(*args, stdin="", timeout=120):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="surrogateescape",
        env=ENV,
        cwd=ROOT,
        timeout=timeout,
    )


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line]


def generated_text(model_dir, prompt, **params):
    """What the API gives for ``prompt`` with the chat template, for comparison."""
    from mlx_diffgemma import load
    from mlx_diffgemma.generate import generate

    model, tokenizer = load(str(model_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return generate(model, tokenizer, text, **params)


# -- generate -----------------------------------------------------------------


def test_generate_prints_the_text_and_figures_without_escape_codes(model_dir):
    r = run(
        "-m",
        "mlx_diffgemma.generate",
        "--model",
        model_dir,
        "--prompt",
        "hello",
        "--max-tokens",
        "32",
        "--seed",
        "0",
        "--verbose",
    )
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout  # piped: no escape codes at all
    text, stats = r.stdout.split("\n==========\n")
    assert text == generated_text(model_dir, "hello", max_tokens=32, seed=0)

    assert re.search(r"^Prompt: \d+ tokens, [\d.]+ tokens-per-sec$", stats, re.M)
    assert re.search(r"^Generation: 32 tokens, [\d.]+ tokens-per-sec$", stats, re.M)
    # 32 tokens are two 16-token canvases; 3 steps each at most, from the
    # checkpoint's generation_config.json (the reference default is 48).
    steps = re.search(r"^Canvases: 2, denoising steps per canvas: (\d+), (\d+) \((\d+) in all\)$", stats, re.M)
    assert steps and all(1 <= int(s) <= 3 for s in steps.groups()[:2])
    assert re.search(r"^Tokens per forward: [\d.]+$", stats, re.M)
    assert re.search(r"^Peak memory: [\d.]+ GB$", stats, re.M)


def test_generate_reads_the_prompt_from_stdin_and_takes_sampler_flags(model_dir):
    r = run(
        "-m",
        "mlx_diffgemma.generate",
        "--model",
        model_dir,
        "--prompt",
        "-",
        "--seed",
        "1",
        "--verbose",
        *FAST[:2],
        "--max-denoising-steps",
        "2",
        "--t-min",
        "0.3",
        "--t-max",
        "0.9",
        stdin="hello",
    )
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("\n==========\n")[0]
    assert text == generated_text(
        model_dir, "hello", max_tokens=32, seed=1, max_denoising_steps=2, t_min=0.3, t_max=0.9
    )
    assert "denoising steps per canvas: 2, 2 (4 in all)" in r.stdout


def test_live_view_can_be_forced_on_a_pipe(model_dir):
    r = run("-m", "mlx_diffgemma.generate", "--model", model_dir, "--seed", "0", *FAST, "--live")
    assert r.returncode == 0, r.stderr
    # Redraws are capped at 30 a second, so a fast machine may skip a canvas' steps.
    assert live.DRAFT in r.stdout and re.search(r"canvas \d, step \d/3", r.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "error: /no/such/model: no such model directory"),
        (["--t-min", "0.9", "--t-max", "0.5"], "error: t_max must be greater than t_min"),
    ],
)
def test_bad_input_gives_a_one_line_error(model_dir, args, message):
    if args[0] != "--model":
        args = ["--model", model_dir, *args]
    r = run("-m", "mlx_diffgemma.generate", *args, *FAST)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = error_lines(r)
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "0"], "argument --max-tokens/-m: must be >= 1 (got 0)"),
        (["--max-denoising-steps", "2.5"], "expected an integer, got '2.5'"),
        (["--entropy-bound", "0"], "argument --entropy-bound: must be > 0 (got 0)"),
        (["--stability-threshold", "-1"], "must be >= 0 (got -1)"),
        (["--chat-template-config", "[1]"], "expected a JSON object"),
        (["--chat-template-config", "{oops"], "not valid JSON"),
        (["--verbose", "maybe"], "expected true or false, got 'maybe'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_flag_errors_are_one_line(args, message, capsys):
    from mlx_diffgemma.cli.chat import setup_arg_parser as chat_parser
    from mlx_diffgemma.cli.generate import setup_arg_parser as generate_parser

    for parser in (generate_parser(), chat_parser()):
        with pytest.raises(SystemExit) as exit:
            parser.parse_args(args)
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "--help" in err


def test_help_reads_well(capsys):
    from mlx_diffgemma.cli.chat import setup_arg_parser as chat_parser
    from mlx_diffgemma.cli.generate import setup_arg_parser as generate_parser

    for parser in (generate_parser(), chat_parser()):
        text = parser.format_help()
        for flag in (
            "--model",
            "--max-tokens",
            "--seed",
            "--max-denoising-steps",
            "--t-min",
            "--t-max",
            "--entropy-bound",
            "--stability-threshold",
            "--confidence-threshold",
            "--enable-thinking",
            "--live, --no-live",
            "--verbose",
            "--chat-template-config",
            "--system-prompt",
        ):
            assert flag in text, flag
        assert "google/diffusiongemma-26B-A4B-it" in text
    generate_help = generate_parser().format_help()
    assert "--prompt" in generate_help and "--ignore-chat-template" in generate_help
    assert "/reset" in chat_parser().format_help()


# -- the memory check ---------------------------------------------------------


def test_memory_check_compares_local_weights_with_memory(model_dir, tmp_path):
    size = cli.local_weights_bytes(model_dir)
    assert size > 0
    cli.check_memory(str(model_dir), memory=size + 1)
    with pytest.raises(LoadError) as e:
        cli.check_memory(str(model_dir), memory=size - 1)
    assert f"`python -m mlx_diffgemma.convert --hf-path {model_dir} --q-bits 4`" in str(e.value)
    assert f"--model {model_dir.name}-4bit" in str(e.value) and "\n" not in str(e.value)

    # Already quantized to 4 bits: converting again would not help.
    quantized = tmp_path / "q4"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64}}))
    (quantized / "model.safetensors").write_bytes(b"\0" * 1000)
    with pytest.raises(LoadError, match="already quantized to 4 bits"):
        cli.check_memory(str(quantized), memory=999)


def test_memory_check_of_a_hub_repo_uses_its_file_listing():
    class Sibling:
        def __init__(self, name, size):
            self.rfilename, self.size = name, size

    class FakeApi:
        def model_info(self, repo, **kwargs):
            assert kwargs.get("files_metadata")
            files = [Sibling(f"model-{i:05d}-of-00011.safetensors", 4_700_000_000) for i in range(11)]
            return type("Info", (), {"siblings": files + [Sibling("tokenizer.json", 30_000_000)]})

    repo = "google/diffusiongemma-26B-A4B-it"
    weights = cli.hub_weights_bytes(repo, api=FakeApi())
    assert weights == 11 * 4_700_000_000
    with pytest.raises(LoadError) as e:
        cli.check_memory(repo, memory=48 * 10**9, weights=weights)
    assert str(e.value) == (
        f"{repo}: its weights take 51.7 GB, more than the 48.0 GB this machine can give "
        "the model; convert it to 4 bits first: `python -m mlx_diffgemma.convert --q-bits 4`, "
        "then run with --model diffusiongemma-26B-A4B-it-4bit"
    )
    cli.check_memory(repo, memory=96 * 10**9, weights=weights)
    assert cli.memory_bytes() > 2**30  # this machine's, whatever it is


def test_too_large_a_model_stops_the_command_before_loading(model_dir):
    # The command as run, with the machine's memory made smaller than the weights.
    code = (
        "import sys; from mlx_diffgemma import cli; cli.memory_bytes = lambda: 1000; "
        "from mlx_diffgemma.cli.generate import main; "
        f"sys.argv = ['mlx_diffgemma.generate', '--model', {str(model_dir)!r}]; main()"
    )
    r = run("-c", code)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = error_lines(r)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {model_dir}: its weights take")
    assert "python -m mlx_diffgemma.convert --hf-path" in lines[0]


# -- chat ---------------------------------------------------------------------


def turn_figures(stdout):
    """(tokens encoded, tokens in the conversation) of each turn."""
    return [
        (int(a), int(b)) for a, b in re.findall(r"^Prompt: (\d+) tokens \((\d+) in the conversation\)", stdout, re.M)
    ]


def test_chat_answers_two_turns_and_the_second_encodes_only_its_tokens(model_dir):
    r = run(
        "-m", "mlx_diffgemma.chat", "--model", model_dir, "--seed", "0", "--verbose", *FAST, stdin="hello\nand then?\n"
    )
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and error_lines(r) == []
    assert r.stdout.startswith(">> hello\n")
    first, second = r.stdout.split(">> and then?\n")
    assert len(first.split("\n==========\n")[0]) > len(">> hello\n")  # an answer
    assert len(second.split("\n==========\n")[0]) > 0

    (enc1, conv1), (enc2, conv2) = turn_figures(r.stdout)
    assert enc1 == conv1
    # The second turn continues the cache: the first turn and its 32-token
    # answer are not encoded again.
    assert conv2 > conv1 + 32 and enc2 < conv2 / 2
    assert enc2 == conv2 - conv1 - 32 - 1  # the answer's stop token is cached too


def test_chat_commands(model_dir):
    too_long = "word " * 5000  # more than the tiny model's 4096 positions
    stdin = f"hello\n/think\nwhy?\nr\nhello\n{too_long}\nq\nnot read\n"
    r = run("-m", "mlx_diffgemma.chat", "--model", model_dir, "--seed", "0", "--verbose", *FAST, stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert "[thinking on]" in r.stdout and "[new conversation]" in r.stdout
    assert "not read" not in r.stdout
    # A turn that fails is dropped, with a one-line error, and the chat goes on.
    errors = error_lines(r)
    assert len(errors) == 1 and errors[0].startswith("error: prompt is too long")
    assert "[turn dropped;" in r.stdout
    turns = turn_figures(r.stdout)
    assert len(turns) == 3
    # Thinking on changes the start of the rendered conversation (a system
    # turn asks for thoughts), so the cache is rebuilt; after /reset the
    # conversation starts over.
    assert [enc == conv for enc, conv in turns] == [True, True, True]
    assert turns[1][1] > turns[0][1] + 32
    assert turns[2][1] < turns[1][1]  # (thinking stays on after /reset)


def test_chat_with_a_missing_model_gives_a_one_line_error():
    r = run("-m", "mlx_diffgemma.chat", "--model", "./no/such/model", stdin="hello\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert error_lines(r) == ["error: ./no/such/model: no such model directory"]


def test_thoughts_are_labelled_apart_from_the_answer():
    f = ThoughtFormatter()
    shown = [f.feed(t) for t in ["<|channel>", "thought\nLet me think. \n", "\nOK.\n<channel|>\n\nIt", " is 4."]]
    pieces = [p for chunk in shown for p in chunk]
    thought = "".join(text for kind, text in pieces if kind == "thought")
    answer = "".join(text for kind, text in pieces if kind == "answer")
    assert thought == "Thought:\nLet me think. \n\nOK.\n\n"
    assert answer == "It is 4."
    # Thinking off: the answer alone, leading whitespace dropped.
    assert ThoughtFormatter().feed("\n Hello") == [("answer", "Hello")]
    # A draft is previewed the same way, without moving the formatter on.
    f = ThoughtFormatter()
    assert f.preview("<|channel>thought\nhm<channel|>Yes") == "Thought:\nhm\n\nYes"
    assert f.feed("Yes") == [("answer", "Yes")]


# Generated text as it may arrive: thoughts around a tool call, a name that is
# not the channel's, stray and partial markers, an end of turn.
THOUGHT_TEXTS = [
    "<|channel>thought\nLet me see. \n\nOK<channel|>\n\nHello!<turn|>ignored",
    "<|channel>thoughtful words<channel|>ok",
    "<|channel>thought<channel|>ok",
    "<|channel>thought\nA<channel|>Look.<|tool_call>call:f{a:1}<tool_call|><|channel>thought\nB<channel|> Done<eos>",
    "<|channel>thought\nx<channel|>An answer <channel|> here, <|chan",
    "<|channel>thought\nstill thinking <|channel> on",
    "<|channel>thought",
    "Hi<tu",
]


def pieces_of(text, split):
    """``text`` cut at ``split``: a list of positions, or "chars" for one piece a character."""
    if split == "chars":
        return list(text)
    return [text[a:b] for a, b in zip([0] + split, split + [len(text)])]


def chat_output(pieces):
    out, fields = ChatOutput(), {}
    for delta in [out.feed(p) for p in pieces] + [out.finish()]:
        for name, value in delta.items():
            fields[name] = fields.get(name, "" if name != "tool_calls" else []) + value
    return fields


def formatted(pieces):
    f = ThoughtFormatter()
    return [p for chunk in [f.feed(p) for p in pieces] + [f.finish()] for p in chunk]


@pytest.mark.parametrize("text", THOUGHT_TEXTS)
def test_every_reader_of_the_thought_channel_agrees_however_the_text_streams(text):
    # What the whole text says, read at once by split_thinking; the server's
    # fields for the text without its tool call, which goes to tool_calls.
    # (A text whose first marker is a channel end, after a prompt that opened
    # the channel, is read so only when whole: a stream cannot know it yet.)
    thought, answer = split_thinking(text)
    without_call = text.replace("<|tool_call>call:f{a:1}<tool_call|>", "")
    want = {"reasoning_content": split_thinking(without_call)[0] or "", "content": split_thinking(without_call)[1]}
    want_calls = ["f"] if without_call != text else []
    shown = "".join(piece for _, piece in formatted([text]))
    for split in ["chars"] + [[k] for k in range(len(text) + 1)]:
        pieces = pieces_of(text, split)
        fields = chat_output(pieces)
        got = {name: fields.get(name, "") for name in want}
        assert got == want, (text, split)
        assert [c["function"]["name"] for c in fields.get("tool_calls", [])] == want_calls
        assert "".join(piece for _, piece in formatted(pieces)) == shown, (text, split)
    if not want_calls:
        assert (thought or "", answer) == (want["reasoning_content"], want["content"])
    # The chat command shows the same thoughts and answer, labelled (a line
    # break where a thought left the answer).
    for body in (thought or "").split("\n") + answer.split():
        assert body in shown


# -- the live view ------------------------------------------------------------


def test_terminal_geometry():
    assert live.advance(0, "abcd", 4) == (0, 4)  # a full row waits to wrap
    assert live.advance(0, "abcde", 4) == (1, 1)
    assert live.advance(0, "abcd\nx", 4) == (1, 1)  # the newline ends the full row
    assert live.advance(3, "\u4e2d", 4) == (1, 2)  # a wide character does not split
    assert live.advance(0, "e\u0301", 4) == (0, 1)  # a combining accent takes no column
    assert live.advance(1, "\tx", 80) == (0, 9)
    assert live.printable("a\x1b[31mb\x07\tc\n\x9b") == "a\ufffd[31mb\ufffd\tc\n\ufffd"

    # A draft taller than the screen is cut to the rows it may take.
    cut = live.fit("x" * 100, 3, 10, 2)
    assert cut.endswith(live.ELLIPSIS) and live.advance(3, cut, 10)[0] == 2
    assert live.fit("short", 0, 10, 2) == "short"


def test_live_view_redraws_only_the_draft():
    out = io.StringIO()
    view = live.LiveView(out, min_interval=0, terminal_size=lambda: (20, 6))
    with view:
        view.write("Committed ")
        view.draft("a draft that is long enough to wrap twice over", "canvas 1, step 1/3")
        view.draft("x" * 500, "canvas 1, step 2/3")
        view.write("more.")
    text = out.getvalue()
    # Each redraw goes back to the end of the committed text ("Committed " is
    # 10 columns) and clears the draft's rows; the 500-character draft is cut
    # to fit 6 rows with its status line.
    _, second, commit = text.split("\r")
    clear = lambda rows: live.CLEAR_TO_END_OF_LINE + (live.CURSOR_DOWN + live.CLEAR_LINE) * rows
    assert second.startswith("\x1b[3A\x1b[10C" + clear(3) + "\x1b[3A" + live.DRAFT)
    assert commit.startswith("\x1b[5A\x1b[10C" + clear(5) + "\x1b[5Amore.")
    assert second.count("x") < 20 * 5 and live.ELLIPSIS in second
    assert text.endswith("\n" + live.SHOW_CURSOR)
    # Committed text is written once, as it came.
    assert text.count("Committed ") == 1 and text.count("more.") == 1


class Terminal:
    """Just enough of a VT100 to replay what the views write: autowrap with a
    pending wrap at the last column, newline as CR LF (a tty's onlcr),
    scrolling into a scrollback, and the cursor and erase codes LiveView uses."""

    CSI = re.compile(r"\x1b\[(\??)(\d*)(;\d+)*([A-Za-z])")

    def __init__(self, width, height):
        self.width, self.height = width, height
        self.rows = [[] for _ in range(height)]
        self.scrollback = []
        self.r = self.c = 0
        self.pending = False

    def feed(self, data):
        i = 0
        while i < len(data):
            m = self.CSI.match(data, i)
            if m:
                self._csi(m.group(1), int(m.group(2) or 1), m.group(4))
                i = m.end()
                continue
            ch = data[i]
            i += 1
            if ch == "\n":
                self.c, self.pending = 0, False
                self._line_feed()
            elif ch == "\r":
                self.c, self.pending = 0, False
            elif ch == "\t":
                self.c = min(self.c - self.c % 8 + 8, self.width - 1)
            else:
                self._put(ch)

    def text(self):
        lines = ["".join(row).rstrip() for row in self.scrollback + self.rows]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def _put(self, ch):
        w = live.char_width(ch)
        if w == 0:
            return
        if self.pending or self.c + w > self.width:
            self.c, self.pending = 0, False
            self._line_feed()
        row = self.rows[self.r]
        row.extend(" " * (self.c + w - len(row)))
        row[self.c : self.c + w] = [ch] + [""] * (w - 1)
        if self.c + w == self.width:
            self.c, self.pending = self.width - 1, True
        else:
            self.c += w

    def _line_feed(self):
        if self.r == self.height - 1:
            self.scrollback.append(self.rows.pop(0))
            self.rows.append([])
        else:
            self.r += 1

    def _csi(self, private, n, op):
        if private or op == "m":
            return  # cursor visibility, colours
        self.pending = False
        if op == "A":
            self.r = max(self.r - n, 0)
        elif op == "B":
            self.r = min(self.r + n, self.height - 1)
        elif op == "C":
            self.c = min(self.c + n, self.width - 1)
        elif op == "K" and n == 2:
            self.rows[self.r] = []
        elif op == "K":
            del self.rows[self.r][self.c :]
        else:
            raise AssertionError(f"unexpected escape code {op!r}")


def replay(events, width, height):
    """The screen after a LiveView shows ``events``, and after the text alone."""
    out = io.StringIO()
    view = live.LiveView(out, min_interval=0, terminal_size=lambda: (width, height))
    with view:
        for kind, text in events:
            if kind == "commit":
                view.write(text)
            elif kind == "parts":  # a gap's draft beside fixed text, as infilling shows it
                half = len(text) // 2
                view.draft_parts([(text[:half], False), (text[half:], True)], "canvas 1, step 1/9")
            else:
                view.draft(text, "canvas 1, step 1/9")
    shown = Terminal(width, height)
    shown.feed(out.getvalue())
    plain = Terminal(width, height)
    plain.feed(live.printable("".join(text for kind, text in events if kind == "commit")) + "\n")
    return shown.text(), plain.text()


def test_live_view_leaves_the_committed_text_on_a_terminal():
    # A row filled to the last column, then a draft, then a commit that starts
    # with a newline; a draft taller than the screen; wide characters.
    events = [
        ("commit", "abcdefghij"),
        ("draft", "zz"),
        ("commit", "\nnext"),
        ("draft", "y" * 200),
        ("commit", " \u4e2d\u6587 wide"),
        ("draft", "\n\n\n\n\n\n"),
        ("commit", "end"),
    ]
    shown, plain = replay(events, 10, 4)
    assert shown == plain == ["abcdefghij", "next \u4e2d\u6587", "wideend"]


@given(
    events=st.lists(
        st.tuples(st.sampled_from(["commit", "draft", "parts"]), st.text("ab \n\t\u4e2d", max_size=40)),
        max_size=12,
    ),
    width=st.integers(4, 16),
    height=st.integers(2, 6),
)
@settings(max_examples=300, deadline=None)
def test_live_view_leaves_the_committed_text_whatever_the_drafts(events, width, height):
    shown, plain = replay(events, width, height)
    assert shown == plain


def test_live_view_tells_fixed_text_from_the_draft():
    out = io.StringIO()
    view = live.LiveView(out, min_interval=0, terminal_size=lambda: (40, 6))
    with view:
        view.write("def f(x):")
        view.draft_parts([("gap", False), ("return y", True), ("more gap", False)], "canvas 1, step 1/3")
        view.write(" y = x")
    text = out.getvalue()
    assert live.DRAFT + "gap" + live.RESET + live.FIXED + "return y" + live.RESET + live.DRAFT + "more gap" in text
    # The draft goes; the committed text stays.
    shown = Terminal(40, 6)
    shown.feed(text)
    assert shown.text() == ["def f(x): y = x"]


def test_plain_view_writes_the_text_as_is():
    out = io.StringIO()
    with live.PlainView(out) as view:
        view.write("a\x07b", live.DIM)
        view.draft("never shown", "status")
    assert out.getvalue() == "a\x07b\n"


TMUX = shutil.which("tmux")
LIVE_ARGS = [
    "--prompt",
    "hello",
    "--seed",
    "3",
    "--max-tokens",
    "48",
    "--max-denoising-steps",
    "30",
    "--confidence-threshold",
    "1e-12",
]  # never confident: every canvas takes 30 steps

# The command, with each redraw slowed to 20 ms so that the run lasts a while
# however fast the machine is.
SLOW_GENERATE = """
import sys, time
from mlx_diffgemma import live
from mlx_diffgemma.cli.generate import main
draft = live.LiveView.draft
live.LiveView.draft = lambda *args: (time.sleep(0.02), draft(*args))[1]
sys.argv[0] = "mlx_diffgemma.generate"
main()
"""


def tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def piped_live_run(model_dir):
    r = run("-m", "mlx_diffgemma.generate", "--model", model_dir, *LIVE_ARGS)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
@pytest.mark.parametrize("width, height", [(80, 24), (30, 4)])
def test_live_view_in_a_terminal(model_dir, piped_live_run, tmp_path, width, height):
    """In a real terminal: the draft is drawn during generation, and the screen
    (scrollback included) ends with exactly the text a pipe receives; in a
    4-row terminal the drafts are cut to fit."""
    session = f"diffgemma-live-{os.getpid()}-{width}"
    command = " ".join(map(_quote, [sys.executable, "-c", SLOW_GENERATE, "--model", str(model_dir), *LIVE_ARGS]))
    stderr = tmp_path / "stderr"
    tmux(
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        str(width),
        "-y",
        str(height),
        "-e",
        "HF_HUB_OFFLINE=1",
        "-c",
        str(ROOT),
        f"{command} 2>{_quote(str(stderr))}; echo __EXIT__$?; sleep 600",
    )
    try:
        during = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            screen = tmux("capture-pane", "-p", "-e", "-t", session)
            if "__EXIT__" in screen:
                break
            if re.search(r"canvas \d+, step \d+/30", screen):
                during = screen
                break
            time.sleep(0.05)
        assert during is not None, "no draft seen during generation"
        # The draft is drawn in the draft colour (dim cyan).
        assert re.search(r"\x1b\[(2;)?36m|\x1b\[36;2m", during), repr(during)

        while time.monotonic() < deadline and "__EXIT__" not in tmux("capture-pane", "-p", "-t", session):
            time.sleep(0.1)
        final = tmux("capture-pane", "-p", "-J", "-S", "-", "-t", session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)

    screen_text, status = final.split("__EXIT__")
    assert status.startswith("0"), stderr.read_text()
    expected = live.printable(piped_live_run)
    lines = lambda text: [line.expandtabs().rstrip() for line in text.rstrip("\n").split("\n")]
    assert lines(screen_text) == lines(expected)
    assert not re.search(r"canvas \d+, step", screen_text)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


# -- examples -----------------------------------------------------------------


@pytest.mark.parametrize("example", ["generate.py", "stream_drafts.py", "chat.py", "batch.py", "infill.py", "edit.py"])
def test_examples_run(model_dir, example):
    r = run(ROOT / "examples" / example, model_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    if example == "chat.py":
        assert re.search(r"the follow-up encoded \d+ new tokens", r.stdout)
    if example == "batch.py":
        assert r.stdout.count("Q: ") == 3
    if example == "stream_drafts.py":
        assert "committed]" in r.stdout and ", step " in r.stdout
    if example == "infill.py":
        assert r.stdout.startswith("def mean(values):") and "    return total / len(values)\n# " in r.stdout
    if example == "edit.py":
        assert (
            r.stdout.startswith("The team meets on ")
            and "at 10:00 in room 4 to plan the release.\n# 'Monday' became" in r.stdout
        )


def test_write_text_puts_a_whole_file_in_place(tmp_path):
    """The one writer of the commands (benchmark --json, edit --in-place/--output)."""
    path = tmp_path / "out.txt"
    path.write_text("old")
    path.chmod(0o600)
    files.write_text(path, "new\r\n")
    assert path.read_bytes() == b"new\r\n" and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        files.write_text(path, "other", overwrite=False)
    assert path.read_bytes() == b"new\r\n"
    old_mask = os.umask(0o027)
    try:
        files.write_text(tmp_path / "fresh.txt", "x", overwrite=False)
    finally:
        os.umask(old_mask)
    assert (tmp_path / "fresh.txt").stat().st_mode & 0o777 == 0o640  # as the umask says, not mkstemp's 0600
    path.chmod(0o444)
    with pytest.raises(ValueError, match="out.txt: is read-only"):
        files.write_text(path, "over")
    assert path.read_bytes() == b"new\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.txt", "out.txt"]  # no temporary left


# -- One dispatcher: `mlx_diffgemma <command>` ---------------------------------------


def test_the_dispatcher_lists_runs_and_refuses_commands(model_dir):
    from mlx_diffgemma.cli.main import COMMANDS

    listed = run("-m", "mlx_diffgemma")
    assert listed.returncode == 2 and listed.stdout.startswith("usage: mlx_diffgemma <command>")
    assert all(f"  {command} " in listed.stdout for command in COMMANDS)
    assert run("-m", "mlx_diffgemma", "--help").returncode == 0

    unknown = run("-m", "mlx_diffgemma", "generat")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert error_lines(unknown) == [
        f"mlx_diffgemma: error: unknown command 'generat' (commands: {', '.join(COMMANDS)})"
    ]

    # Every command behind it, its usage naming it as typed; the old form names itself.
    for command in COMMANDS:
        shown = run("-W", "error", "-m", "mlx_diffgemma", command, "--help")
        assert shown.returncode == 0 and shown.stderr == "", (command, shown.stderr)
        assert shown.stdout.startswith(f"usage: mlx_diffgemma {command} "), command
    assert run("-m", "mlx_diffgemma.fuse", "--help").stdout.startswith("usage: mlx_diffgemma.fuse ")

    # The same command either way: the same text for the same seed, and the same one-line errors.
    args = ["--model", model_dir, "--prompt", "hello", "--seed", "3", *FAST, "--no-live"]
    dispatched = run("-m", "mlx_diffgemma", "generate", *args)
    direct = run("-m", "mlx_diffgemma.generate", *args)
    assert dispatched.returncode == direct.returncode == 0, dispatched.stderr
    assert dispatched.stdout == direct.stdout and dispatched.stdout.strip()
    bad = run("-m", "mlx_diffgemma", "generate", "--model", model_dir, "--max-denoising-steps", "0")
    assert bad.returncode == 2 and len(error_lines(bad)) == 1 and "--max-denoising-steps" in bad.stderr
