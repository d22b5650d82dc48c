"""Generation against transformers' DiffusionGemma generate, and its contract."""

import importlib

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import CANVAS, VOCAB, build_reference
from tokenizer_fixture import write_test_tokenizer
from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_gen

from mlx_diffgemma.generate import generate, stream_generate
from mlx_diffgemma.sampler_params import SamplerParams
from mlx_diffgemma.utils import load

# The package exports a generate() function under the module's name.
gen = importlib.import_module("mlx_diffgemma.generate")

PROMPT = 20  # longer than the sliding window (8)

# The deterministic limit: at t ~ 1e-6 every softmax is one-hot, sampling is
# argmax, every entropy is 0 and every position is accepted, so the whole run
# is a function of the weights and the initial canvases.
DETERMINISTIC = dict(t_min=1e-6, t_max=2e-6, entropy_bound=0.1, confidence_threshold=0.005)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    ref = build_reference(path, seed=1)
    write_test_tokenizer(path)
    model, tokenizer = load(str(path))
    return ref, model, tokenizer


def reference_generate(ref, ids, canvases, max_new_tokens, eos=(1,), **params):
    """transformers' generate with the initial canvas of canvas i set to canvases[i]."""
    calls = iter(canvases)
    original = hf_gen.EntropyBoundSampler.initialize_canvas

    def initialize_canvas(self, batch_size, device):
        # Called once per canvas and once per step to renoise; in the deterministic
        # limit nothing is renoised, so the same fixed values serve both.
        return initialize_canvas.current

    initialize_canvas.current = None
    original_prepare = hf_gen.DiffusionGemmaGenerationMixin._prepare_denoiser_inputs

    def prepare(self, *args, **kwargs):
        initialize_canvas.current = torch.tensor(next(calls))
        return original_prepare(self, *args, **kwargs)

    hf_gen.EntropyBoundSampler.initialize_canvas = initialize_canvas
    hf_gen.DiffusionGemmaGenerationMixin._prepare_denoiser_inputs = prepare
    try:
        with torch.no_grad():
            out = ref.generate(
                input_ids=torch.tensor(ids),
                max_new_tokens=max_new_tokens,
                sampler_config=hf_gen.EntropyBoundSamplerConfig(entropy_bound=params.pop("entropy_bound")),
                eos_token_id=list(eos),
                pad_token_id=0,
                **params,
            )
    finally:
        hf_gen.EntropyBoundSampler.initialize_canvas = original
        hf_gen.DiffusionGemmaGenerationMixin._prepare_denoiser_inputs = original_prepare
    return out.sequences[:, ids.shape[1] :].numpy(), out.tokens_per_forward.numpy()


def ours_generate(model, ids, canvases, max_tokens, monkeypatch, eos=(1,), **params):
    calls = iter(canvases)
    monkeypatch.setattr(gen, "noise_canvas", lambda keys, c, v: mx.array(next(calls)))
    rows = {}
    stream = stream_generate(
        model, None, ids[0].tolist(), max_tokens=max_tokens, seed=0, eos_token_id=list(eos), **params
    )
    for r in stream:
        rows.setdefault("ids", []).extend(r.token_ids)
        rows["last"] = r
    return rows["ids"], rows["last"]


@pytest.mark.parametrize("steps, canvases", [(6, 1), (24, 3)])
def test_token_exact_in_the_deterministic_limit(checkpoint, monkeypatch, steps, canvases):
    ref, model, _ = checkpoint
    rng = np.random.default_rng(steps)
    ids = rng.integers(3, VOCAB, (1, PROMPT))
    inits = [rng.integers(0, VOCAB, (1, CANVAS)) for _ in range(canvases)]
    params = dict(DETERMINISTIC, max_denoising_steps=steps, stability_threshold=1)

    expected, expected_tpf = reference_generate(ref, ids, inits, canvases * CANVAS, **dict(params))
    tokens, last = ours_generate(model, ids, inits, canvases * CANVAS, monkeypatch, **params)

    assert tokens == expected[0].tolist()
    assert last.tokens_per_forward == pytest.approx(float(expected_tpf[0]))
    if steps == 24:
        # adaptive stopping must have cut canvases short for this to test anything
        assert last.denoising_steps < canvases * steps


def test_eos_inside_a_canvas_matches_the_reference(checkpoint, monkeypatch):
    ref, model, _ = checkpoint
    rng = np.random.default_rng(2)
    ids = rng.integers(3, VOCAB, (1, PROMPT))
    inits = [rng.integers(0, VOCAB, (1, CANVAS)) for _ in range(2)]
    params = dict(DETERMINISTIC, max_denoising_steps=8, stability_threshold=1)
    free, _ = reference_generate(ref, ids, inits, 2 * CANVAS, **dict(params))
    # Make a token the second canvas writes mid-way an end-of-sequence id.
    eos = int(free[0, CANVAS + 5])
    first = list(free[0]).index(eos)
    expected, expected_tpf = reference_generate(ref, ids, inits, 2 * CANVAS, eos=(eos,), **dict(params))
    tokens, last = ours_generate(model, ids, inits, 2 * CANVAS, monkeypatch, eos=(eos,), **params)
    assert tokens == free[0, :first].tolist()
    assert expected[0, first] == eos and (expected[0, first + 1 :] == 0).all()
    assert last.finish_reason == "stop" and last.stop_token == eos
    assert last.tokens_per_forward == pytest.approx(float(expected_tpf[0]))


