"""lora and fuse as a user runs them, with hostile input (issue 21).

Each test runs the command in a subprocess and checks the one-line error,
the exit status, and what is (and is not) left on disk."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_checks import one_line_error as any_one_line_error
from mlx.utils import tree_flatten
from reference import build_reference
from tokenizer_fixture import write_test_tokenizer

from mlx_diffgemma import generate, load
from mlx_diffgemma.tuner import adapters

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
UMASK = 0o027  # the children's: new files must get 0o640, not mkstemp's 0o600
WORDS = "the dog fox river tree forest cold clear".split()
GOOD = json.dumps({"prompt": "the dog", "completion": "the dog"}) + "\n"


def _child_setup():
    os.umask(UMASK)
    # A shell's background job ignores SIGINT, and the child would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        preexec_fn=_child_setup,
    )


# Every failure here exits 1 unless a test says otherwise.
one_line_error = functools.partial(any_one_line_error, code=1)


def lora(*args, **kw):
    return run("-m", "mlx_diffgemma.lora", *args, **kw)


def fuse(*args, **kw):
    return run("-m", "mlx_diffgemma.fuse", *args, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    build_reference(path, seed=0)  # 5 layers: fewer than mlx_lm.lora's default 16
    write_test_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("valid", 8)):
        rows = []
        for _ in range(n):
            words = " ".join(rng.choice(WORDS, size=3))
            rows.append(json.dumps({"prompt": words, "completion": f"{words} {words}"}) + "\n")
        (path / f"{split}.jsonl").write_text("".join(rows))
    return path


def weights_of(model) -> dict:
    return dict(tree_flatten(model.parameters()))


def no_temporary_files(directory: Path):
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], list(directory.iterdir())


# -- 2: --num-layers not given, and 7: --train-router -----------------------------------
#
# The router tests train without --num-layers on a 5-layer model: mlx_lm.lora's
# default of 16 is cut to the model's layers (item 2's case).


def test_num_layers_given_beyond_the_model_stays_an_error(model_dir, data_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("num_layers: 16\n")  # the default's value, but given: refused as mlx_lm.lora does
    args = ("--model", model_dir, "--train", "--data", data_dir, "--adapter-path", tmp_path / "a")
    one_line_error(lora(*args, "-c", config), "--num-layers 16", "the model has 5 layers")
    assert not (tmp_path / "a").exists()


def train_with_router(model_dir, data_dir, out, kind):
    r = lora(
        "--model", model_dir, "--train", "--data", data_dir, "--fine-tune-type", kind, "--train-router",
        "--iters", "2", "--learning-rate", "1e-2", "--adapter-path", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    config = json.loads((out / adapters.CONFIG_FILE).read_text())
    assert config["train_router"] is True and config["num_layers"] == 5
    saved = mx.load(str(out / adapters.ADAPTER_FILE))
    assert {int(name.split(".")[1]) for name in saved} == set(range(5))  # every layer adapted
    routers = [name for name in saved if ".router." in name]
    base = weights_of(load(str(model_dir))[0])
    assert routers and any(not mx.array_equal(saved[n], base[n]) for n in routers)  # they trained
    # load(adapter_path=...) gives exactly the saved weights
    model, tokenizer = load(str(model_dir), adapter_path=str(out))
    loaded = weights_of(model)
    assert all(mx.array_equal(loaded[n], saved[n]) for n in saved)
    # fuse keeps the trained routers
    r = fuse("--model", model_dir, "--adapter-path", out, "--save-path", out.parent / "fused")
    assert r.returncode == 0, r.stderr
    fused = weights_of(load(str(out.parent / "fused"))[0])
    assert all(mx.array_equal(fused[n], saved[n]) for n in routers)
    return model, tokenizer, saved


def test_lora_with_the_router_loads_generates_fuses_and_resumes(model_dir, data_dir, tmp_path):
    out = tmp_path / "adapters"
    model, tokenizer, saved = train_with_router(model_dir, data_dir, out, "lora")
    # generate --adapter-path writes what the library writes with them
    expected = generate(model, tokenizer, "the dog", max_tokens=8, seed=1, max_denoising_steps=2)
    r = run(
        "-m", "mlx_diffgemma.generate", "--model", model_dir, "--adapter-path", out, "--prompt", "the dog",
        "--ignore-chat-template", "--max-tokens", "8", "--seed", "1", "--max-denoising-steps", "2", "--no-live",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected
    # --resume-adapter-file starts from them: with a zero learning rate they come back unchanged
    again = tmp_path / "again"
    r = lora(
        "--model", model_dir, "--train", "--data", data_dir, "--train-router", "--iters", "1",
        "--learning-rate", "0", "--adapter-path", again, "--resume-adapter-file", out / adapters.ADAPTER_FILE,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    resumed = mx.load(str(again / adapters.ADAPTER_FILE))
    assert resumed.keys() == saved.keys()
    assert all(mx.array_equal(resumed[n], saved[n]) for n in saved)


def test_dora_with_the_router_loads_and_fuses(model_dir, data_dir, tmp_path):
    out = tmp_path / "adapters"
    _, _, saved = train_with_router(model_dir, data_dir, out, "dora")
    # Resumed without --train-router, the router tensors are named, not silently dropped.
    r = lora(
        "--model", model_dir, "--train", "--data", data_dir, "--fine-tune-type", "dora", "--iters", "1",
        "--adapter-path", tmp_path / "x", "--resume-adapter-file", out / adapters.ADAPTER_FILE,
    )  # fmt: skip
    line = one_line_error(r, str(out / adapters.ADAPTER_FILE), "--train-router")
    assert ".router." in line
    assert not (tmp_path / "x").exists()


# -- 6 and 14: Ctrl-C -------------------------------------------------------------------


def interrupt_when(args, ready, log: Path, timeout=120):
    """Start the command (stdout to ``log``), send SIGINT once ``ready(log's text)``.

    Returns (status, stderr, whether it was still running when interrupted)."""
    with open(log, "w") as stdout:
        p = subprocess.Popen(
            [sys.executable, *map(str, args)],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            preexec_fn=_child_setup,
        )
        deadline = time.monotonic() + timeout
        while not ready(log.read_text()) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        running = p.poll() is None
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    return p.returncode, err, running


def lora_training(model_dir, data_dir, out, *more):
    return ["-m", "mlx_diffgemma.lora", "--model", model_dir, "--train", "--data", data_dir,
            "--iters", "100000", "--steps-per-report", "1", "--adapter-path", out, *more]  # fmt: skip


def test_ctrl_c_during_training_leaves_loadable_adapters(model_dir, data_dir, tmp_path):
    out = tmp_path / "adapters"
    args = lora_training(model_dir, data_dir, out, "--save-every", "3")
    status, stderr, running = interrupt_when(args, lambda log: "Iter 7: Train loss" in log, tmp_path / "log")
    assert running and status == 130, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("training interrupted; the last saved adapters (iteration "), stderr
    assert lines[0].endswith(f") are in {out}"), lines[0]
    iteration = int(lines[0].split("(iteration ")[1].split(")")[0])
    assert iteration >= 6 and iteration % 3 == 0
    # What it says is on disk: the two files agree and load, nothing half-written, modes from the umask.
    no_temporary_files(out)
    loaded = weights_of(load(str(model_dir), adapter_path=str(out))[0])
    saved = mx.load(str(out / adapters.ADAPTER_FILE))
    assert saved and all(mx.array_equal(loaded[n], v) for n, v in saved.items())
    assert json.loads((out / adapters.CONFIG_FILE).read_text())["save_every"] == 3
    for name in (adapters.ADAPTER_FILE, adapters.CONFIG_FILE):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~UMASK


def test_ctrl_c_before_the_first_save_writes_nothing(model_dir, data_dir, tmp_path):
    out = tmp_path / "new" / "adapters"
    args = lora_training(model_dir, data_dir, out)  # saves every 100 iterations
    status, stderr, running = interrupt_when(args, lambda log: "Iter 2: Train loss" in log, tmp_path / "log")
    assert running and status == 130, stderr
    one_line_error(
        subprocess.CompletedProcess(args, status, "", stderr),
        "training interrupted before its first save (every 100 iterations); nothing was written to",
        code=130,
    )
    assert not (tmp_path / "new").exists()  # the directories made to check --adapter-path are gone


@pytest.fixture(scope="module")
def untrained_adapters(model_dir, tmp_path_factory):
    """A LoRA adapter as the trainer saves it, before any step (fuse has real work to do)."""
    path = tmp_path_factory.mktemp("adapters")
    model = load(str(model_dir))[0]
    params = adapters.prepare(model, "lora", -1)
    adapters.save_adapters(model, path / adapters.ADAPTER_FILE, {"fine_tune_type": "lora", "num_layers": -1,
                                                                 "lora_parameters": params})  # fmt: skip
    return path


@pytest.mark.parametrize("command, delay", [("fuse", 2.0), ("lora", 1.5)])  # earlier: test_bad_input
def test_ctrl_c_while_the_libraries_load(model_dir, data_dir, untrained_adapters, tmp_path, command, delay):
    """No traceback, whichever import the interrupt lands in; status 130, nothing written."""
    out = tmp_path / "out"
    if command == "fuse":
        args = ["-m", "mlx_diffgemma.fuse", "--model", model_dir, "--adapter-path", untrained_adapters]
        args += ["--save-path", out]
    else:
        args = lora_training(model_dir, data_dir, out)
    start = time.monotonic()
    status, stderr, running = interrupt_when(args, lambda log: time.monotonic() > start + delay, tmp_path / "log")
    if not running:
        pytest.skip(f"{command} finished within {delay}s, before the interrupt")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    # -2: Python's own exit on an interrupt that no handler caught (the shell shows 130)
    assert status in (130, -signal.SIGINT), (status, stderr)
    assert len(stderr.strip().splitlines()) <= 1, stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*")), list(tmp_path.iterdir())


# -- 6 and 14: bad data and options, before anything is written ---------------------------


def message(role="user", content="the dog"):
    return json.dumps({"messages": [{"role": role, "content": content}, {"role": "assistant", "content": "ok"}]})


@pytest.mark.parametrize(
    "train, valid, needles",
    [
        (GOOD.encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n', GOOD * 4, ["train.jsonl:2: not UTF-8", "0xe9"]),
        ((GOOD + message("bob") + "\n").encode(), GOOD * 4, ["train.jsonl:2", "role 'bob'", "user, assistant"]),
        (GOOD.encode() * 4, "\n \n", ["valid.jsonl: no examples", "empty or blank"]),
    ],
    ids=["not-utf8", "unknown-role", "blank-split"],
)
def test_bad_data_names_file_and_line_and_leaves_nothing(model_dir, tmp_path, train, valid, needles):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(train)
    (data / "valid.jsonl").write_text(valid)
    r = lora("--model", model_dir, "--train", "--data", data, "--adapter-path", tmp_path / "a" / "b")
    one_line_error(r, *needles)
    assert not (tmp_path / "a").exists()  # a failed start leaves no empty adapter directory


def test_data_given_as_a_file_or_a_malformed_config(model_dir, data_dir, tmp_path):
    r = lora("--model", model_dir, "--train", "--data", data_dir / "train.jsonl", "--adapter-path", tmp_path / "a")
    one_line_error(r, f"--data {data_dir / 'train.jsonl'}: a file, not a directory", "train.jsonl and valid.jsonl")
    config = tmp_path / "c.yaml"
    config.write_text("iters: 3\nlora_parameters: {rank: 4\n")
    one_line_error(lora("-c", config), f"{config}:3: not valid YAML")
    assert not (tmp_path / "a").exists()


def test_data_lines_are_numbered_as_an_editor_numbers_them(tokenizer, tmp_path):
    """Lines split at newlines only (a JSON string may hold U+2028), a byte-order mark allowed."""
    from mlx_diffgemma.tuner.datasets import DataError, read_jsonl

    path = tmp_path / "train.jsonl"
    path.write_text("\ufeff" + json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\r\n{bad\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        read_jsonl(path, tokenizer)
    path.write_text("\ufeff" + json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\r\n")
    assert len(read_jsonl(path, tokenizer)) == 1


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load(str(model_dir))[1]


# -- 12: fuse's save path ---------------------------------------------------------------


def test_fuse_refuses_a_save_path_inside_or_around_its_sources(model_dir, untrained_adapters, tmp_path):
    before = sorted(p.name for p in model_dir.iterdir())
    r = fuse("--model", model_dir, "--adapter-path", untrained_adapters, "--save-path", model_dir / "fused")
    one_line_error(r, f"--save-path {model_dir / 'fused'}: inside the model directory")
    assert sorted(p.name for p in model_dir.iterdir()) == before
    r = fuse("--model", model_dir, "--adapter-path", untrained_adapters, "--save-path", untrained_adapters.parent)
    one_line_error(r, f"--save-path {untrained_adapters.parent}: holds the adapter directory")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    r = fuse("--model", model_dir, "--adapter-path", untrained_adapters, "--save-path", notes, "--force")
    one_line_error(r, "not a model directory", "choose another --save-path")
    assert (notes / "keep.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


# -- 10: new adapter files follow the umask ------------------------------------------------


def test_adapter_files_follow_the_umask_and_keep_a_replaced_files_mode(tmp_path):
    old = os.umask(0o027)
    try:
        new = tmp_path / "new.json"
        adapters.atomic_write(new, lambda tmp: Path(tmp).write_text("{}"))
        assert new.stat().st_mode & 0o777 == 0o640
        os.chmod(new, 0o604)
        adapters.atomic_write(new, lambda tmp: Path(tmp).write_text("[]"))
        assert new.stat().st_mode & 0o777 == 0o604 and new.read_text() == "[]"
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["new.json"]


# -- 17: examples/shift/build.py says what it builds -----------------------------------------


def test_the_shift_example_describes_its_canvases():
    import importlib.util

    path = Path(__file__).parent.parent / "examples" / "shift" / "build.py"
    spec = importlib.util.spec_from_file_location("shift_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    # An answer is the string and <turn|>: MIN_LENGTH + 1 to MAX_LENGTH + 1 tokens.
    fewest = -(-(build.MIN_LENGTH + 1) // build.CANVAS_LENGTH)
    most = -(-(build.MAX_LENGTH + 1) // build.CANVAS_LENGTH)
    assert (fewest, most, build.CANVAS_LENGTH) == (2, 4, 32)
    assert f"{fewest} to {most} canvases of ``CANVAS_LENGTH`` ({build.CANVAS_LENGTH}) tokens" in build.__doc__
    assert "256" not in build.__doc__
