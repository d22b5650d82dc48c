"""Work per committed token: the opt-in cheaper sampler settings, the fast
setting and the benchmark's FLOP accounting."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import sampler
from mlx_diffgemma.benchmark import PRESETS, random_model
from mlx_diffgemma.benchmark.breakdown import layer_shapes, matmul_flops, matmul_shapes
from mlx_diffgemma.benchmark.work import generation_flops, read_problems
from mlx_diffgemma.generate import stream_generate
from mlx_diffgemma.model import Model
from mlx_diffgemma.sampler_params import FAST, SamplerParams


@pytest.fixture(scope="module")
def tiny():
    return random_model(PRESETS["tiny"], seed=3)


@pytest.mark.parametrize("vocab", [4096, 300])  # the two-pass path, and a vocabulary it does not split
@pytest.mark.parametrize("k", [1, 8])
def test_top_k_is_the_k_largest(vocab, k):
    weights = mx.exp(mx.random.normal((2, 5, vocab), key=mx.random.key(vocab + k)) * 3)
    index, values = sampler.top_k(weights, k)
    w = np.array(weights)
    expected = np.sort(w, axis=-1)[..., ::-1][..., :k]
    assert np.array_equal(np.sort(np.array(values), axis=-1)[..., ::-1], expected)
    assert np.array_equal(np.take_along_axis(w, np.array(index), axis=-1), np.array(values))
    # Distinct entries, all from the vocabulary.
    idx = np.array(index)
    assert all(len(set(row)) == k for row in idx.reshape(-1, k)) and idx.max() < vocab


def test_top_k_finds_entries_in_one_block():
    """All of the k largest in one block of 256: the two-pass selection must
    not take one entry per block."""
    w = np.random.default_rng(0).uniform(0, 0.1, (1, 4096)).astype(np.float32)
    w[0, 512:520] = np.arange(1, 9)
    index, _ = sampler.top_k(mx.array(w), 8)
    assert sorted(np.array(index)[0].tolist()) == list(range(512, 520))


def test_sparse_soft_embedding_of_the_whole_vocabulary_is_the_soft_embedding(tiny):
    V = tiny.args.vocab_size
    probs = mx.softmax(mx.random.normal((1, tiny.canvas_length, V), key=mx.random.key(0)) * 4, axis=-1)
    index, values = sampler.top_k(probs * 7.0, V)  # unnormalised: renormalised inside
    sparse = tiny.sparse_soft_embedding(index, values)
    assert np.allclose(np.array(sparse), np.array(tiny.soft_embedding(probs)), atol=1e-4, rtol=1e-4)
    # With fewer tokens it is the embedding of the renormalised top of the distribution.
    index, values = sampler.top_k(probs, 4)
    rows = np.array(tiny.embed_tokens.weight)[np.array(index)]
    p = np.array(values) / np.array(values).sum(-1, keepdims=True)
    expected = (p[..., None] * rows).sum(-2) * np.sqrt(tiny.args.hidden_size)
    assert np.allclose(np.array(tiny.sparse_soft_embedding(index, values)), expected, atol=1e-4)


def test_fast_applies_its_settings_and_explicit_ones_win(tiny):
    reference, fast = SamplerParams.resolve(tiny), SamplerParams.resolve(tiny, fast=True)
    for name, value in FAST.items():
        assert getattr(fast, name) == value != getattr(reference, name)
    mine = SamplerParams.resolve(tiny, fast=True, stability_threshold=2, confidence_threshold=None)
    assert mine.stability_threshold == 2
    with pytest.raises(ValueError, match="self_conditioning_top_k must be at most the vocabulary size 4096"):
        SamplerParams.resolve(tiny, self_conditioning_top_k=4097)
    with pytest.raises(ValueError, match="self_conditioning_top_k must be >= 0"):
        SamplerParams.resolve(tiny, self_conditioning_top_k=-1)


def test_flops_follow_the_generation_s_own_passes(tiny, monkeypatch):
    """generation_flops counts what the loop runs: every decoder call (with or
    without a signal) and every canvas encode, at the cache length each sees."""
    calls = []
    denoise, encode = Model.denoise, Model.encode

    def recording_denoise(self, canvas, cache, **signal):
        calls.append(("denoise", cache.offset, any(v is not None for v in signal.values())))
        return denoise(self, canvas, cache, **signal)

    def recording_encode(self, ids, cache, left_padding=None):
        calls.append(("encode", cache.offset, ids.shape[1]))
        return encode(self, ids, cache, left_padding)

    monkeypatch.setattr(Model, "denoise", recording_denoise)
    monkeypatch.setattr(Model, "encode", recording_encode)
    args, P, C = tiny.args, 40, tiny.canvas_length
    prompt = list(range(3, 3 + P))
    for top_k in (0, 8):
        calls.clear()
        steps = {}
        for r in stream_generate(
            tiny, None, prompt, 3 * C, seed=0, max_denoising_steps=3, self_conditioning_top_k=top_k
        ):
            steps[r.canvas_index] = r.step
        expected = {"denoise": 0, "encode": 0}
        for kind, offset, detail in calls[1:]:  # the first call encodes the prompt
            if kind == "denoise":
                shapes = matmul_shapes(args, 1, offset, detail, top_k)
            else:
                shapes = layer_shapes(args, 1, detail, offset)
            expected[kind] += sum(matmul_flops(s) for s in shapes.values())
        counted = generation_flops(args, 1, P, [steps[c] for c in sorted(steps)], top_k)
        assert counted == expected
        assert sum(kind == "encode" for kind, *_ in calls) == 1 + 2  # the prompt, then all canvases but the last


def test_sparse_self_conditioning_costs_fewer_flops_than_the_vocabulary():
    args = random_model(PRESETS["tiny"], 0).args
    dense = sum(matmul_flops(s) for s in matmul_shapes(args, 1, 64, True, 0).values())
    sparse = sum(matmul_flops(s) for s in matmul_shapes(args, 1, 64, True, 8).values())
    V, D, N = args.vocab_size, args.hidden_size, args.canvas_length
    assert dense - sparse == 2 * N * D * (V - 8)


def test_read_problems_names_the_bad_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{"text": 1}\n'
    )
    with pytest.raises(ValueError, match="test.jsonl:2: not a chat example"):
        read_problems(path)
    assert read_problems(path, limit=1) == [("q", "a")]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "nowhere"], "--data needs --model"),
        (["--variants", "fast"], "--variants needs --data"),
        (["--variants", "quick"], "invalid choice: 'quick'"),
        (["--self-conditioning-top-k", "-1"], "--self-conditioning-top-k must be at least 0"),
    ],
)
def test_benchmark_rejects_bad_evaluation_flags(flags, message):
    r = subprocess.run([sys.executable, "-m", "mlx_diffgemma.benchmark", *flags], capture_output=True, text=True)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_two_level_sampling_draws_the_token_one_cumulative_sum_does():
    """The block-by-block inverse CDF picks, for the same uniform numbers, the
    token an exact (float64) cumulative sum over the vocabulary picks, except
    where the target lies within float32 rounding of a boundary between two
    tokens (where a single float32 cumulative sum may differ as well)."""
    logits = mx.random.normal((2, 64, 4096), key=mx.random.key(5)) * 3
    dist = sampler.distribution(logits, 0.7)
    cdf = np.cumsum(np.array(dist.weights, dtype=np.float64), axis=-1)
    lower = np.concatenate([np.zeros_like(cdf[..., :1]), cdf[..., :-1]], axis=-1)
    exact = 0
    for seed in range(10):
        key = mx.random.key(seed)
        target = np.array(mx.random.uniform(shape=(2, 64, 1), key=key))[..., 0] * cdf[..., -1]
        got = np.array(sampler.sample_from(dist, key))[..., None]
        low, high = np.take_along_axis(lower, got, -1)[..., 0], np.take_along_axis(cdf, got, -1)[..., 0]
        slack = 1e-6 * cdf[..., -1]
        assert ((low - slack <= target) & (target < high + slack)).all()
        exact += ((low <= target) & (target < high)).sum()
    assert exact >= 2 * 64 * 10 - 2


def test_the_temperature_is_applied_inside_the_distribution():
    logits = mx.random.normal((1, 8, 300), key=mx.random.key(2)) * 5
    folded, divided = sampler.distribution(logits, 0.4), sampler.distribution(logits / 0.4)
    assert np.allclose(np.array(folded.probs), np.array(divided.probs), atol=1e-6)
    expected = -(np.array(divided.probs) * np.log(np.maximum(np.array(divided.probs), 1e-38))).sum(-1)
    assert np.allclose(np.array(folded.entropy), expected, atol=1e-4)


def test_top_k_of_the_whole_vocabulary_generates_what_the_reference_does(tiny):
    """Sparse self-conditioning over all V tokens is the dense signal: the
    decoder gets it through the sparse path (soft_embedding) and writes the
    same canvases; over 8 tokens it writes others."""

    def canvases(**settings):
        responses = stream_generate(tiny, None, list(range(3, 40)), 64, seed=1, max_denoising_steps=4, **settings)
        return [r.token_ids for r in responses if r.token_ids]

    reference = canvases()
    assert canvases(self_conditioning_top_k=tiny.args.vocab_size) == reference
    assert canvases(self_conditioning_top_k=8) != reference


def test_a_canvas_that_may_stop_at_its_first_step_is_not_run_ahead(tiny, monkeypatch):
    """With stability threshold 0 a confident canvas stops after one step; the
    loop must not queue a second step it would throw away (that doubled the
    fast setting's decoder passes)."""
    calls = []
    denoise = Model.denoise

    def counting(self, *args, **kwargs):
        calls.append(1)
        return denoise(self, *args, **kwargs)

    monkeypatch.setattr(Model, "denoise", counting)
    responses = list(
        stream_generate(
            tiny, None, [5, 6, 7], 3 * tiny.canvas_length, seed=0, stability_threshold=0, confidence_threshold=100.0
        )
    )
    assert responses[-1].denoising_steps == 3  # one step per canvas
    assert len(calls) == 3


def test_the_benchmark_reports_accuracy_and_flops_per_token_on_the_trained_model(tmp_path):
    """--model with --data: the variants' accuracy and FLOPs per token, in the
    report and the JSON, measured against the reference."""
    import json

    from mlx_diffgemma.benchmark import Options, format_report, run_benchmark

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples" / "shift"))
    try:
        import build
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(build.SPLITS["test"][1])
    problems = [build.problem(rng) for _ in range(3)]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in problems]
    rows[2]["messages"][1]["content"] = "not the answer"
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = Options(
        model=str(root / "examples" / "shift" / "model"),
        data=str(tmp_path),
        variants=["fast"],
        prompt_tokens=16,
        max_tokens=64,  # two canvases: the first is encoded
        fixed_steps=2,
        repeats=1,
    )
    result = run_benchmark(options)
    variants = result["evaluation"]["variants"]
    assert list(variants) == ["reference", "fast"]
    assert variants["reference"]["exact"] == 2  # the third answer key is wrong
    assert variants["fast"]["flops_per_token"] < variants["reference"]["flops_per_token"]
    assert variants["reference"]["fewer_flops_than_reference"] == 1.0
    assert result["generation"]["flops_per_token"] > result["generation"]["denoise_flops_per_token"] > 0
    report = format_report(result)
    assert "Accuracy and work per committed token (3 problems" in report and "fast" in report


def test_a_bad_evaluation_file_fails_before_any_timing(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"messages": []}\n')
    r = subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma.benchmark", "--model", "examples/shift/model", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert r.returncode == 2 and "test.jsonl:1: not a chat example" in r.stderr, r.stderr
    assert "Timing" not in r.stderr and "Traceback" not in r.stderr