def test_same_seed_same_text_and_different_seeds_differ(checkpoint):
    _, model, tokenizer = checkpoint
    kw = dict(max_tokens=2 * CANVAS, max_denoising_steps=4)
    a = generate(model, tokenizer, "hello there", seed=3, **kw)
    b = generate(model, tokenizer, "hello there", seed=3, **kw)
    c = generate(model, tokenizer, "hello there", seed=4, **kw)
    assert a == b
    assert a != c


def test_calls_without_a_seed_draw_fresh_noise(checkpoint):
    _, model, tokenizer = checkpoint
    kw = dict(max_tokens=CANVAS, max_denoising_steps=2)
    outs = {generate(model, tokenizer, "hello", **kw) for _ in range(3)}
    assert len(outs) > 1


@pytest.mark.parametrize("max_tokens", [5, CANVAS + 3])
def test_max_tokens_not_a_multiple_of_the_canvas(checkpoint, max_tokens):
    _, model, _ = checkpoint
    responses = list(
        stream_generate(
            model,
            None,
            [2, 5, 7],
            max_tokens=max_tokens,
            seed=1,
            max_denoising_steps=3,
            eos_token_id=[511],
        )
    )
    ids = [t for r in responses for t in r.token_ids]
    canvases = {r.canvas_index for r in responses}
    assert len(canvases) == -(-max_tokens // CANVAS)
    assert len(ids) <= max_tokens
    if responses[-1].finish_reason == "length":
        assert len(ids) == max_tokens


def test_streamed_text_equals_generate(checkpoint):
    _, model, tokenizer = checkpoint
    kw = dict(max_tokens=3 * CANVAS, max_denoising_steps=5, seed=11)
    text = generate(model, tokenizer, "a long prompt about nothing", **kw)
    responses = list(stream_generate(model, tokenizer, "a long prompt about nothing", **kw))
    assert "".join(r.text for r in responses) == text
    assert text  # something was generated
    final = responses[-1]
    assert final.finish_reason in ("stop", "length")
    ids = [t for r in responses for t in r.token_ids]
    assert tokenizer.decode(ids) == text
    # the drafts are text while a canvas is denoised
    assert any(r.draft for r in responses if r.finish_reason is None)
    for field in ("prompt_tps", "generation_tps", "peak_memory", "tokens_per_forward"):
        assert getattr(final, field) > 0
    # Raw text is read after <bos>, which Gemma 4's tokenizer does not add itself.
    assert final.prompt_tokens == 1 + len(tokenizer.encode("a long prompt about nothing", add_special_tokens=False))
    assert final.generation_tokens == len(ids)
    assert 1 <= final.denoising_steps <= 3 * 5


def test_batch_rows_match_their_solo_runs(checkpoint):
    _, model, tokenizer = checkpoint
    prompts = ["the first prompt is rather long indeed", "short"]
    kw = dict(max_tokens=2 * CANVAS, max_denoising_steps=4, t_min=0.4, t_max=0.8)
    batch = generate(model, tokenizer, prompts, seed=[5, 9], **kw)
    solo = [generate(model, tokenizer, p, seed=s, **kw) for p, s in zip(prompts, [5, 9])]
    assert batch == solo
    assert batch[0] != batch[1]


def test_sampler_defaults_come_from_the_generation_config(checkpoint, monkeypatch):
    _, model, _ = checkpoint
    monkeypatch.setattr(
        model,
        "generation_config",
        {
            "max_denoising_steps": 12,
            "t_min": None,
            "t_max": 0.7,
            "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3},
            "eos_token_id": [1, 106, 50],
        },
    )
    p = SamplerParams.resolve(model)
    assert (p.max_denoising_steps, p.t_min, p.t_max, p.entropy_bound) == (12, 0.4, 0.7, 0.3)
    assert p.eos_token_id == [1, 106, 50]
    assert SamplerParams.resolve(model, t_min=0.1).t_min == 0.1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(t_min=-0.1), "t_min"),
        (dict(t_min=0.5, t_max=0.5), "t_max"),
        (dict(max_denoising_steps=0), "max_denoising_steps"),
        (dict(entropy_bound=0.0), "entropy_bound"),
        (dict(stability_threshold=-1), "stability_threshold"),
        (dict(confidence_threshold=-1.0), "confidence_threshold"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(prompt=""), "prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=[5] * 5000), "prompt"),
        (dict(prompt=[5, 100_000]), "prompt"),
        (dict(initial_canvas=[1, 2, 3]), "initial_canvas"),
    ],
)
def test_bad_parameters(checkpoint, kwargs, name):
    _, model, tokenizer = checkpoint
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "hello")
    with pytest.raises(ValueError, match=name):
        generate(model, tokenizer, prompt, **kwargs)


def test_memory_does_not_grow_across_generations(checkpoint):
    """One port's first canvas slowed from 1 s to 124 s over ~18 generations in one process."""
    _, model, tokenizer = checkpoint
    kw = dict(max_tokens=2 * CANVAS, max_denoising_steps=3)
    generate(model, tokenizer, "warm up", seed=0, **kw)
    baseline = mx.get_active_memory()
    for seed in range(8):
        generate(model, tokenizer, "the same prompt again", seed=seed, **kw)
    assert mx.get_active_memory() <= baseline + 1_000_000
