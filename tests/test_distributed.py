"""One model over two processes (mx.distributed, ring backend over localhost).

Each launch test starts two processes with mlx.launch, as a user would, and
compares what they produce with one process's: the same tokens for the same
seed, and (on random weights, whose sampling is chaotic) the same hidden
states and logits up to float32 rounding. The split pieces are also checked
alone, in this process: partial products of sliced layers sum to the whole.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from distributed_run import forward
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from openai import OpenAI
from reference import build_test_checkpoint

from mlx_diffgemma import distributed, load
from mlx_diffgemma.generate import stream_generate

ROOT = Path(__file__).resolve().parents[1]
SHIFT = ROOT / "examples" / "shift" / "model"
RUNNER = Path(__file__).with_name("distributed_run.py")
SPLITS = ("tensor", "pipeline")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def launch(*command, stdin: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """``mlx.launch --backend ring -n 2 <command>``: two local processes."""
    args = LAUNCHER + ["--backend", "ring", "-n", "2", "--starting-port", str(free_port()), *map(str, command)]
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_job(model: Path, split: str, job: dict, tmp_path: Path):
    """Both processes' results of ``job`` (see distributed_run.py)."""
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = tmp_path / f"out-{split}"
    done = launch(sys.executable, RUNNER, model, out, split, tmp_path / "job.json")
    # mlx.launch exits 0 whatever its processes do: each must have written its result.
    assert done.returncode == 0 and all(Path(f"{out}-{rank}.json").exists() for rank in range(2)), done.stderr[-3000:]
    return [json.loads(Path(f"{out}-{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """The tiny reference checkpoint (random weights), with the test tokenizer."""
    return build_test_checkpoint(tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def shift_4bit(tmp_path_factory):
    """The trained shift model converted to 4 bits (group 32: its widths split at whole groups)."""
    out = tmp_path_factory.mktemp("shift4") / "model"
    cmd = [sys.executable, "-m", "mlx_diffgemma.convert", "--hf-path", SHIFT, "--mlx-path", out, "--q-bits", "4"]
    done = subprocess.run(list(map(str, cmd)) + ["--q-group-size", "32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def one_process(model_path, job):
    model, tokenizer = load(str(model_path))
    out = []
    for g in job["generate"]:
        batch = isinstance(g["prompt"][0], list)
        rows = [[] for _ in range(len(g["prompt"]) if batch else 1)]
        kw = dict(seed=g["seed"], images=g.get("images"))
        for r in stream_generate(model, tokenizer, g["prompt"], g["max_tokens"], **kw):
            rows[r.row] += r.token_ids
        out.append(rows)
    return out


def shift_job(tokenizer_path):
    from mlx_diffgemma.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(tokenizer_path))
    a = tok.encode("shift 3: hello world")
    b = tok.encode("shift 1: the quick brown fox jumps over")
    return dict(
        generate=[
            dict(prompt=a, seed=1, max_tokens=64),
            dict(prompt=b, seed=7, max_tokens=96),
            dict(prompt=[a, b], seed=11, max_tokens=64),  # a left-padded batch
        ]
    )


# -- Launched: two processes against one --------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("bits", [None, 4])
def test_tokens_equal_one_process(split, bits, shift_4bit, tmp_path):
    model = SHIFT if bits is None else shift_4bit
    job = shift_job(SHIFT)
    want = one_process(model, job)
    ranks = run_job(model, split, job, tmp_path)
    assert all(len(row) > 0 for g in want for row in g)
    for result in ranks:
        assert result["generate"] == want
    # Each process holds its share: half the layers when pipelined, all of them (sliced) else.
    layers = [r["layers"] for r in ranks]
    assert layers == ([2, 2] if split == "pipeline" else [4, 4])


@pytest.mark.parametrize("split", SPLITS)
def test_hidden_states_and_logits_match(split, random_checkpoint, tmp_path):
    ids = [[(7 * i + 3) % 700 for i in range(n)] for n in (21, 40)]  # longer than the sliding window
    ranks = run_job(random_checkpoint, split, dict(forward=ids), tmp_path)
    model, _ = load(str(random_checkpoint))
    for k, row in enumerate(ids):
        cache = model.make_cache()
        hidden = model.encode(mx.array([row]), cache)
        logits = model.denoise(mx.array([row[: model.canvas_length]]), cache)
        for result in ranks:
            got = result["forward"][k]
            np.testing.assert_allclose(np.array(got["hidden"]), np.array(hidden), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(np.array(got["logits"]), np.array(logits), atol=1e-4, rtol=1e-4)
    if split == "pipeline":  # the pipeline runs the same sums in the same order
        assert ranks[0]["forward"] == ranks[1]["forward"]


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    """The tiny checkpoint with a vision tower, and two pictures."""
    from vision_checkpoint import picture, png, write_vision_checkpoint

    path = tmp_path_factory.mktemp("vision")
    write_vision_checkpoint(path)
    for i in range(2):
        (path / f"p{i}.png").write_bytes(png(picture(i)))
    return path


@pytest.mark.parametrize("split", SPLITS)
def test_images_on_a_split_model(split, vision_checkpoint, tmp_path):
    """A prompt with images gives one process's tokens; in the pipeline only
    the first stage holds (and runs) the vision tower."""
    pictures = [str(vision_checkpoint / "p0.png"), str(vision_checkpoint / "p1.png")]
    prompt = dict(prompt="<|image|> and <|image|>: two pictures of", images=pictures)
    job = dict(forward=[prompt], generate=[dict(prompt, seed=3, max_tokens=48)])
    ranks = run_job(vision_checkpoint, split, job, tmp_path)
    assert [r["vision"] for r in ranks] == ([True, False] if split == "pipeline" else [True, True])
    model, tokenizer = load(str(vision_checkpoint))
    want = forward(model, tokenizer, prompt)
    for result in ranks:
        for what in ("hidden", "logits"):
            np.testing.assert_allclose(np.array(result["forward"][0][what]), np.array(want[what]), atol=1e-4, rtol=1e-4)
    if split == "pipeline":  # the same sums in the same order: the same tokens (random weights are chaotic)
        want = one_process(vision_checkpoint, job)
        assert [r["generate"] for r in ranks] == [want, want]


def _cli(module, *args, stdin=""):
    single = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], input=stdin, capture_output=True, text=True, cwd=ROOT
    )
    assert single.returncode == 0, single.stderr
    return single.stdout


@pytest.mark.parametrize("split", SPLITS)
def test_generate_command(split):
    args = ["--model", SHIFT, "--prompt", "shift 2: abc xyz", "--max-tokens", "64", "--seed", "4", "--no-live"]
    want = _cli("mlx_diffgemma.generate", *args)
    extra = ["--pipeline"] if split == "pipeline" else []
    done = launch(sys.executable, "-m", "mlx_diffgemma.generate", *args, *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == want  # process 0 alone prints


def test_generate_prompt_from_stdin_refused():
    """mlx.launch never closes its processes' stdin: reading it to the end would hang."""
    args = ["--model", SHIFT, "--prompt", "-", "--max-tokens", "32", "--no-live"]
    done = launch(sys.executable, "-m", "mlx_diffgemma.generate", *args, stdin="shift 1: stdin", timeout=120)
    # (mlx.launch itself exits 0 whatever its processes do; each says why it stopped.)
    assert "error: '-' (read stdin to its end) does not work under mlx.launch" in done.stderr


def serve(prefix=(), args=()):
    """``PREFIX python -m mlx_diffgemma.server ARGS`` on the shift model, in its
    own process group (as a terminal runs it); the process and its base URL."""
    command = [*prefix, sys.executable, "-m", "mlx_diffgemma.server", "--model", str(SHIFT), "--port", "0"]
    proc = subprocess.Popen(
        command + ["--log-level", "WARNING", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r} {proc.stderr.read()[-3000:]}")
    return proc, f"http://127.0.0.1:{match.group(1)}"


def ctrl_c(proc) -> str:
    """Ctrl-C to the server's process group (every process, as a terminal sends
    it); its stderr once all have exited."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the server's processes did not stop on Ctrl-C") from None


def client_session(url: str) -> dict:
    """What real clients get: concurrent chats (streamed and not, sharing a
    batch), a stream abandoned after its first chunk, a conversation's next
    turn (from the prompt cache), a completion with a suffix and an /infill."""
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    prompts = ["shift 1: hello world", "shift 2: abc xyz", "shift 3: the quick brown fox"]
    answers = {}

    def chat(i):
        kw = dict(model="default_model", max_tokens=64, seed=i, stream=i != 1)
        reply = client.chat.completions.create(messages=[{"role": "user", "content": prompts[i]}], **kw)
        if i == 1:
            answers[i] = reply.choices[0].message.content
        else:
            answers[i] = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    gone = client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "shift 2: gone"}], max_tokens=512, stream=True
    )
    next(iter(gone))
    gone.close()
    turn = [{"role": "user", "content": prompts[1]}, {"role": "assistant", "content": answers[1]}]
    turn.append({"role": "user", "content": "shift 1: again"})
    second = client.chat.completions.create(model="default_model", messages=turn, max_tokens=32, seed=5)
    answers["turn"] = second.choices[0].message.content
    answers["cached"] = second.usage.prompt_tokens_details.cached_tokens
    text = client.completions.create(model="default_model", prompt="shift 1: ab", suffix=" cd", max_tokens=32, seed=3)
    answers["suffix"] = text.choices[0].text
    body = json.dumps({"input_prefix": "shift 1: ab", "input_suffix": " ef", "n_predict": 16, "seed": 2}).encode()
    request = urllib.request.Request(url + "/infill", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        answers["infill"] = json.loads(reply.read())["content"]
    return answers


@pytest.fixture(scope="module")
def one_server_session():
    proc, url = serve()
    try:
        answers = client_session(url)
    finally:
        ctrl_c(proc)
    assert all(answers[i] for i in range(3)) and answers["infill"]
    assert answers["cached"] > 0  # the second turn continued the first's cache
    return answers


@pytest.mark.parametrize("split", SPLITS)
def test_server_under_launch(split, one_server_session):
    """Process 0 serves and the other mirrors its every step: real clients get
    what one process's server gives them, and Ctrl-C stops every process."""
    launcher = [*LAUNCHER, "--backend", "ring", "-n", "2", "--starting-port", str(free_port())]
    proc, url = serve(launcher, ["--pipeline"] if split == "pipeline" else [])
    try:
        got = client_session(url)
    finally:
        stderr = ctrl_c(proc)
    # mlx.launch warns of each process that exits with an error: only
    # process 0, with Ctrl-C's 130; the other stopped when process 0 told it to.
    assert "Node with rank 1" not in stderr, stderr[-3000:]
    assert got == one_server_session


def test_random_seed_is_shared(tmp_path):
    """Without a seed each process would draw its own noise; process 0's is used by all."""
    from mlx_diffgemma.tokenizer import load_tokenizer

    prompt = load_tokenizer(SHIFT).encode("shift 4: seedless")
    job = dict(generate=[dict(prompt=prompt, seed=None, max_tokens=32)])
    ranks = run_job(SHIFT, "tensor", job, tmp_path)
    assert ranks[0]["generate"] == ranks[1]["generate"]


@pytest.mark.parametrize("split", SPLITS)
def test_benchmark_command(split, tmp_path):
    extra = ["--pipeline"] if split == "pipeline" else []
    args = ["--preset", "tiny", "--prompt-tokens", "16", "--max-tokens", "32", "--fixed-steps", "2"]
    done = launch(sys.executable, "-m", "mlx_diffgemma.benchmark", *args, "--format", "json", *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)  # one report: process 0's
    assert result["model"]["processes"] == 2 and result["model"]["split"] == split
    single = json.loads(_cli("mlx_diffgemma.benchmark", *args, "--format", "json"))
    assert result["model"]["weights_gb"] < single["model"]["weights_gb"]


def test_compare_refused_under_launch():
    done = launch(sys.executable, "-m", "mlx_diffgemma.benchmark", "--compare", "ar", "--fixed-steps", "2")
    assert "not under mlx.launch" in done.stderr


# -- In this process: the pieces --------------------------------------------------------


def test_even_split():
    assert distributed.even_split(10, 3) == [0, 4, 7, 10]
    assert distributed.even_split(704, 2, 64) == [0, 384, 704]  # the released experts' width at group 64
    with pytest.raises(ValueError, match="multiple of 64"):
        distributed.even_split(100, 2, 64)
    with pytest.raises(ValueError, match="cannot be split 3 ways"):
        distributed.even_split(128, 3, 64)


class FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_stages():
    assert [distributed.stage_layers(30, FakeGroup(r, 4)) for r in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert distributed.stage_layers(30, FakeGroup(1, 2), split=[10, 20]) == (10, 30)
    with pytest.raises(ValueError, match="2 positive counts summing to 30"):
        distributed.stage_layers(30, FakeGroup(0, 2), split=[10, 10])
    stage = distributed.Stage(None, 1, 2, 15, 30)
    assert distributed.stage_name("layers.17.mlp.up_proj.weight", stage) == "layers.2.mlp.up_proj.weight"
    assert distributed.stage_name("layers.3.mlp.up_proj.weight", stage) is None
    assert distributed.stage_name("embed_tokens.weight", stage) == "embed_tokens.weight"
    # Only the first stage keeps the vision tower (its layers are not the stack's).
    tower = "vision_tower.encoder.layers.3.mlp.weight"
    assert distributed.stage_name(tower, stage) is None
    assert distributed.stage_name(tower, distributed.Stage(None, 0, 2, 0, 15)) == tower


def _layer(kind):
    """The same layer each call (seeded), and its input."""
    mx.random.seed(0)
    if kind in ("linear", "quantized"):
        layer = nn.Linear(128, 96, bias=False)
        if kind == "quantized":
            layer = nn.QuantizedLinear.from_linear(layer, group_size=32, bits=4)
        return layer, mx.random.normal((3, 128)), ()
    layer = SwitchLinear(128, 96, 4, bias=False)
    if kind == "quantized_switch":
        layer = layer.to_quantized(group_size=32, bits=4)
        assert isinstance(layer, QuantizedSwitchLinear)
    return layer, mx.random.normal((3, 1, 1, 128)), (mx.array([[0, 2], [1, 3], [3, 3]]),)


@pytest.mark.parametrize("kind", ["linear", "quantized", "switch", "quantized_switch"])
def test_sliced_layers_sum_to_the_whole(kind):
    layer, x, extra = _layer(kind)
    full = layer(x, *extra)
    # Inputs split at whole groups of 32 (unevenly): the partial products add up to the whole.
    total = 0
    for lo, hi in [(0, 96), (96, 128)]:
        part, _, _ = _layer(kind)
        distributed.slice_inputs(part, lo, hi)
        total = total + part(x[..., lo:hi], *extra)
    np.testing.assert_allclose(np.array(total), np.array(full), atol=1e-4, rtol=1e-4)
    # Outputs split: the piece is the whole's columns.
    part, _, _ = _layer(kind)
    distributed.slice_outputs(part, 32, 64)
    np.testing.assert_allclose(np.array(part(x, *extra)), np.array(full[..., 32:64]), atol=1e-5)


def test_slice_inside_a_group_is_refused():
    layer, _, _ = _layer("quantized")
    with pytest.raises(ValueError, match="cut a quantization group of 32"):
        distributed.slice_inputs(layer, 0, 48)


def test_attention_heads_that_cannot_be_split(random_checkpoint):
    model, _ = load(str(random_checkpoint))
    with pytest.raises(ValueError, match="4 attention heads cannot be split over 3 processes"):
        distributed._shard_attention(model.layers[0].self_attn, FakeGroup(0, 3))
