"""Bad input, tried as a user would: every case ends in one line naming the
problem and a non-zero exit (or a ValueError/TypeError naming the parameter
from the API), never a traceback, never a silently wrong answer, and nothing
is lost. The numbers are those of the issue that listed the cases."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from cli_checks import one_line_error
from reference import CANVAS, build_reference
from tokenizer_fixture import write_test_tokenizer

from mlx_diffgemma import generate, load, stream_generate
from mlx_diffgemma.convert import convert
from mlx_diffgemma.utils import LoadError, get_model_path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
FAST = ["--max-tokens", "16", "--max-denoising-steps", "2"]
# Root reads and writes anything; without these capabilities it obeys file
# permissions as a user does (CI runs as root).
AS_USER = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)
needs_permissions = pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv ignores file permissions"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_input_model")
    build_reference(path, seed=0)
    write_test_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return load(str(model_dir))


@pytest.fixture
def copy_of(model_dir, tmp_path):
    def copy(name="model"):
        target = tmp_path / name
        shutil.copytree(model_dir, target)
        return target

    return copy


def run(*args, stdin=b"", prefix=(), timeout=180, shell_tail=""):
    command = [*prefix, sys.executable, *map(str, args)]
    if shell_tail:  # e.g. "0<&-": run through a shell to close a descriptor
        command = ["bash", "-c", " ".join(f"'{c}'" for c in command) + " " + shell_tail]
    r = subprocess.run(command, input=None if shell_tail else stdin, capture_output=True, env=ENV, timeout=timeout)
    r.stdout, r.stderr = (x.decode("utf-8", "replace") for x in (r.stdout, r.stderr))
    return r


def set_tensor(model_path: Path, name: str, change):
    """Rewrite one tensor of a checkpoint's single shard: ``change(array) -> array``."""
    shard = model_path / "model.safetensors"
    tensors = dict(mx.load(str(shard)))
    tensors[name] = change(tensors[name])
    mx.save_safetensors(str(shard), tensors, metadata={"format": "pt"})


WEIGHT = "model.decoder.layers.0.mlp.down_proj.weight"


# -- 1. Sampler values must be finite and in range ----------------------------


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    "flag, value",
    [("--t-min", "nan"), ("--t-max", "inf"), ("--entropy-bound", "nan"), ("--confidence-threshold", "nan")],
)
def test_sampler_flags_must_be_finite(model_dir, command, flag, value):
    r = run("-m", f"mlx_diffgemma.{command}", "--model", model_dir, flag, value)
    one_line_error(r, flag, "finite", code=2)


