"""The generation core: fixed canvas positions, the step generator's events,
and the layering (one caller of model.denoise, the library never importing the
command line, the benchmark timing the code generation runs)."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from reference import CANVAS, VOCAB, build_reference
from tokenizer_fixture import write_test_tokenizer

import mlx_diffgemma
from mlx_diffgemma import benchmark, sampler
from mlx_diffgemma.benchmark import breakdown
from mlx_diffgemma.denoising import denoise_step, sample_step
from mlx_diffgemma.generate import CanvasCommit, DenoisingStep, generate_step
from mlx_diffgemma.model import Model
from mlx_diffgemma.prompts import encode_prompt
from mlx_diffgemma.sampler_params import SAMPLER_SETTINGS, SamplerParams
from mlx_diffgemma.utils import load

PACKAGE = Path(mlx_diffgemma.__file__).parent
# As in test_generate: at t ~ 1e-6 sampling is argmax and every position is accepted.
DETERMINISTIC = dict(t_min=1e-6, t_max=2e-6, entropy_bound=0.1, confidence_threshold=0.005)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("core")
    build_reference(path, seed=4)
    write_test_tokenizer(path)
    model, tokenizer = load(str(path))
    return path, model, tokenizer


# -- Fixed positions in the sampler -------------------------------------------


def _logits(seed, shape=(2, CANVAS, 64), scale=3.0):
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


def test_no_fixed_position_is_exactly_no_mask():
    logits, key = _logits(0), mx.random.key(7)
    plain = sampler.denoise_step_update(logits, 0.5, key)
    none = sampler.FixedPositions(mx.zeros((2, CANVAS), dtype=mx.bool_), mx.zeros((2, CANVAS), dtype=mx.int32))
    masked = sampler.denoise_step_update(logits, 0.5, key, none)
    for a, b in zip(plain[:-1], masked[:-1]):
        assert mx.array_equal(a, b).item()
    # The one difference: with a mask the step reports the fixed tokens' log-probabilities (none here).
    assert plain.fixed_logprob is None and not mx.any(masked.fixed_logprob).item()


def test_fixed_positions_are_certain_and_kept():
    logits, key = _logits(1), mx.random.key(3)
    rng = np.random.default_rng(1)
    mask = rng.random((2, CANVAS)) < 0.4
    tokens = rng.integers(0, 64, (2, CANVAS))
    fixed = sampler.FixedPositions(mx.array(mask), mx.array(tokens, dtype=mx.int32))
    bound = 0.5
    step = sampler.denoise_step_update(logits, bound, key, fixed)
    free = sampler.denoise_step_update(logits, bound, key)

    next_canvas, argmax = np.array(step.next_canvas), np.array(step.argmax_canvas)
    accepted, entropy = np.array(step.accepted), np.array(step.entropy)
    assert (next_canvas[mask] == tokens[mask]).all()
    assert (argmax[mask] == tokens[mask]).all()
    assert accepted[mask].all() and (entropy[mask] == 0).all()
    # Elsewhere the argmax and entropies are the model's own.
    assert (argmax[~mask] == np.array(free.argmax_canvas)[~mask]).all()
    assert (entropy[~mask] == np.array(free.entropy)[~mask]).all()
    # The free positions accepted are the reference's rule applied with the
    # fixed ones at entropy 0: lowest entropies first while the entropy summed
    # before each stays within the bound.
    for r in range(2):
        h = np.where(mask[r], 0.0, np.array(free.entropy)[r])
        order = np.argsort(h, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(h[order])[:-1]])
        expected = np.zeros(CANVAS, dtype=bool)
        expected[order[before <= bound]] = True
        assert (accepted[r] == expected).all()
    # Accepted free positions hold the sample, the others fresh noise.
    sample_key, noise_key = mx.random.split(key)
    sampled = np.array(sampler.sample_from(sampler.distribution(logits), sample_key))
    noise = np.array(sampler.initial_canvas(noise_key, 2, CANVAS, 64))
    assert (next_canvas[accepted & ~mask] == sampled[accepted & ~mask]).all()
    assert (next_canvas[~accepted] == noise[~accepted]).all()


# -- Fixed positions through the canvas loop ----------------------------------


def _encoded(model, prompt):
    cache = model.make_cache()
    encode_prompt(model, [prompt], cache)
    return cache


def _direct_fixed_canvas(model, cache, canvas, mask, tokens, params):
    """The deterministic limit of the sampler with fixed positions, written out:
    every step accepts its argmax, fixed positions are put back, and the canvas
    stops once its argmax repeats (stability 1) with a confident mean entropy."""
    previous, probs, steps = None, None, 0
    for step in range(1, params.max_denoising_steps + 1):
        steps += 1
        kwargs = {} if probs is None else {"self_conditioning_probs": probs}
        processed = model.denoise(canvas, cache, **kwargs) / params.temperature(step)
        argmax = mx.where(mask, tokens, mx.argmax(processed, axis=-1).astype(mx.int32))
        probs = mx.softmax(processed, axis=-1)
        entropy = mx.where(mask, 0.0, sampler.token_entropy(processed))
        canvas = argmax
        stop = previous is not None and mx.array_equal(argmax, previous).item()
        if stop and entropy.mean().item() < params.confidence_threshold:
            break
        previous = argmax
    return argmax, steps


def test_fixed_tokens_survive_every_step_while_the_rest_converges(checkpoint):
    _, model, _ = checkpoint
    rng = np.random.default_rng(1)  # a canvas that converges in 15 of 24 steps
    prompt = rng.integers(3, VOCAB, 12).tolist()
    init = mx.array(rng.integers(0, VOCAB, (1, CANVAS)), dtype=mx.int32)
    mask = np.zeros((1, CANVAS), dtype=bool)
    mask[0, 4:9] = mask[0, 13] = True
    tokens = mx.array(rng.integers(3, VOCAB, (1, CANVAS)), dtype=mx.int32)
    fixed = sampler.FixedPositions(mx.array(mask), tokens)
    params = SamplerParams.resolve(
        model, **DETERMINISTIC, max_denoising_steps=24, stability_threshold=1, eos_token_id=[VOCAB]
    )

    events = list(generate_step(model, _encoded(model, prompt), [0], CANVAS, params, init, fixed))
    steps = [e for e in events if isinstance(e, DenoisingStep)]
    (commit,) = [e for e in events if isinstance(e, CanvasCommit)]
    fixed_ids = np.array(tokens)[mask]
    for e in steps:
        assert (np.array(e.argmax)[mask] == fixed_ids).all()
        assert np.array(e.accepted)[mask].all() and (np.array(e.entropy)[mask] == 0).all()
    assert (np.array(commit.tokens[0])[mask[0]] == fixed_ids).all()
    # The rest converged: the canvas stopped early, at the same step and with
    # the same tokens as the rule written out directly.
    expected, expected_steps = _direct_fixed_canvas(
        model, _encoded(model, prompt), mx.where(mx.array(mask), tokens, init), mx.array(mask), tokens, params
    )
    assert len(steps) == expected_steps < params.max_denoising_steps
    assert commit.tokens[0] == np.array(expected)[0].tolist()
    assert steps[-1].stopped == [True]


def test_a_mask_without_positions_changes_nothing(checkpoint):
    _, model, _ = checkpoint
    prompt = [5, 9, 11, 40, 7]
    params = SamplerParams.resolve(model, max_denoising_steps=6)
    empty = sampler.FixedPositions(mx.zeros((2, CANVAS), dtype=mx.bool_), mx.zeros((2, CANVAS), dtype=mx.int32))

    def run(fixed):
        cache = model.make_cache()
        encode_prompt(model, [prompt, prompt[::-1]], cache)
        out = []
        for e in generate_step(model, cache, [1, 2], 2 * CANVAS, params, None, fixed):
            out.append(e.tokens if isinstance(e, CanvasCommit) else np.array(e.argmax).tolist())
        return out

    assert run(None) == run(empty)


def test_step_events(checkpoint):
    _, model, _ = checkpoint
    params = SamplerParams.resolve(model, max_denoising_steps=5, eos_token_id=[VOCAB])
    events = list(generate_step(model, _encoded(model, [4, 5, 6]), [3], CANVAS + 3, params))
    commits = [e for e in events if isinstance(e, CanvasCommit)]
    assert [c.canvas_index for c in commits] == [0, 1]
    assert [len(c.tokens[0]) for c in commits] == [CANVAS, 3]
    assert [c.finish_reasons[0] for c in commits] == [None, "length"]
    for e in events:
        if isinstance(e, DenoisingStep):
            assert e.argmax.shape == e.entropy.shape == e.accepted.shape == (1, CANVAS)
            assert len(e.mean_entropy) == 1 and e.denoised == [True]
            assert e.mean_entropy[0] == pytest.approx(e.entropy.mean().item(), rel=1e-6)


def _plain_loop(model, cache, seeds, canvases, params):
    """generate_step without queueing ahead: each step built after the last read."""
    from mlx_diffgemma.denoising import CanvasState
    from mlx_diffgemma.generate import RowKeys, noise_canvas

    rng, out = RowKeys(seeds), []
    for _ in range(canvases):
        canvas = noise_canvas(rng.next(), CANVAS, VOCAB)
        state, stopped = CanvasState.start(canvas, params), [False] * len(seeds)
        for step in range(1, params.max_denoising_steps + 1):
            state, _ = denoise_step(model, cache, state, params, step, rng.next(), None, any(stopped))
            stopped = state.stopped.tolist()
            out.append(np.array(state.argmax).tolist())
            if all(stopped):
                break
        model.encode(state.argmax, cache)
    return out


@pytest.mark.parametrize(
    "stability, confidence",
    [
        (1, 0.005),
        # No stability needed: a canvas may stop at its first step, before any
        # read said it was confident, so the step queued ahead is dropped.
        (0, 0.005),
        (0, 1e-9),
    ],
)
def test_queueing_ahead_changes_no_result(checkpoint, stability, confidence):
    """Rows stop at different steps (so some must be held) and canvases end
    early: the results are the plain loop's, step for step."""
    _, model, _ = checkpoint
    prompts = [[5, 9, 11, 40, 7], [6, 8, 10, 41, 7], [99, 3, 12, 50, 7]]
    params = SamplerParams.resolve(
        model,
        t_min=5e-6,
        t_max=1e-5,
        max_denoising_steps=20,
        eos_token_id=[VOCAB],
        stability_threshold=stability,
        confidence_threshold=confidence,
    )
    seeds = [3, 4, 3]

    def encoded():
        cache = model.make_cache()
        encode_prompt(model, prompts, cache)
        return cache

    events = list(generate_step(model, encoded(), seeds, 3 * CANVAS, params))
    steps = [e for e in events if isinstance(e, DenoisingStep)]
    # Canvases stopped before the limit; with stability 1 rows stopped apart.
    assert len(steps) < 3 * params.max_denoising_steps
    if stability:
        assert any(len(set(e.stopped)) > 1 for e in steps)
    assert [np.array(e.argmax).tolist() for e in steps] == _plain_loop(model, encoded(), seeds, 3, params)


