"""``generate --suffix`` and ``mlx_diffgemma.edit``, run as a user runs them, on
the shipped trained model (examples/shift/model), whose canvases converge."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_diffgemma import live, load
from mlx_diffgemma.chat_template import plain_ids, render
from mlx_diffgemma.infill import edit, end_of_turn, infill

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "shift" / "model"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
QUESTION = "12onh9grg2vfeda43ndkqtrwwwsq731bu5wgst8tidy9tdb2k" + "." * 79
ANSWER = "23poiahsh3wgfeb54oelrusxxxtr842cv6xhtu9ujezauec3l"


def run(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def shipped():
    return load(str(MODEL))


def infill_command(*extra):
    """generate --suffix on the held-out problem: the first 9 characters of the answer are the gap."""
    return run(
        "mlx_diffgemma.generate", "--model", MODEL, "--prompt", QUESTION, "--suffix", ANSWER[9:], "--seed", 5, *extra
    )


def test_generate_with_a_suffix_prints_the_middle(shipped):
    model, tokenizer = shipped
    prefix = render(tokenizer, [{"role": "user", "content": QUESTION}], True)
    suffix = plain_ids(tokenizer, ANSWER[9:]) + end_of_turn(tokenizer)
    want = infill(model, tokenizer, prefix, suffix, seed=5)
    assert want == ANSWER[:9]
    r = infill_command()
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    given = infill(model, tokenizer, prefix, suffix, 4, seed=5)
    r = infill_command("--infill-length", 4, "--verbose")
    assert r.returncode == 0 and r.stdout.startswith(given + "\n") and "Infill: 4 tokens" in r.stdout


def test_the_live_infill_shows_the_fixed_suffix_apart():
    r = infill_command("--live")
    assert r.returncode == 0, r.stderr
    # The suffix's head (a canvas of 32 holds the 9-token gap and 23 of it) in the fixed style,
    # the gap in the draft style; the screen ends with the middle alone.
    assert live.FIXED + ANSWER[9:32] + live.RESET in r.stdout
    assert live.DRAFT + ANSWER[:9] + live.RESET in r.stdout
    assert r.stdout.endswith(ANSWER[:9] + "\n" + live.SHOW_CURSOR)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--infill-length", "3"], "error: --infill-length needs --suffix"),
        (["--prompt", "-", "--suffix", "-"], "error: --prompt and --suffix cannot both read stdin"),
        (["--suffix", "x", "--infill-length", "0"], "argument --infill-length: must be >= 1 (got 0)"),
    ],
)
def test_generate_infill_flags(args, message):
    r = run("mlx_diffgemma.generate", "--model", MODEL, *args)
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_edit_rewrites_a_file_span(shipped, tmp_path):
    model, tokenizer = shipped
    wrong = ANSWER[:6] + "zzzz" + ANSWER[10:] + "\n"
    path = tmp_path / "answer.txt"
    path.write_text(wrong)
    want = edit(model, tokenizer, wrong, [(6, 10)], QUESTION, seed=1)
    assert want.text == ANSWER + "\n"
    r = run(
        "mlx_diffgemma.edit", "--model", MODEL, "--file", path, "--span", "6:10", "--instruction", QUESTION, "--seed", 1
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text  # exactly the file's new text, nothing added
    assert path.read_text() == wrong  # untouched without --in-place

    path.chmod(0o640)
    r = run(
        "mlx_diffgemma.edit",
        "--model",
        MODEL,
        "--file",
        path,
        "--lines",
        "1:1",
        "--instruction",
        QUESTION,
        "--seed",
        1,
        "--in-place",
    )
    assert r.returncode == 0 and r.stdout == "" and "written" in r.stderr
    line = edit(model, tokenizer, wrong, [(0, len(ANSWER))], QUESTION, seed=1).text
    assert path.read_text() == line and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.txt"]  # no temporary left

    out = tmp_path / "new.txt"
    r = run("mlx_diffgemma.edit", "--model", MODEL, "--file", path, "--span", "0:3", "--output", out, "--seed", 0)
    assert r.returncode == 0 and out.exists() and out.read_text()[3:] == path.read_text()[3:]


def test_edit_in_place_keeps_links_and_modes(shipped, tmp_path):
    """A symbolic link stays a link (its target rewritten), hard links all see the
    new text, the file keeps its mode; a new --output file follows the umask."""
    model, tokenizer = shipped
    wrong = ANSWER[:6] + "zzzz" + ANSWER[10:] + "\n"
    target = tmp_path / "answer.txt"
    target.write_text(wrong)
    target.chmod(0o604)
    (tmp_path / "link.txt").symlink_to("answer.txt")
    os.link(target, tmp_path / "hard.txt")
    r = run(
        *("mlx_diffgemma.edit", "--model", MODEL, "--file", tmp_path / "link.txt", "--span", "6:10"),
        *("--instruction", QUESTION, "--seed", 1, "--in-place"),
    )
    assert r.returncode == 0, r.stderr
    want = edit(model, tokenizer, wrong, [(6, 10)], QUESTION, seed=1).text
    assert (tmp_path / "link.txt").is_symlink() and os.readlink(tmp_path / "link.txt") == "answer.txt"
    assert target.read_text() == want and (tmp_path / "hard.txt").read_text() == want
    assert target.stat().st_nlink == 2 and stat.S_IMODE(target.stat().st_mode) == 0o604
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.txt", "hard.txt", "link.txt"]

    # An empty line is rewritten when told how many tokens to write there.
    text = ANSWER + "\n\nlast\n"
    target.write_text(text)
    out = tmp_path / "new.txt"
    r = subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma.edit", "--model", str(MODEL), "--file", str(target)]
        + ["--lines", "2:2:4", "--seed", "3", "--output", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        preexec_fn=lambda: os.umask(0o027),
    )
    assert r.returncode == 0, r.stderr
    at = len(ANSWER) + 1
    assert out.read_text() == edit(model, tokenizer, text, [(at, at)], lengths=[4], seed=3).text
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_edit_keeps_the_files_line_endings(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\r\n" + ANSWER.encode() + b"\r\nlast line\r\n")
    r = run("mlx_diffgemma.edit", "--model", MODEL, "--file", path, "--lines", "2:2", "--seed", 0, "--in-place")
    assert r.returncode == 0, r.stderr
    data = path.read_bytes()
    assert data.startswith(b"first line\r\n") and data.endswith(b"\r\nlast line\r\n") and data.count(b"\r\n") == 3


def test_the_live_edit_shows_the_text_around_the_span(tmp_path):
    path = tmp_path / "answer.txt"
    path.write_text(ANSWER)
    r = run(
        "mlx_diffgemma.edit",
        "--model",
        MODEL,
        "--file",
        path,
        "--span",
        "6:10",
        "--instruction",
        QUESTION,
        "--seed",
        1,
        "--live",
    )
    assert r.returncode == 0, r.stderr
    # The line's text before the span, the span's draft, the text after it (as far as the canvas reaches).
    assert live.FIXED + ANSWER[:6] + live.RESET + live.DRAFT in r.stdout
    assert live.RESET + live.FIXED + ANSWER[10:38] + live.RESET in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--span", "5:500"], "error: span 0 (5, 500) is outside the text of 49 characters"),
        (["--span", "2:8", "--span", "6:9"], "error: spans 0 (2, 8) and 1 (6, 9) overlap"),
        (["--lines", "2:3"], "error: --lines 2:3: the file has 1 lines"),
        ([], "error: nothing to edit"),
        (["--span", "5-8"], "argument --span: expected START:END or START:END:LENGTH, got '5-8'"),
        (["--span", "1:2", "--output", "{file}"], "already exists (--output never overwrites"),
        (["--span", "1:2", "--file", "{dir}/missing.txt"], "missing.txt: no such file"),
        (["--span", "1:2", "--file", "-", "--in-place"], "error: --in-place needs a file, not stdin"),
        (["--span", "3:3"], "error: --span 3:3: the span is empty; say how many tokens to write there"),
        (["--span", "1:2", "--output", "{dir}/no/such/out.txt"], "out.txt: no such directory"),
        (["--span", "1:2", "--in-place", "read-only"], "answer.txt: is read-only; not writing over it"),
        (["--span", "1:2", "--output", "{dir}"], "already exists (--output never overwrites"),
    ],
)
def test_bad_edits_end_in_one_line(tmp_path, args, message):
    path = tmp_path / "answer.txt"
    path.write_text(ANSWER)
    if "read-only" in args:
        args.remove("read-only")
        path.chmod(0o444)
    args = [a.format(file=path, dir=tmp_path) for a in args]
    if "--file" not in args:
        args = ["--file", str(path), *args]
    r = run("mlx_diffgemma.edit", "--model", MODEL, *args)
    assert r.returncode != 0
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == "" and path.read_text() == ANSWER