@pytest.mark.parametrize(
    "name, value",
    [
        ("t_min", float("nan")),
        ("t_max", float("inf")),
        ("entropy_bound", float("nan")),
        ("confidence_threshold", float("nan")),
    ],
)
def test_sampler_values_must_be_finite(model, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        generate(*model, "hello", max_tokens=4, **{name: value})


# -- 2. Non-finite weights -----------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_stop_generation(copy_of, bad):
    path = copy_of()
    set_tensor(path, WEIGHT, lambda w: mx.where(mx.arange(w.size).reshape(w.shape) == 7, bad, w))
    r = run("-m", "mlx_diffgemma.generate", "--model", path, *FAST)
    one_line_error(r, "non-finite", str(path))
    assert "<pad>" not in r.stdout
    model, tokenizer = load(str(path))
    with pytest.raises(ValueError, match="non-finite"):
        list(stream_generate(model, tokenizer, "hello", max_tokens=4))


def test_convert_refuses_non_finite_weights(copy_of, tmp_path):
    path = copy_of()
    set_tensor(path, WEIGHT, lambda w: mx.where(mx.arange(w.size).reshape(w.shape) == 3, float("nan"), w))
    target = tmp_path / "out"
    r = run("-m", "mlx_diffgemma.convert", "--hf-path", path, "--mlx-path", target, "--q-bits", "4")
    one_line_error(r, WEIGHT, "NaN or infinite")
    assert not target.exists() and not list(tmp_path.glob(".out.*"))


# -- 3. Weight dtypes and shapes name tensor and file ---------------------------


@pytest.mark.parametrize("dtype", [mx.int8, mx.int32])
def test_integer_weights_are_rejected_by_load(copy_of, dtype):
    path = copy_of()
    set_tensor(path, WEIGHT, lambda w: w.astype(dtype))
    with pytest.raises(LoadError, match=rf"model.safetensors: tensor {WEIGHT} has dtype {str(dtype).split('.')[-1]}"):
        load(str(path))
    r = run("-m", "mlx_diffgemma.generate", "--model", path, *FAST)
    one_line_error(r, "model.safetensors", WEIGHT, "floating-point")


def test_a_wrong_shape_names_file_and_tensor(copy_of):
    path = copy_of()
    set_tensor(path, WEIGHT, lambda w: w[:, :-1])
    with pytest.raises(LoadError, match=rf"model.safetensors: tensor {WEIGHT} has shape"):
        load(str(path))


# -- 4. The whole generation must fit the context -------------------------------


def test_the_whole_generation_is_checked_against_the_context(model):
    m, tokenizer = model
    context = m.args.max_position_embeddings
    prompt = [5] * (context - CANVAS - 10)  # room for one canvas, not for three
    with pytest.raises(
        ValueError, match=rf"max_tokens={3 * CANVAS}: .* need {len(prompt) + 3 * CANVAS} positions.*{context}"
    ):
        generate(m, tokenizer, prompt, max_tokens=3 * CANVAS)


def test_the_command_checks_the_whole_generation(model_dir):
    long_prompt = ("word " * 4040).encode()
    r = run(
        "-m", "mlx_diffgemma.generate", "--model", model_dir, "--prompt", "-", "--max-tokens", "64", stdin=long_prompt
    )
    one_line_error(r, "max_tokens=64", "4096")


# -- 5. Seeds -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("seed", ["-1", str(2**70), "x"])
def test_bad_seed_flags(model_dir, command, seed):
    one_line_error(run("-m", f"mlx_diffgemma.{command}", "--model", model_dir, "--seed", seed), "--seed", code=2)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), ("x", TypeError), (1.5, TypeError), (2**64, ValueError)])
def test_bad_seeds(model, seed, error):
    with pytest.raises(error, match="seed"):
        generate(*model, "hello", max_tokens=4, seed=seed)


def test_the_largest_seed_lasts_a_conversation(model_dir):
    r = run(
        "-m",
        "mlx_diffgemma.chat",
        "--model",
        model_dir,
        "--seed",
        str(2**64 - 1),
        *FAST,
        stdin=b"first turn\nsecond turn\n",
    )
    assert r.returncode == 0, r.stderr
    assert ">> first turn" in r.stdout and ">> second turn" in r.stdout and "Traceback" not in r.stderr


# -- 6. Invalid UTF-8 on standard input -------------------------------------------


def test_generate_replaces_bytes_that_are_not_utf8(model_dir):
    r = run("-m", "mlx_diffgemma.generate", "--model", model_dir, "--prompt", "-", *FAST, stdin=b"hello \xff\xfe there")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    one_line_error(subprocess.CompletedProcess([], 1, "", r.stderr), "not valid UTF-8", "U+FFFD")


def test_chat_keeps_the_conversation_through_bytes_that_are_not_utf8(model_dir):
    r = run(
        "-m", "mlx_diffgemma.chat", "--model", model_dir, *FAST, "--verbose", stdin=b"hi \xff there\ntell me more\n"
    )
    assert r.returncode == 0, r.stderr
    assert ">> hi \ufffd there" in r.stdout and ">> tell me more" in r.stdout
    # The second turn continued the first: the conversation stayed encoded.
    assert r.stdout.count("Generation:") == 2 and "turn dropped" not in r.stdout
    assert "not valid UTF-8" in r.stderr and "Traceback" not in r.stderr


# -- 7. A closed standard input -----------------------------------------------------


@pytest.mark.parametrize("args", [["mlx_diffgemma.chat"], ["mlx_diffgemma.generate", "--prompt", "-"]])
def test_a_closed_stdin(model_dir, args):
    r = run("-m", *args, "--model", str(model_dir), shell_tail="0<&-")
    one_line_error(r, "standard input is closed")


# -- 8. Unreadable files and directories ---------------------------------------------