# -- Layers -------------------------------------------------------------------


def _package_modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_model_denoise_is_called_from_one_place():
    sites = []
    for path in _package_modules():
        if path.name == "model.py":
            continue
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "denoise"
                    ):
                        sites.append((path.relative_to(PACKAGE).as_posix(), func.name))
    # Generation reaches the decoder through one step; training has its own
    # objective (a stop-gradient first pass for self-conditioning), in one function.
    assert sorted(set(sites)) == [("denoising.py", "denoise_step"), ("tuner/objective.py", "decoder_logits")]
    assert sites.count(("denoising.py", "denoise_step")) == 1


def _is_main_guard(node) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def test_sibling_imports_sit_at_module_top():
    late = []
    for path in _package_modules():
        tree = ast.parse(path.read_text())
        for top in tree.body:
            if _is_main_guard(top) or isinstance(top, (ast.Import, ast.ImportFrom)):
                continue
            for node in ast.walk(top):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("mlx_diffgemma")):
                    late.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert late == []


def test_the_library_never_imports_the_command_line(checkpoint):
    path, _, _ = checkpoint
    code = f"""
import sys
import mlx_diffgemma
model, tokenizer = mlx_diffgemma.load({str(path)!r})
text = mlx_diffgemma.generate(model, tokenizer, "hello", max_tokens=4, max_denoising_steps=2, verbose=True)
reply = mlx_diffgemma.chat(model, tokenizer, [{{"role": "user", "content": "hi"}}], max_tokens=4, max_denoising_steps=2)
loaded = sorted(m for m in sys.modules if m.startswith("mlx_diffgemma"))
assert "mlx_diffgemma.generate" in loaded and "mlx_diffgemma.chat" in loaded, loaded
bad = [m for m in loaded if m.startswith(("mlx_diffgemma.cli", "mlx_diffgemma.live"))]
assert not bad, bad
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok") and "Generation:" in r.stdout


def test_sampler_flags_come_from_the_settings():
    from mlx_diffgemma.cli.chat import setup_arg_parser as chat_parser
    from mlx_diffgemma.cli.generate import setup_arg_parser as generate_parser

    for parser in (generate_parser(), chat_parser()):
        (group,) = [g for g in parser._action_groups if g.title == "denoising"]
        flags = [a.dest for a in group._group_actions]
        assert flags == list(SAMPLER_SETTINGS) + ["fast"]
        text = " ".join(parser.format_help().split())
        for name in SAMPLER_SETTINGS:
            default = getattr(SamplerParams(), name)
            assert f"(default: {default:g})" in text, name


# -- The benchmark runs generation's own step ---------------------------------


def test_the_benchmark_times_the_step_generation_runs(monkeypatch):
    """Every decoder call the benchmark makes, in its generation timing and in
    its breakdown, comes from denoising.denoise_step, and every sampler update
    from denoising.sample_step."""
    callers = {"denoise": [], "update": []}
    denoise, update = Model.denoise, sampler.denoise_step_update

    def stack():
        frame, codes = sys._getframe(2), set()
        while frame is not None:
            codes.add(frame.f_code)
            frame = frame.f_back
        return codes

    def counting_denoise(self, *args, **kwargs):
        callers["denoise"].append(sys._getframe(1).f_code)
        return denoise(self, *args, **kwargs)

    def counting_update(*args, **kwargs):
        callers["update"].append(sample_step.__code__ in stack())
        return update(*args, **kwargs)

    monkeypatch.setattr(Model, "denoise", counting_denoise)
    monkeypatch.setattr(sampler, "denoise_step_update", counting_update)

    model = benchmark.random_model(benchmark.PRESETS["tiny"], seed=0)
    prompts = benchmark.random_prompts(2, 16, model.args.vocab_size, 0)
    overrides = benchmark.sampler_overrides(3, model.args.vocab_size)
    params = SamplerParams.resolve(model, **overrides)
    benchmark.run_generation(model, prompts, model.canvas_length, 0, params)
    generation_calls = len(callers["denoise"])
    result = breakdown.run_breakdown(model, prompts, params, repeats=2, seed=0)

    assert generation_calls >= 3 + 2  # the timed canvas and the warm-up
    # The breakdown: one step to prepare, one recorded, then the whole step
    # timed 1 + 2 times; the sampler part another 3 updates of 2 rows.
    assert len(callers["denoise"]) - generation_calls == 1 + 1 + 3
    assert set(callers["denoise"]) == {denoise_step.__code__}
    assert callers["update"] and all(callers["update"])
    assert result["components"]["sampler"]["time_s"] > 0


def test_console_scripts_point_at_the_commands():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {f"mlx_diffgemma.{name}" for name in ("generate", "chat", "convert", "benchmark")}
    # The dispatcher (`mlx_diffgemma <command>`), then one script per command.
    assert scripts.pop("mlx_diffgemma") == "mlx_diffgemma.cli.main:main"
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == f"mlx_diffgemma.cli.{name.split('.')[-1]}"
        assert callable(getattr(importlib.import_module(module), function)), target


# -- Sampler settings resolved once -------------------------------------------------


def test_settings_are_resolved_once_and_passed_down(checkpoint, monkeypatch):
    """params= gives what the same keywords give; given params, no entry point
    (infilling's no-suffix path through stream_generate included) resolves again;
    params and keywords together, or a bad directly built SamplerParams, are refused."""
    from mlx_diffgemma.infill import stream_infill

    _, model, tokenizer = checkpoint
    settings = dict(max_denoising_steps=3, t_min=0.3, t_max=0.9)
    by_keywords = mlx_diffgemma.generate(model, tokenizer, "hello", max_tokens=8, seed=5, **settings)
    params = SamplerParams.resolve(model, **settings)

    resolved = []
    original = SamplerParams.resolve.__func__
    monkeypatch.setattr(
        SamplerParams, "resolve", classmethod(lambda cls, *a, **k: resolved.append(k) or original(cls, *a, **k))
    )
    assert mlx_diffgemma.generate(model, tokenizer, "hello", max_tokens=8, seed=5, params=params) == by_keywords
    for _ in stream_infill(model, tokenizer, "hello", "", 4, seed=5, params=params):
        pass
    assert resolved == []
    for _ in stream_infill(model, tokenizer, "hello", "", 4, seed=5, **settings):
        pass
    assert resolved == [settings]  # once, at the entry, not again in stream_generate

    with pytest.raises(TypeError, match="not both"):
        mlx_diffgemma.generate(model, tokenizer, "hello", params=params, max_denoising_steps=2)
    with pytest.raises(ValueError, match="max_denoising_steps must be >= 1"):
        mlx_diffgemma.generate(model, tokenizer, "hello", params=SamplerParams(max_denoising_steps=0))
    # Built directly, the end-of-sequence and pad ids are the model's.
    direct = SamplerParams(**settings).for_model(model)
    assert direct.eos_token_id == params.eos_token_id and direct.pad_token_id == params.pad_token_id
