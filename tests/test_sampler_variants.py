"""The sampler's opt-in departures from the reference (docs/benchmarks.md):
confidence-threshold acceptance and per-position early commitment, and the
benchmark's accuracy metrics and trade-off plot that measure them."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import sampler
from mlx_diffgemma.benchmark import PRESETS, random_model
from mlx_diffgemma.benchmark.work import answer_check
from mlx_diffgemma.denoising import CanvasState, sample_step
from mlx_diffgemma.sampler_params import SamplerParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return random_model(PRESETS["tiny"], seed=5)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_threshold_acceptance_adds_exactly_the_confident_positions(threshold):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 48, 300)).astype(np.float32) * rng.uniform(0.5, 12, size=(2, 48, 1))
    key, temperature = mx.random.key(4), 0.7
    reference = sampler.denoise_step_update(mx.array(logits), 0.1, key, temperature=temperature)
    ours = sampler.denoise_step_update(mx.array(logits), 0.1, key, temperature=temperature, accept_threshold=threshold)
    confident = _softmax(logits / temperature).max(-1) >= threshold
    expected = np.array(reference.accepted) | confident
    assert (np.array(ours.accepted) == expected).all()
    assert (expected & ~np.array(reference.accepted)).any()  # the threshold added positions here
    # The same samples survive where either accepts; the rest is noise of the same key.
    both = np.array(reference.accepted)
    assert (np.array(ours.next_canvas)[both] == np.array(reference.next_canvas)[both]).all()
    assert mx.array_equal(ours.argmax_canvas, reference.argmax_canvas).item()


def test_commit_stable_counts_unchanged_steps_and_needs_acceptance_and_confidence():
    argmax = mx.array([[5, 5, 7, 9, 4]], dtype=mx.int32)
    previous = mx.array([[5, 5, 6, 9, 4]], dtype=mx.int32)
    streak = mx.array([[0, -1, 3, 1, 2]], dtype=mx.int32)
    accepted = mx.array([[True, True, True, False, True]])
    entropy = mx.array([[0.001, 0.0, 0.0, 0.0, 0.2]])
    committed = mx.zeros((1, 5), dtype=mx.bool_)
    streak, committed = sampler.commit_stable(argmax, previous, streak, accepted, entropy, committed, 1, 0.005)
    assert streak.tolist() == [[1, 0, 0, 2, 3]]
    # Position 3 is stable but not accepted; 1 is on its first step; 4 is stable but unsure.
    assert committed.tolist() == [[True, False, False, False, False]]


def _peaked(vocab, canvas, tokens, height=30.0):
    logits = np.zeros((1, canvas, vocab), dtype=np.float32)
    logits[0, np.arange(canvas), tokens] = height
    return mx.array(logits)


@pytest.mark.parametrize("commit_after", [0, 1])
def test_a_committed_position_keeps_its_token_whatever_the_model_says_next(tiny, commit_after):
    """Two confident steps agree on every position; then the model changes its
    mind about all of them. The reference follows it; with commitment every
    position keeps its committed token, counts as certain, and the canvas stops."""
    V, C = tiny.args.vocab_size, tiny.canvas_length
    params = SamplerParams.resolve(tiny, commit_after=commit_after)
    first, second = np.arange(C) % V, (np.arange(C) + 1) % V
    state = CanvasState.start(mx.zeros((1, C), dtype=mx.int32), params)
    keys = [mx.random.key(0)]
    for step, tokens in enumerate([first, first, second], 1):
        state, update = sample_step(tiny, _peaked(V, C, tokens), state, params, step, keys)
    argmax = np.array(state.argmax)[0]
    if commit_after:
        assert (argmax == first).all() and (np.array(state.canvas)[0] == first).all()
        assert not np.array(update.entropy).any() and state.committed.all().item()
    else:
        assert (argmax == second).all() and state.committed is None


def test_commitment_waits_for_the_streak(tiny):
    V, C = tiny.args.vocab_size, tiny.canvas_length
    params = SamplerParams.resolve(tiny, commit_after=2)
    first = np.arange(C) % V
    state = CanvasState.start(mx.zeros((1, C), dtype=mx.int32), params)
    for step in (1, 2):
        state, _ = sample_step(tiny, _peaked(V, C, first), state, params, step, [mx.random.key(step)])
    assert not state.committed.any().item()  # one unchanged step of the two needed
    state, _ = sample_step(tiny, _peaked(V, C, first), state, params, 3, [mx.random.key(3)])
    assert state.committed.all().item()


def test_the_reference_is_untouched_by_the_new_settings_at_their_defaults(tiny):
    from mlx_diffgemma.generate import generate

    prompt = list(range(3, 40))
    plain = generate(tiny, None, prompt, max_tokens=tiny.canvas_length, seed=2)
    explicit = generate(tiny, None, prompt, max_tokens=tiny.canvas_length, seed=2, accept_threshold=0, commit_after=0)
    assert plain == explicit


def test_infill_with_commitment_ranks_lengths_by_the_given_text_only():
    """With commitment, committed positions count as fixed inside a step, but
    the gap's log-probability is still read at the given text alone."""
    from mlx_diffgemma import load
    from mlx_diffgemma.infill import last, stream_infill

    model, tokenizer = load(str(ROOT / "examples" / "shift" / "model"))
    prefix = tokenizer.encode("abc", add_special_tokens=False)
    suffix = tokenizer.encode("xyz", add_special_tokens=False)
    for settings in ({}, {"commit_after": 1}):
        result = last(stream_infill(model, tokenizer, prefix, suffix, 4, seed=0, **settings))
        assert len(tokenizer.encode(result.text, add_special_tokens=False)) == 4


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("accept_threshold", 1.5, "accept_threshold must be <= 1 (got 1.5)"),
        ("accept_threshold", -0.1, "accept_threshold must be >= 0 (got -0.1)"),
        ("commit_after", -1, "commit_after must be >= 0 (got -1)"),
    ],
)
def test_out_of_range_settings_are_named(tiny, name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplerParams.resolve(tiny, **{name: value})


def test_the_command_line_refuses_a_threshold_above_one():
    r = subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma.generate", "--model", "x", "--accept-threshold", "1.5"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--accept-threshold: must be <= 1 (got 1.5)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


SHIFT_CHECK = """
import sys
sys.path.insert(0, {shift!r})
from build import FILLER, shift

def check(question, written, answer):
    return written == shift(question.rstrip(FILLER))  # the task's rule; the answer key is not read
"""


def test_a_task_s_own_check_scores_the_answers(tmp_path):
    checker = tmp_path / "task.py"
    checker.write_text("def check(question, written, answer):\n    return sorted(written) == sorted(answer)\n")
    right = answer_check(f"{checker}:check")
    assert right("q", "ba", "ab") and not right("q", "aa", "ab")
    assert answer_check("exact")("q", "ab", "ab") and not answer_check("exact")("q", "ba", "ab")
    for metric, message in [
        ("fuzzy", "not 'exact' nor FILE.py:FUNCTION"),
        (f"{tmp_path}/none.py:check", "no such file"),
        (f"{checker}:score", "has no function 'score'"),
    ]:
        with pytest.raises(ValueError, match=message):
            answer_check(metric)


def test_the_benchmark_plots_the_variants_and_scores_by_the_task_s_check(tmp_path):
    """--metric FILE.py:FUNCTION scores by the task's rule, not the answer key
    (both keys here are wrong); --plot writes a PNG of the variants' accuracy
    against their work."""
    from mlx_diffgemma.benchmark import Options, run_benchmark

    sys.path.insert(0, str(ROOT / "examples" / "shift"))
    try:
        import build
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(build.SPLITS["test"][1])
    problems = [build.problem(rng) for _ in range(2)]
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "wrong"}]} for q, _ in problems
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checker = tmp_path / "shift_check.py"
    checker.write_text(SHIFT_CHECK.format(shift=str(ROOT / "examples" / "shift")))
    plot = tmp_path / "tradeoff.png"
    options = Options(
        model=str(ROOT / "examples" / "shift" / "model"),
        data=str(tmp_path),
        variants=["threshold-0.9+commit-1+reuse-4"],
        metric=f"{checker}:check",
        plot=str(plot),
        prompt_tokens=16,
        max_tokens=32,
        fixed_steps=1,
        repeats=1,
    )
    result = run_benchmark(options)
    evaluation = result["evaluation"]
    assert list(evaluation["variants"]) == ["reference", "threshold-0.9+commit-1+reuse-4"]
    assert evaluation["variants"]["reference"]["exact"] == 2
    exact = run_benchmark(Options(**{**options.__dict__, "metric": "exact", "plot": None, "variants": ["reference"]}))
    assert exact["evaluation"]["variants"]["reference"]["exact"] == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--plot", "x.png"], "--plot needs --data"),
        (["--model", "examples/shift/model", "--data", "{data}", "--plot", "x.txt"], "name it *.png"),
        (["--model", "examples/shift/model", "--data", "{data}", "--plot", "/nowhere/x.png"], "no such directory"),
        (["--model", "examples/shift/model", "--data", "{data}", "--metric", "fuzzy"], "--metric fuzzy: not"),
    ],
)
def test_bad_plot_and_metric_flags_are_refused_before_any_timing(tmp_path, flags, message):
    row = {"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "bcd"}]}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    flags = [f.format(data=tmp_path) for f in flags]
    r = subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma.benchmark", *flags], capture_output=True, text=True, cwd=str(ROOT)
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Timing" not in r.stderr and "Traceback" not in r.stderr


# -- The approximate step: the decoder over uncommitted positions only ---------


def _prompted(model, prompts):
    from mlx_diffgemma.prompts import encode_prompt

    cache = model.make_cache()
    encode_prompt(model, prompts, cache)
    return cache


@pytest.mark.parametrize("batch", [1, 2])  # two rows: left padding, and each row its own positions
def test_rows_computed_from_the_states_of_the_same_pass_are_that_pass(tiny, batch):
    """Given the states of an exact pass over the same canvas and signal, the
    approximate pass over any rows gives those rows' exact logits: what it
    reuses is then exactly what it would have computed."""
    V, C = tiny.args.vocab_size, tiny.canvas_length
    prompts = [list(range(3, 30)), list(range(7, 20))][:batch]
    cache = _prompted(tiny, prompts)
    canvas = mx.random.randint(0, V, (batch, C), key=mx.random.key(1)).astype(mx.int32)
    probs = mx.softmax(mx.random.normal((batch, C, V), key=mx.random.key(2)) * 3, axis=-1)
    exact = tiny.denoise(canvas, cache, self_conditioning_probs=probs)
    full, states = tiny.denoise_rows(canvas, cache, None, None, self_conditioning_probs=probs)
    assert mx.array_equal(full, exact).item()
    rng = np.random.default_rng(0)
    rows = mx.array(np.stack([np.sort(rng.choice(C, 11, replace=False)) for _ in range(batch)]), dtype=mx.int32)
    part, _ = tiny.denoise_rows(canvas, cache, rows, states, self_conditioning_probs=probs)
    np.testing.assert_allclose(np.array(part), np.array(exact), rtol=1e-4, atol=1e-4)


def test_an_approximate_pass_keeps_the_other_positions_and_recomputes_its_rows(tiny):
    V, C = tiny.args.vocab_size, tiny.canvas_length
    cache = _prompted(tiny, [list(range(3, 30))])
    canvas = mx.random.randint(0, V, (1, C), key=mx.random.key(1)).astype(mx.int32)
    _, states = tiny.denoise_rows(canvas, cache)
    changed = mx.random.randint(0, V, (1, C), key=mx.random.key(9)).astype(mx.int32)
    rows = mx.array([[0, 5, 6]], dtype=mx.int32)
    part, new = tiny.denoise_rows(changed, cache, rows, states)
    others = np.setdiff1d(np.arange(C), [0, 5, 6])
    # The others keep their old logits and layer inputs; the rows see the new canvas.
    assert np.array_equal(np.array(part)[0, others], np.array(states.logits)[0, others])
    assert np.array_equal(np.array(new.inputs[2])[0, others], np.array(states.inputs[2])[0, others])
    alone = np.array(tiny.denoise(changed, cache))[0, [0, 5, 6]]
    assert not np.allclose(np.array(part)[0, [0, 5, 6]], np.array(states.logits)[0, [0, 5, 6]])
    assert np.isfinite(alone).all()


def test_uncommitted_rows_pads_short_rows_with_committed_positions():
    from mlx_diffgemma.denoising import uncommitted_rows

    committed = mx.array([[True, False, True, False], [True, True, False, True]])
    assert uncommitted_rows(committed).tolist() == [[1, 3], [2, 0]]
    assert uncommitted_rows(mx.zeros((1, 4), dtype=mx.bool_)) is None
    assert uncommitted_rows(mx.ones((1, 4), dtype=mx.bool_)).tolist() == [[0]]  # a step always runs


def test_reuse_reports_fewer_positions_and_fewer_flops():
    from mlx_diffgemma import load, stream_generate
    from mlx_diffgemma.benchmark.work import generation_flops
    from mlx_diffgemma.stats import Progress

    model, tokenizer = load(str(ROOT / "examples" / "shift" / "model"))
    C = model.canvas_length
    prompt = tokenizer.encode("abcdefghij0123456789", add_special_tokens=False)
    # Never stable long enough to stop: the canvas runs its 6 steps, some on few positions.
    settings = dict(commit_after=1, max_denoising_steps=6, stability_threshold=10)
    counted = {}
    for reuse in (0, 3):
        progress = Progress()
        for r in stream_generate(model, tokenizer, prompt, C, seed=0, reuse_committed=reuse, **settings):
            progress.update(r)
        positions = progress.canvas_positions()
        counted[reuse] = generation_flops(model.args, 1, len(prompt) + 1, [6], 0, positions)["denoise"]
        if reuse:
            assert positions[0][0] == C and min(positions[0]) < C  # the first pass is whole
            # Never more than 3 approximate passes in a row.
            runs = "".join("a" if n < C else "w" for n in positions[0])
            assert "aaaa" not in runs and "aaa" in runs, positions
        else:
            assert positions == [[C] * 6]
    assert counted[3] < counted[0]
    assert counted[0] == generation_flops(model.args, 1, len(prompt) + 1, [6])["denoise"]


def test_flops_of_an_approximate_step_count_its_rows():
    from mlx_diffgemma.benchmark.breakdown import matmul_flops, matmul_shapes

    args = random_model(PRESETS["tiny"], seed=0).args
    C = args.canvas_length
    whole = matmul_shapes(args, 1, 100)
    assert matmul_shapes(args, 1, 100, rows=C) == whole
    half = matmul_shapes(args, 1, 100, rows=C // 2)
    for part in ("dense_mlp", "experts", "lm_head", "self_conditioning"):
        assert 2 * matmul_flops(half[part]) == matmul_flops(whole[part])
    # q/k/v run over every position: the attention FLOPs fall by less than half.
    assert matmul_flops(whole["attention"]) / 2 < matmul_flops(half["attention"]) < matmul_flops(whole["attention"])


def test_reuse_needs_commitment(tiny):
    with pytest.raises(ValueError, match="reuse_committed needs commit_after"):
        SamplerParams.resolve(tiny, reuse_committed=2)