@needs_permissions
@pytest.mark.parametrize("unreadable", ["config.json", "tokenizer.json", "."])
@pytest.mark.parametrize("how", ["generate", "chat", "load"])
def test_unreadable_checkpoint_files(copy_of, unreadable, how):
    path = copy_of()
    locked = (path / unreadable).resolve()
    os.chmod(locked, 0)
    try:
        if how == "load":
            code = (
                f"from mlx_diffgemma import load\ntry:\n    load({str(path)!r})\n"
                "except ValueError as e:\n    raise SystemExit(str(e))"
            )
            r = run("-c", code, prefix=AS_USER)
        else:
            r = run("-m", f"mlx_diffgemma.{how}", "--model", path, *FAST, stdin=b"hi\n", prefix=AS_USER)
        one_line_error(r, str(locked), "ermission denied")
    finally:
        os.chmod(locked, 0o755)


# -- 9. Template arguments the command sets itself -------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_template_config_cannot_set_what_the_command_sets(model_dir, command):
    r = run(
        "-m",
        f"mlx_diffgemma.{command}",
        "--model",
        model_dir,
        "--chat-template-config",
        '{"add_generation_prompt": false}',
    )
    one_line_error(r, "--chat-template-config", "add_generation_prompt", code=2)


# -- 10. A quantization block MLX cannot use --------------------------------------------


