"""Fine-tuning: the block-diffusion objective against direct implementations,
training that learns, adapters that load, fuse and quantize, and bad input."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from cli_checks import one_line_error
from convert_reference import build_quantization_reference
from mlx.utils import tree_flatten
from reference import CANVAS, build_reference
from tokenizer_fixture import write_test_tokenizer

from mlx_diffgemma import generate, load
from mlx_diffgemma.convert import convert
from mlx_diffgemma.tuner import adapters
from mlx_diffgemma.tuner.datasets import Example, load_dataset
from mlx_diffgemma.tuner.objective import (
    T_EPSILON,
    BlockContext,
    ObjectiveArgs,
    completion_blocks,
    corrupt,
    decoder_logits,
    encoder_cache,
    loss,
    losses,
    make_batch,
)
from mlx_diffgemma.tuner.trainer import TrainingArgs, checkpoint_feed_forward, evaluate, train

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
AS_USER = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    if os.geteuid() == 0
    else []
)
EOS = [1, 106, 50]
WORDS = "the dog fox river tree forest cold clear lazy quick brown water city coast".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora_model")
    build_reference(path, seed=0)
    write_test_tokenizer(path)
    return path


def task(rng, n):
    """Prompts of a few words; the answer repeats them twice (an easy, learnable rule)."""
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        rows.append({"prompt": words, "completion": f"{words} {words}"})
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("valid", 16), ("test", 16)):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task(rng, n)))
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load(str(model_dir))[1]


def objective(model, **kw):
    return ObjectiveArgs(model.canvas_length, model.args.vocab_size, EOS, 0, **kw)


def run(*args, prefix=(), timeout=300):
    r = subprocess.run(
        [*prefix, sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    return r


# -- The objective ---------------------------------------------------------------


def test_the_last_block_is_text_one_eos_then_padding():
    blocks = completion_blocks([7, 8, 9], 4, EOS, 0)
    assert blocks.tolist() == [[7, 8, 9, 1]]  # no EOS: the first EOS id is added
    blocks = completion_blocks([7, 8, 106, 5, 6, 7, 8], 4, EOS, 0)
    assert blocks.tolist() == [[7, 8, 106, 0]]  # cut after the first EOS, padded
    blocks = completion_blocks(list(range(10, 17)), 4, EOS, 0)
    assert blocks.tolist() == [[10, 11, 12, 13], [14, 15, 16, 1]]
    blocks = completion_blocks(list(range(10, 18)), 4, EOS, 0)
    assert blocks.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [1, 0, 0, 0]]


@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95])
def test_the_corruption_rate_matches_t(t):
    vocab, n = 50, 200_000
    block = np.full(n, 7, dtype=np.int32)
    noisy, replaced = corrupt(block, t, vocab, np.random.default_rng(1))
    sigma = (t * (1 - t) / n) ** 0.5
    assert abs(replaced.mean() - t) < 5 * sigma
    # Replacements are uniform over the whole vocabulary (so 1 in V keeps its token).
    counts = np.bincount(noisy[replaced], minlength=vocab)
    expected = replaced.sum() / vocab
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < vocab + 6 * (2 * vocab) ** 0.5
    assert (noisy[~replaced] == 7).all()


def test_noise_levels_are_uniform_between_epsilon_and_one(model_dir, tokenizer):
    model = load(str(model_dir))[0]
    examples = [Example([2, 5, 6], [9, 10, 11], "x")] * 4
    rng = np.random.default_rng(0)
    levels = np.concatenate([make_batch(examples, objective(model), rng).noise_levels for _ in range(500)])
    assert levels.min() >= T_EPSILON and levels.max() < 1
    # The quartiles of U(1e-4, 1), within a few standard errors of 2000 draws.
    assert np.allclose(np.quantile(levels, [0.25, 0.5, 0.75]), [0.25, 0.5, 0.75], atol=0.04)


def random_examples(rng, n, vocab):
    return [
        Example(
            [2] + rng.integers(5, vocab, int(rng.integers(3, 12))).tolist(),
            rng.integers(51, 100, int(rng.integers(4, 3 * CANVAS))).tolist(),  # no EOS id among them
            f"row {i}",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_the_autoregressive_loss_counts_the_text_and_nothing_else(model_dir, mask_prompt):
    """Against a direct implementation: each row alone, its targets picked by hand."""
    model = load(str(model_dir))[0]
    rng = np.random.default_rng(3)
    examples = random_examples(rng, 4, model.args.vocab_size)
    batch = make_batch(examples, objective(model, mask_prompt=mask_prompt), rng)
    _, ar_loss = losses(model, batch)

    total, count = 0.0, 0
    for ex in examples:
        seq = ex.prompt + ex.completion + [1]  # the completions hold no EOS: one is added
        logits = model.logits(model.encode(mx.array([seq]), model.make_cache()))[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        first = len(ex.prompt) if mask_prompt else 1  # the first target index
        for i in range(first, len(seq)):
            total -= logprobs[i - 1, seq[i]].item()
            count += 1
    assert ar_loss.item() == pytest.approx(total / count, rel=1e-4)


def test_the_decoder_sees_the_cache_up_to_its_block(model_dir):
    """Every row's block is denoised as generation would: after encoding the
    prompt and the blocks before it (sliding window 8, so layers truncate)."""
    model = load(str(model_dir))[0]
    rng = np.random.default_rng(4)
    batch = make_batch(random_examples(rng, 4, model.args.vocab_size), objective(model), rng)
    assert len(set(batch.starts.tolist())) > 1
    cache = encoder_cache(model)
    model.encode(batch.tokens, cache)
    context = BlockContext(cache, batch.starts, model.sliding_layers, model.args.sliding_window)
    logits = model.denoise(batch.canvas, context)
    for row, start in enumerate(batch.starts.tolist()):
        generation = model.make_cache()
        model.encode(batch.tokens[row : row + 1, :start], generation)
        expected = model.denoise(batch.canvas[row : row + 1], generation)
        assert mx.abs(logits[row] - expected[0]).max().item() < 1e-4


def test_the_self_conditioning_pass_carries_no_gradient(model_dir):
    """The gradient equals that of a direct version fed the first pass's
    probabilities as a constant; letting the gradient through would differ."""
    model = load(str(model_dir))[0]
    rng = np.random.default_rng(5)
    batch = make_batch(random_examples(rng, 2, model.args.vocab_size), objective(model), rng)
    signal = mx.array([True, True])
    cache = encoder_cache(model)

    def context(m):
        c = encoder_cache(m)
        m.encode(batch.tokens, c)
        return BlockContext(c, batch.starts, m.sliding_layers, m.args.sliding_window)

    def ours(m):
        return nn.losses.cross_entropy(decoder_logits(m, batch.canvas, context(m), signal), batch.targets).mean()

    probs = mx.softmax(model.denoise(batch.canvas, context(model)), axis=-1)
    mx.eval(probs)

    def direct(m):
        return nn.losses.cross_entropy(
            m.denoise(batch.canvas, context(m), self_conditioning_probs=probs), batch.targets
        ).mean()

    def leaky(m):
        p = mx.softmax(m.denoise(batch.canvas, context(m)), axis=-1)
        return nn.losses.cross_entropy(
            m.denoise(batch.canvas, context(m), self_conditioning_probs=p), batch.targets
        ).mean()

    del cache
    grads = [dict(tree_flatten(nn.value_and_grad(model, f)(model)[1])) for f in (ours, direct, leaky)]
    name = "embed_tokens.weight"
    assert mx.abs(grads[0][name] - grads[1][name]).max().item() < 1e-6
    assert mx.abs(grads[0][name] - grads[2][name]).max().item() > 1e-4


def test_rows_without_self_conditioning_get_the_first_step_signal(model_dir):
    model = load(str(model_dir))[0]
    rng = np.random.default_rng(6)
    batch = make_batch(random_examples(rng, 2, model.args.vocab_size), objective(model), rng)
    cache = encoder_cache(model)
    model.encode(batch.tokens, cache)
    context = BlockContext(cache, batch.starts, model.sliding_layers, model.args.sliding_window)
    mixed = decoder_logits(model, batch.canvas, context, mx.array([False, True]))
    plain = model.denoise(batch.canvas, context)
    assert mx.abs(mixed[0] - plain[0]).max().item() < 1e-5
    assert mx.abs(mixed[1] - plain[1]).max().item() > 1e-3


# -- Training ----------------------------------------------------------------------


def short_training(model, data, fine_tune_type="lora", iters=30, lr=1e-3, adapter_file=None):
    objective_args = objective(model)
    adapters.prepare(model, fine_tune_type, -1, {"rank": 8, "scale": 10.0})
    before = evaluate(model, data["valid"], 4, -1, objective_args)
    args = TrainingArgs(batch_size=4, iters=iters, steps_per_report=10, steps_per_eval=1000, adapter_file=adapter_file)
    train(model, optim.Adam(learning_rate=lr), data["train"], None, objective_args, args, report=lambda _: None)
    after = evaluate(model, data["valid"], 4, -1, objective_args)
    return before, after


@pytest.mark.parametrize("fine_tune_type", ["lora", "full"])
def test_a_short_training_run_lowers_the_validation_loss(model_dir, data_dir, fine_tune_type):
    model, tokenizer = load(str(model_dir))
    data = load_dataset(str(data_dir), tokenizer)
    before, after = short_training(model, data, fine_tune_type, iters=30)
    assert after < before - 0.5, (before, after)


def test_grad_checkpoint_gives_the_same_gradients(model_dir):
    model = load(str(model_dir))[0]
    adapters.prepare(model, "lora", -1)
    rng = np.random.default_rng(7)
    batch = make_batch(random_examples(rng, 2, model.args.vocab_size), objective(model), rng)
    plain = dict(tree_flatten(nn.value_and_grad(model, loss)(model, batch)[1]))
    checkpoint_feed_forward(model)
    checkpointed = dict(tree_flatten(nn.value_and_grad(model, loss)(model, batch)[1]))
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert mx.abs(plain[name] - checkpointed[name]).max().item() < 1e-5, name


def test_the_router_stays_frozen_by_default(model_dir):
    model = load(str(model_dir))[0]
    adapters.prepare(model, "full", -1)
    names = adapters.trainable_weights(model)
    assert not [n for n in names if ".router." in n]
    assert "layers.0.mlp.up_proj.weight" in names
    # Training reads text only: the vision tower (the test checkpoint has one) stays frozen.
    assert model.args.vision is not None and not [n for n in names if n.startswith(("vision_", "embed_vision"))]
    adapters.prepare(model, "full", -1, train_router=True)
    assert "layers.0.router.proj.weight" in adapters.trainable_weights(model)


@pytest.fixture(scope="module")
def trained(model_dir, data_dir, tmp_path_factory):
    """A LoRA adapter trained a few steps, the model it was trained in, and where it is saved."""
    path = tmp_path_factory.mktemp("adapter")
    model, tokenizer = load(str(model_dir))
    data = load_dataset(str(data_dir), tokenizer)
    short_training(model, data, "lora", iters=10, lr=3e-3, adapter_file=path / adapters.ADAPTER_FILE)
    config = {
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": adapters.lora_parameters({"rank": 8, "scale": 10.0}),
    }
    adapters.save_adapter_config(config, path / adapters.CONFIG_FILE)
    model.eval()
    return model, tokenizer, path


def logits_of(model, seed=0):
    rng = np.random.default_rng(seed)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, model.args.vocab_size, (1, 20))), cache)
    return model.denoise(mx.array(rng.integers(0, model.args.vocab_size, (1, CANVAS))), cache)


def test_saved_adapters_load_to_identical_logits(model_dir, trained):
    model, _, path = trained
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapters.safetensors"]
    loaded, _ = load(str(model_dir), adapter_path=str(path))
    assert mx.array_equal(logits_of(loaded), logits_of(model))
    base, _ = load(str(model_dir))
    assert mx.abs(logits_of(base) - logits_of(model)).max().item() > 1e-3


def test_the_adapter_path_flag_generates_what_the_library_does(model_dir, trained):
    model, tokenizer, path = trained
    expected = generate(model, tokenizer, "the dog", max_tokens=16, seed=3, max_denoising_steps=4)
    args = ["--model", model_dir, "--prompt", "the dog", "--ignore-chat-template", "--max-tokens", "16", "--seed", "3"]
    args += ["--max-denoising-steps", "4", "--no-live"]
    r = run("-m", "mlx_diffgemma.generate", *args, "--adapter-path", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected
    base = run("-m", "mlx_diffgemma.generate", *args)
    assert base.stdout != r.stdout


def _max_relative_difference(a: mx.array, b: mx.array) -> float:
    """Largest difference relative to the largest logit: folding the adapter
    into the weights rounds differently, more so with a multithreaded BLAS
    (1.3e-5 absolute on logits up to 8 was seen with OpenBLAS)."""
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def test_fused_equals_adapted(model_dir, trained, tmp_path):
    model, _, path = trained
    out = tmp_path / "fused"
    r = run("-m", "mlx_diffgemma.fuse", "--model", model_dir, "--adapter-path", path, "--save-path", out)
    assert r.returncode == 0, r.stderr
    fused, tokenizer = load(str(out))
    assert tokenizer is not None
    assert not any("lora" in name for name, _ in tree_flatten(fused.parameters()))
    assert _max_relative_difference(logits_of(fused), logits_of(model)) < 1e-5
    again = run("-m", "mlx_diffgemma.fuse", "--model", model_dir, "--adapter-path", path, "--save-path", out)
    one_line_error(again, str(out), "already exists")


def test_a_full_fine_tune_fuses_to_its_weights(model_dir, data_dir, tmp_path):
    model, tokenizer = load(str(model_dir))
    data = load_dataset(str(data_dir), tokenizer)
    adapter = tmp_path / "full"
    adapter.mkdir()
    short_training(model, data, "full", iters=2, adapter_file=adapter / adapters.ADAPTER_FILE)
    adapters.save_adapter_config({"fine_tune_type": "full", "num_layers": -1}, adapter / adapters.CONFIG_FILE)
    model.eval()
    r = run(
        "-m", "mlx_diffgemma.fuse", "--model", model_dir, "--adapter-path", adapter, "--save-path", tmp_path / "out"
    )
    assert r.returncode == 0, r.stderr
    assert _max_relative_difference(logits_of(load(str(tmp_path / "out"))[0]), logits_of(model)) < 1e-5


def test_qlora_on_a_4bit_model_lowers_the_loss(data_dir, tmp_path):
    source = tmp_path / "float"
    build_quantization_reference(source)
    write_test_tokenizer(source)
    convert(str(source), str(tmp_path / "q4"), quantize=True, q_bits=4)
    model, tokenizer = load(str(tmp_path / "q4"))
    assert adapters.is_quantized(model)
    data = load_dataset(str(data_dir), tokenizer)
    before, after = short_training(model, data, "lora", iters=30)
    assert after < before - 0.5, (before, after)
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in model.named_modules())


# -- The command line --------------------------------------------------------------


def test_the_command_trains_saves_and_tests(model_dir, data_dir, tmp_path):
    out = tmp_path / "adapters"
    r = run(
        "-m", "mlx_diffgemma.lora", "--model", model_dir, "--train", "--test", "--data", data_dir,
        "--iters", "4", "--steps-per-report", "2", "--steps-per-eval", "2", "--save-every", "2",
        "--learning-rate", "1e-3", "--adapter-path", out, "--val-batches", "2", "--test-batches", "2",
        "--num-layers", "-1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Iter 1: Val loss" in r.stdout and "Iter 2: Train loss" in r.stdout and "Peak mem" in r.stdout
    assert "Tokens/sec" in r.stdout and "It/sec" in r.stdout and "Test loss" in r.stdout
    assert {"adapters.safetensors", "adapter_config.json", "0000002_adapters.safetensors"} <= set(os.listdir(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["keys"]
    load(str(model_dir), adapter_path=str(out))


def test_a_yaml_config_sets_options_and_flags_win(model_dir, data_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data_dir}\ntrain: true\niters: 0\n")
    one_line_error(run("-m", "mlx_diffgemma.lora", "-c", config), "--iters", "got 0")
    config.write_text(
        f"model: {model_dir}\ndata: {data_dir}\ntrain: true\niters: 0\nnum_layers: -1\n"
        "lora_parameters: {rank: 4, scale: 5.0}\n"
    )
    r = run(
        "-m", "mlx_diffgemma.lora", "-c", config, "--iters", "1", "--adapter-path", tmp_path / "a", "--val-batches", "1"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 4


# -- Bad input ---------------------------------------------------------------------


def data_with(tmp_path, train_text, valid=None):
    path = tmp_path / "data"
    path.mkdir(exist_ok=True)
    (path / "train.jsonl").write_text(train_text)
    good = json.dumps({"prompt": "the dog", "completion": "the dog"}) + "\n"
    (path / "valid.jsonl").write_text(valid if valid is not None else good * 4)
    return path


GOOD = json.dumps({"prompt": "the dog", "completion": "the dog"}) + "\n"


@pytest.mark.parametrize(
    "train_text, needles",
    [
        (GOOD + '{"prompt": "the dog", "completion": \n', ["train.jsonl:2", "not valid JSON"]),
        (GOOD + json.dumps({"prompt": "the dog"}) + "\n", ["train.jsonl:2", "'completion'", "missing"]),
        (GOOD + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", ["train.jsonl:2", "assistant"]),
        (GOOD + json.dumps({"prompt": "the dog", "completion": 3}) + "\n", ["train.jsonl:2", "not a string"]),
        (GOOD + json.dumps({"words": "x"}) + "\n", ["train.jsonl:2", "no 'messages'"]),
        ("", ["train.jsonl: no examples", "empty"]),
        (GOOD + json.dumps({"text": "the dog " * 400}) + "\n", ["train.jsonl:2", "--max-seq-length 256"]),
    ],
    ids=["malformed", "missing-field", "no-answer", "wrong-type", "unknown-format", "empty", "too-long"],
)
def test_bad_data_names_file_and_line(model_dir, tmp_path, train_text, needles):
    data = data_with(tmp_path, train_text)
    r = run(
        "-m", "mlx_diffgemma.lora", "--model", model_dir, "--train", "--data", data, "--iters", "1",
        "--max-seq-length", "256", "--adapter-path", tmp_path / "a", "--num-layers", "-1",
    )  # fmt: skip
    one_line_error(r, *needles)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--iters", "0"], ["--iters", "got 0"]),
        (["--batch-size", "-1"], ["--batch-size"]),
        (["--num-layers", "99"], ["--num-layers 99", "5 layers"]),
        (["--learning-rate", "nan"], ["--learning-rate"]),
        (["--batch-size", "100"], ["--batch-size 100", "only"]),
    ],
)
def test_bad_flags_name_the_flag(model_dir, data_dir, tmp_path, args, needles):
    r = run(
        "-m",
        "mlx_diffgemma.lora",
        "--model",
        model_dir,
        "--train",
        "--data",
        data_dir,
        "--adapter-path",
        tmp_path / "a",
        *args,
    )
    one_line_error(r, *needles)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root ignores permissions")
def test_an_unwritable_adapter_path(model_dir, data_dir, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        r = run(
            "-m", "mlx_diffgemma.lora", "--model", model_dir, "--train", "--data", data_dir,
            "--adapter-path", parent / "adapters", prefix=AS_USER,
        )  # fmt: skip
        one_line_error(r, "--adapter-path", str(parent / "adapters"), "cannot write there")
    finally:
        os.chmod(parent, 0o755)


def test_a_missing_data_directory_and_split(model_dir, tmp_path):
    r = run("-m", "mlx_diffgemma.lora", "--model", model_dir, "--train", "--data", tmp_path / "nope")
    one_line_error(r, f"--data {tmp_path / 'nope'}: no such directory", "Hugging Face dataset names are not downloaded")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "valid.jsonl").write_text(GOOD * 4)
    args = ["-m", "mlx_diffgemma.lora", "--model", model_dir, "--train", "--data", tmp_path / "d"]
    one_line_error(run(*args, "--adapter-path", tmp_path / "a"), "train.jsonl", "missing")
    # As mlx_lm.lora: no valid.jsonl trains without validation, saying so.
    (tmp_path / "d" / "valid.jsonl").rename(tmp_path / "d" / "train.jsonl")
    r = run(*args, "--adapter-path", tmp_path / "a", "--iters", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == f"warning: {tmp_path / 'd' / 'valid.jsonl'} not found; training without validation"
    assert "Val loss" not in r.stdout and (tmp_path / "a" / "adapters.safetensors").exists()


def test_an_adapter_that_does_not_fit(model_dir, trained, tmp_path):
    _, _, path = trained
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    weights = dict(mx.load(str(bad / "adapters.safetensors")))
    name = next(iter(weights))
    weights[name] = mx.zeros((3, 3))
    mx.save_safetensors(str(bad / "adapters.safetensors"), weights)
    with pytest.raises(ValueError, match=f"tensor {name} has shape"):
        load(str(model_dir), adapter_path=str(bad))
    r = run("-m", "mlx_diffgemma.generate", "--model", model_dir, "--adapter-path", bad, "--max-tokens", "4")
    one_line_error(r, "adapters.safetensors", name)
    r = run(
        "-m", "mlx_diffgemma.generate", "--model", model_dir, "--adapter-path", tmp_path / "none", "--max-tokens", "4"
    )
    one_line_error(r, "no such adapter directory")