@pytest.fixture(scope="module")
def quantized_dir(model_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("q") / "tiny-4bit"
    convert(str(model_dir), str(target), q_bits=4, progress=False)
    return target


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda q: [4], ("config.json", "quantization must be an object")),
        (
            lambda q: dict(q, **{"layers.0.mlp.gate_proj": {"bits": 13, "group_size": 64}}),
            ("config.json", "layers.0.mlp.gate_proj", "bits 13"),
        ),
        (lambda q: dict(q, **{"layers.1.mlp.up_proj": [4, 64]}), ("config.json", "layers.1.mlp.up_proj")),
    ],
)
def test_bad_quantization_blocks(quantized_dir, tmp_path, change, needles):
    path = tmp_path / "q"
    shutil.copytree(quantized_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization"] = change(config["quantization"])
    (path / "config.json").write_text(json.dumps(config))
    one_line_error(run("-m", "mlx_diffgemma.generate", "--model", path, *FAST), *needles)
    with pytest.raises(LoadError, match="config.json"):
        load(str(path))


# -- 11. The Python API names the parameter ------------------------------------------------


@pytest.mark.parametrize(
    "prompt, kwargs, error, match",
    [
        (None, {}, TypeError, "prompt must be"),
        (3.5, {}, TypeError, "prompt must be"),
        ("hello", dict(t_min="0.4"), TypeError, "t_min must be a number"),
        ("hello", dict(max_denoising_steps=2.0), TypeError, "max_denoising_steps must be an integer"),
        (["hello", ""], {}, ValueError, "prompt 1 is empty"),
        (["hello", None], {}, TypeError, "prompt 1 must be"),
        ("bad \ud800 text", {}, ValueError, "prompt is not valid text"),
    ],
)
def test_api_errors_name_the_parameter(model, prompt, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(*model, prompt, max_tokens=4, **kwargs)


# -- 12-14. The converter never loses anything -----------------------------------------------


def test_force_does_not_replace_a_directory_that_is_not_a_model(model_dir, tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "thesis.txt").write_text("years of work")
    r = run("-m", "mlx_diffgemma.convert", "--hf-path", model_dir, "--mlx-path", target, "--q-bits", "4", "--force")
    one_line_error(r, str(target), "not a model directory")
    assert (target / "thesis.txt").read_text() == "years of work"


def test_a_killed_conversion_is_cleaned_up_by_the_next(model_dir, tmp_path):
    target = tmp_path / "out"
    killed = (
        "import os, signal\nfrom pathlib import Path\nfrom mlx_diffgemma.convert import staged_directory\n"
        f"with staged_directory(Path({str(target)!r}), False) as staging:\n"
        "    (staging / 'model.safetensors').write_bytes(b'half a shard')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert run("-c", killed).returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".out.*.partial")
    r = run("-m", "mlx_diffgemma.convert", "--hf-path", model_dir, "--mlx-path", target, "--q-bits", "4")
    assert r.returncode == 0, r.stderr
    assert f"Removed {stale}" in r.stdout
    assert not list(tmp_path.glob(".out.*")) and load(str(target))


@needs_permissions
def test_a_read_only_target_names_the_target(model_dir, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        target = parent / "out"
        r = run(
            "-m", "mlx_diffgemma.convert", "--hf-path", model_dir, "--mlx-path", target, "--q-bits", "4", prefix=AS_USER
        )
        line = one_line_error(r, f"{target}: cannot write there")
        assert ".partial" not in line
    finally:
        os.chmod(parent, 0o755)


# -- 15. The Hub error is one complete line --------------------------------------------------


def test_the_hub_error_is_complete(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError) as e:
        get_model_path("nobody-here/no-such-model")
    message = str(e.value)
    assert "\n" not in message and message.count("(") == message.count(")")
    assert "Hugging Face Hub" in message and "pass its directory instead" in message
    r = run("-m", "mlx_diffgemma.generate", "--model", "nobody-here/no-such-model")
    one_line_error(r, "nobody-here/no-such-model", "pass its directory instead")


# -- 16. A slow BLAS is named, long phases show progress ---------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="the bundled reference BLAS is the Linux wheel's")
def test_the_benchmark_says_how_to_get_a_fast_blas():
    args = [
        "-m",
        "mlx_diffgemma.benchmark",
        "--preset",
        "tiny",
        "-p",
        "16",
        "-g",
        "40",  # two canvases of the tiny preset (32 tokens)
        "--fixed-steps",
        "2",
    ]
    env = {k: v for k, v in ENV.items() if k != "LD_PRELOAD"}
    slow = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert slow.returncode == 0, slow.stderr
    assert slow.stderr.count("LD_PRELOAD=") == 1 and "libopenblas0-pthread" in slow.stderr
    assert "canvas 1 of 2" in slow.stderr and "canvas 2 of 2" in slow.stderr
    openblas = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    if Path(openblas).exists():
        fast = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, env=dict(env, LD_PRELOAD=openblas), timeout=300
        )
        assert fast.returncode == 0 and "LD_PRELOAD=" not in fast.stderr


# -- 17. The converter's summary is exactly true -------------------------------------------------


def test_the_conversion_summary(model_dir, tmp_path):
    r = run("-m", "mlx_diffgemma.convert", "--hf-path", model_dir, "--mlx-path", tmp_path / "out", "--q-bits", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(line.startswith(("[INFO]", "[WARN]")) for line in lines), lines
    assert "0.00 GB" not in r.stdout and " MB" in r.stdout
    (experts,) = [line for line in lines if line.startswith("[INFO]   experts:")]
    # The tiny model's expert down-projections (24 inputs) fit no group size.
    assert "at 4-bit affine (group 64)" in experts and "kept in float32 (24 inputs fit no affine group size)" in experts
    assert "[INFO]   router: 5 modules kept in float32 (by the recipe)" in lines


# -- 18. Help that tells the truth ---------------------------------------------------------------


def test_help_texts():
    generate_help = run("-m", "mlx_diffgemma.generate", "--help").stdout
    assert "canvas of 256" not in generate_help and "--verbose [true|false]" in generate_help
    convert_help = run("-m", "mlx_diffgemma.convert", "--help").stdout
    assert "{16,32,64,128}" not in convert_help
    from mlx_diffgemma.cli.benchmark import setup_arg_parser

    for action in setup_arg_parser()._actions:
        assert action.help, action.dest
    one_line_error(run("-m", "mlx_diffgemma.benchmark", "--recipe", "bogus"), "--recipe", "mixed", code=2)


def test_group_size_16_for_affine_is_one_line(model_dir, tmp_path):
    r = run("-m", "mlx_diffgemma.convert", "--hf-path", model_dir, "--mlx-path", tmp_path / "o", "--q-group-size", "16")
    one_line_error(r, "16")


# -- 19. /think says that it re-encodes -------------------------------------------------------------


def test_think_says_it_encodes_the_conversation_again(model_dir):
    r = run("-m", "mlx_diffgemma.chat", "--model", model_dir, *FAST, stdin=b"hello\n/think\nagain\n")
    assert r.returncode == 0, r.stderr
    assert "[thinking on] the next turn encodes the conversation again" in r.stdout


def test_think_before_any_turn_says_nothing_more(model_dir):
    r = run("-m", "mlx_diffgemma.chat", "--model", model_dir, *FAST, stdin=b"/think\n")
    assert "[thinking on]\n" in r.stdout


# -- Issue 21: the ecosystem's conventions, third round ----------------------------------------------

BROKEN_TEMPLATE = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"


def _break(path: Path, what: str) -> str:
    """Spoil one tokenizer file of a checkpoint; returns what the error must say."""
    if what == "template syntax":
        (path / "chat_template.jinja").write_text(BROKEN_TEMPLATE)
        return f"{path / 'chat_template.jinja'}: line 2: not a valid chat template (unexpected '}}')"
    if what == "template in tokenizer_config.json":
        (path / "chat_template.jinja").unlink()
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = "{% if %}"
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        return f"{path / 'tokenizer_config.json'}: template 'default', line 1: not a valid chat template"
    if what == "tokenizer.json not a tokenizer":
        (path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
        return f"{path / 'tokenizer.json'}: cannot build the tokenizer"
    (path / what).write_text('{"truncated": ')
    return f"{path / what}: not valid JSON"


CHECKPOINT_FILES = [
    "template syntax",
    "template in tokenizer_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.json not a tokenizer",
]


@pytest.mark.parametrize("what", CHECKPOINT_FILES)
def test_a_broken_tokenizer_file_is_named(copy_of, what):
    path = copy_of()
    message = _break(path, what)
    r = run("-m", "mlx_diffgemma.generate", "--model", path, *FAST)
    one_line_error(r, message, code=1)


@pytest.mark.parametrize("command", ["chat", "server"])
def test_chat_and_the_server_refuse_a_broken_template(copy_of, command):
    path = copy_of()
    message = _break(path, "template syntax")
    extra = ["--port", "0"] if command == "server" else FAST
    r = run("-m", f"mlx_diffgemma.{command}", "--model", path, *extra, stdin=b"hi\n", timeout=60)
    # The server logs what it loads (INFO lines) before it stops on the error.
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if " INFO " not in line)
    one_line_error(r, message)


def test_a_template_that_rejects_the_conversation(copy_of):
    path = copy_of()
    (path / "chat_template.jinja").write_text("{{ raise_exception('System role not supported') }}")
    r = run("-m", "mlx_diffgemma.generate", "--model", path, *FAST)
    one_line_error(r, "the chat template rejected the conversation: System role not supported", code=1)


def test_every_documented_entry_point_is_exported():
    """`from mlx_diffgemma import X` gives the function, even after the stub
    modules of the same names were imported."""
    code = (
        "import mlx_diffgemma.edit, mlx_diffgemma.fuse, mlx_diffgemma.infill\n"
        "from mlx_diffgemma import infill, stream_infill, edit, stream_edit, fuse, convert, load, generate, "
        "stream_generate, chat, stream_chat, SamplerParams\n"
        "import sys\n"
        "m, f, c = (sys.modules[f'mlx_diffgemma.{name}'] for name in ('infill', 'fuse', 'convert'))\n"
        "assert (infill, stream_infill, edit, stream_edit) == (m.infill, m.stream_infill, m.edit, m.stream_edit)\n"
        "assert fuse is f.fuse and convert is c.convert\n"
        "import inspect\n"
        "assert all(inspect.isfunction(x) for x in (infill, edit, fuse, convert, load, generate, chat))\n"
        "print(sorted(mlx_diffgemma.__all__))"
    )
    r = run("-c", code)
    assert r.returncode == 0, r.stderr
    for name in ("infill", "stream_infill", "edit", "stream_edit", "fuse"):
        assert f"'{name}'" in r.stdout


def test_every_documented_command_is_installed():
    """The commands docs/cli.md lists are console scripts, and each answers --help."""
    documented = re.findall(r"^(mlx_diffgemma\.\w+) ", (ROOT / "docs" / "cli.md").read_text(), re.M)
    assert "mlx_diffgemma.edit" in documented and len(set(documented)) == 8
    for command in sorted(set(documented)):
        path = shutil.which(command)
        assert path, f"{command} is documented but not installed"
        r = subprocess.run([path, "--help"], capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, (command, r.stderr)


def test_a_raw_prompt_is_read_after_bos(model_dir, model):
    """--ignore-chat-template, and text given to the library, start from <bos> as
    the chat template does: the same answer as the ids [<bos>, ...] given directly."""
    net, tokenizer = model
    text = "The sea is"
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    want = generate(net, tokenizer, ids, max_tokens=16, max_denoising_steps=2, seed=4)
    assert generate(net, tokenizer, text, max_tokens=16, max_denoising_steps=2, seed=4) == want
    # Text that spells <bos> first gets no second one.
    first = list(stream_generate(net, tokenizer, "<bos>" + text, max_tokens=16, max_denoising_steps=2, seed=4))
    assert first[-1].prompt_tokens == len(ids)
    r = run(
        *("-m", "mlx_diffgemma.generate", "--model", model_dir, "--ignore-chat-template", "--prompt", text),
        *("--max-tokens", "16", "--max-denoising-steps", "2", "--seed", "4"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


# Commands whose first seconds are imports: Ctrl-C there used to print a
# KeyboardInterrupt traceback, before the command's handler existed.
INTERRUPTED = {
    "generate": ["--prompt", "hi"],
    "chat": [],
    "convert": ["--mlx-path", "never-written"],
    "edit": ["--file", "-", "--span", "0:1"],
    "fuse": ["--adapter-path", "adapters"],
    "lora": ["--train"],
    "server": ["--port", "0"],
    "benchmark": ["--preset", "tiny"],
}


@pytest.mark.parametrize("command", sorted(INTERRUPTED))
def test_ctrl_c_while_a_command_starts(model_dir, tmp_path, command):
    args = INTERRUPTED[command]
    flag = "--hf-path" if command == "convert" else "--model"
    if command != "benchmark":
        args = [flag, str(model_dir), *args]
    for delay in (0.4, 1.2):
        p = subprocess.Popen(
            [sys.executable, "-m", f"mlx_diffgemma.{command}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
            cwd=tmp_path,
        )
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        err = err.decode("utf-8", "replace")
        assert "Traceback (most recent call last)" not in err, (command, delay, err)
        assert p.returncode in (130, -signal.SIGINT), (command, delay, p.returncode, err)
    assert not (tmp_path / "never-written").exists()


def test_ctrl_c_inside_a_finalizer_still_stops_a_command():
    """Python ignores (and prints) an interrupt raised in a ``__del__``, as one
    landing in a library's finalizer while a command's imports run; the command
    stops as interrupted all the same, unwinding, with nothing printed."""
    code = (
        "import sys\nsys.argv = ['mlx_diffgemma.fuse']\nimport mlx_diffgemma, time\n"
        "class Finalizer:\n    def __del__(self):\n        raise KeyboardInterrupt\n"
        "try:\n    Finalizer()\n    time.sleep(5)\n    print('ran on')\nfinally:\n    print('unwound')\n"
    )
    r = run("-c", code)
    assert r.returncode in (130, -signal.SIGINT), r
    assert r.stdout.split() == ["unwound"] and r.stderr == ""


def test_ctrl_c_during_the_imports_waits_for_them_to_finish():
    """A Ctrl-C in a command's imports is held until they are done: one landing
    inside a C++ extension's call back into Python (torch's pybind11) would
    abort the process instead. Here it arrives while mlx_lm is being imported;
    the command still stops as interrupted, after the package's last import."""
    code = (
        "import os, signal, sys\nsys.argv = ['mlx_diffgemma.fuse']\n"
        "class Interrupt:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlx_lm':\n            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "try:\n    import mlx_diffgemma\nexcept KeyboardInterrupt:\n"
        "    handler = signal.getsignal(signal.SIGINT)\n"
        "    print('mlx_diffgemma.utils' in sys.modules, handler is signal.default_int_handler)\n"
        "    raise\n"
    )
    r = run("-c", code)
    assert r.returncode in (130, -signal.SIGINT), r
    assert r.stdout.split() == ["True", "True"] and r.stderr == ""


def test_chat_does_not_send_an_unknown_command(model_dir):
    r = run("-m", "mlx_diffgemma.chat", "--model", model_dir, *FAST, "--verbose", "true", stdin=b"/bogus\n")
    assert r.returncode == 0, r.stderr
    assert "[unknown command /bogus: /help lists them" in r.stdout and "Prompt:" not in r.stdout
    # A path goes to the model, and // sends a line that starts with a slash.
    r = run(
        "-m", "mlx_diffgemma.chat", "--model", model_dir, *FAST, "--verbose", "true", stdin=b"/usr/bin/env\n//bogus\n"
    )
    assert r.returncode == 0, r.stderr
    assert "unknown command" not in r.stdout and r.stdout.count("Prompt:") == 2
