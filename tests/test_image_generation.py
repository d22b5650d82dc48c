"""Generation with images, end to end: against transformers' generate (its own
image processor, its masks), through chat and its cache, in batches, and bad input."""

import base64
import copy
import importlib

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import CANVAS
from test_generate import DETERMINISTIC, reference_generate
from tokenizer_fixture import BOI_ID, EOI_ID, IMAGE_ID
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
from vision_checkpoint import SOFT_TOKENS, picture, png, write_vision_checkpoint

from mlx_diffgemma import chat, generate, stream_generate
from mlx_diffgemma.chat import stream_chat
from mlx_diffgemma.chat_template import render
from mlx_diffgemma.image_prompts import image_features, place_images, prepare_images, split_message_images
from mlx_diffgemma.images import ImageError
from mlx_diffgemma.prompts import encode_prompt
from mlx_diffgemma.utils import load

gen = importlib.import_module("mlx_diffgemma.generate")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vision_gen")
    ref = write_vision_checkpoint(path)
    model, tokenizer = load(str(path))
    return ref, model, tokenizer, path


def test_tokens_equal_the_references_with_an_image(checkpoint, monkeypatch):
    """Deterministic limit, as the text generation test: the reference reads
    the image through its own processor and builds its own masks."""
    ref, model, _, _ = checkpoint
    image = picture(0)
    rng = np.random.default_rng(5)
    ids = [2, *rng.integers(110, 700, 4).tolist(), IMAGE_ID, *rng.integers(110, 700, 6).tolist()]
    expanded = place_images(model, ids, prepare_images(model, [image]))
    processed = Gemma4ImageProcessorPil(max_soft_tokens=SOFT_TOKENS)(images=[image], return_tensors="pt")
    n = int(processed["num_soft_tokens_per_image"][0])
    assert expanded == ids[:5] + [BOI_ID] + [IMAGE_ID] * n + [EOI_ID] + ids[6:]

    inits = [rng.integers(0, 700, (1, CANVAS)) for _ in range(2)]
    params = dict(DETERMINISTIC, max_denoising_steps=8, stability_threshold=1)
    input_ids = np.array([expanded])
    expected, _ = reference_generate(
        ref,
        input_ids,
        inits,
        2 * CANVAS,
        pixel_values=processed["pixel_values"],
        image_position_ids=processed["image_position_ids"],
        mm_token_type_ids=torch.tensor(input_ids == IMAGE_ID).long(),
        **dict(params),
    )
    calls = iter(inits)
    monkeypatch.setattr(gen, "noise_canvas", lambda keys, c, v: mx.array(next(calls)))
    tokens = [
        t
        for r in stream_generate(
            model, None, ids, max_tokens=2 * CANVAS, seed=0, eos_token_id=[1], images=[png(image)], **params
        )
        for t in r.token_ids
    ]
    assert tokens == expected[0].tolist()
    # Another picture gives other tokens: the test sees the image.
    calls = iter(inits)
    other = [
        t
        for r in stream_generate(
            model, None, ids, max_tokens=2 * CANVAS, seed=0, eos_token_id=[1], images=[picture(9)], **params
        )
        for t in r.token_ids
    ]
    assert other != tokens


def ask(text, *images):
    return {
        "role": "user",
        "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}],
    }


KW = dict(max_tokens=CANVAS, max_denoising_steps=3, seed=7)


def test_chat_reads_image_parts_as_generate_does(checkpoint):
    _, model, tokenizer, _ = checkpoint
    image = picture(1)
    messages = [ask("What is this?", png(image))]
    answer = chat(model, tokenizer, messages, **KW)
    # The template writes one image token where the image part is.
    parts = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    rendered = render(tokenizer, [{"role": "user", "content": parts}])
    assert rendered.count(IMAGE_ID) == 1
    assert answer.text == generate(model, tokenizer, rendered, images=[image], **KW)
    # OpenAI's image_url parts, with a data URL, are the same image.
    url = "data:image/png;base64," + base64.b64encode(png(image)).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    openai_style = [{"role": "user", "content": parts}]
    assert chat(model, tokenizer, openai_style, **KW).text == answer.text


def test_a_second_turn_continues_the_cache_with_its_images(checkpoint):
    _, model, tokenizer, _ = checkpoint
    first = [ask("Look.", picture(2))]
    responses = list(stream_chat(model, tokenizer, first, **KW))
    one = responses[-1]
    # The cache holds the prompt with its image and the answer, as if encoded at once.
    images = prepare_images(model, [picture(2)])
    prompt = place_images(model, render(tokenizer, split_message_images(first)[0]), images)
    tokens = prompt + [t for r in responses for t in r.token_ids] + [one.chat_cache.stop_token]
    fresh = model.make_cache()
    encode_prompt(model, [tokens], fresh, [image_features(model, images)])
    assert one.chat_cache.cache.offset == len(tokens)
    for ours, theirs in zip(one.chat_cache.cache, fresh):
        np.testing.assert_allclose(np.array(ours.keys), np.array(theirs.keys), atol=1e-4)

    def second_turn(picture_seed, cache):
        follow = first + [{"role": "assistant", "content": "A picture."}, ask("And this?", picture(picture_seed))]
        saved = copy.deepcopy(cache)
        return chat(model, tokenizer, follow, chat_cache=saved, **KW)

    a, b = second_turn(3, one.chat_cache), second_turn(5, one.chat_cache)
    # Only the new turn is encoded (the newline closing the last, then the turn
    # without <bos>), its image with it; and the image is read.
    new_turn = render(tokenizer, split_message_images([ask("And this?", picture(3))])[0])
    new_turn = place_images(model, new_turn, prepare_images(model, [picture(3)]))
    assert a.prompt_tokens == b.prompt_tokens == 1 + len(new_turn) - 1
    assert a.text != b.text
    # Another picture of the same size in the first turn renders to the same ids,
    # but is another conversation: the cache is not reused.
    edited = [ask("Look.", picture(4)), {"role": "assistant", "content": "A picture."}, ask("And this?", picture(3))]
    again = chat(model, tokenizer, edited, chat_cache=copy.deepcopy(one.chat_cache), **KW)
    assert again.prompt_tokens > len(prompt) + a.prompt_tokens - 5


def test_a_batch_with_and_without_images_gives_each_row_its_own_answer(checkpoint):
    _, model, tokenizer, _ = checkpoint
    a = [2, 300, 301, IMAGE_ID, 302]
    b = [2, 400, 401, 402]
    kw = dict(max_tokens=CANVAS, max_denoising_steps=3)
    both = generate(model, tokenizer, [a, b], images=[[picture(5)], None], seed=9, **kw)
    assert both[0] == generate(model, tokenizer, a, images=[picture(5)], seed=9, **kw)
    assert both[1] == generate(model, tokenizer, b, seed=10, **kw)


def test_bad_images_and_mismatched_places(checkpoint, tmp_path):
    _, model, tokenizer, _ = checkpoint
    ids = [2, 300, IMAGE_ID, 301]
    with pytest.raises(ValueError, match="1 image place.* for 0 image"):
        generate(model, tokenizer, ids, max_tokens=8)
    with pytest.raises(ValueError, match="0 image place.* for 1 image"):
        generate(model, tokenizer, [2, 300], images=[picture(0)], max_tokens=8)
    broken = tmp_path / "broken.png"
    broken.write_bytes(png(picture(0))[:100])
    with pytest.raises(ImageError, match="broken.png"):
        generate(model, tokenizer, ids, images=[str(broken)], max_tokens=8)
    with pytest.raises(ImageError, match="9 images"):
        generate(model, tokenizer, [2] + [IMAGE_ID, 300] * 9, images=[picture(0)] * 9, max_tokens=8)


def test_an_image_for_a_text_only_checkpoint(checkpoint, tmp_path):
    """A conversion made before vision was read keeps no vision weights: it loads, reads text, refuses images."""
    _, _, _, path = checkpoint
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    for f in path.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (text_only / f.name).write_bytes(f.read_bytes())
    weights = {k: v for k, v in mx.load(str(path / "model.safetensors")).items() if "vision" not in k}
    mx.save_safetensors(str(text_only / "model.safetensors"), weights)
    model, tokenizer = load(str(text_only))
    assert model.args.vision is None
    assert isinstance(generate(model, tokenizer, [2, 300], max_tokens=8, max_denoising_steps=2), str)
    with pytest.raises(ValueError, match="has no vision tower"):
        generate(model, tokenizer, [2, 300, IMAGE_ID], images=[picture(0)], max_tokens=8)


def test_image_places_side_by_side_expanded_and_wrapped(checkpoint):
    _, model, _, _ = checkpoint
    a, b = prepare_images(model, [picture(0), picture(1, size=(48, 64))])
    na, nb = a.soft_tokens, b.soft_tokens
    span_a = [BOI_ID] + [IMAGE_ID] * na + [EOI_ID]
    span_b = [BOI_ID] + [IMAGE_ID] * nb + [EOI_ID]
    # Two markers side by side are two images, in order.
    assert place_images(model, [2, IMAGE_ID, IMAGE_ID, 9], [a, b]) == [2, *span_a, *span_b, 9]
    # An expanded span is kept; a marker its caller wrapped is not wrapped twice.
    assert place_images(model, [2, *span_a, IMAGE_ID], [a, b]) == [2, *span_a, *span_b]
    assert place_images(model, [2, BOI_ID, IMAGE_ID, EOI_ID], [a]) == [2, *span_a]
    with pytest.raises(ValueError, match=f"holds 3 image tokens; the image takes {na}"):
        place_images(model, [2, BOI_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, EOI_ID], [a])


def test_the_first_run_memory_check_counts_the_vision_tower(checkpoint):
    from mlx_diffgemma import cli
    from mlx_diffgemma.utils import LoadError

    _, model, _, path = checkpoint
    weights = mx.load(str(path / "model.safetensors"))
    vision = sum(v.nbytes for k, v in weights.items() if "vision" in k)
    size = (path / "model.safetensors").stat().st_size
    assert vision > 0
    cli.check_memory(str(path), memory=size)  # fits
    with pytest.raises(LoadError, match="more than"):
        # Room for all but half the tower: the text alone would fit, the whole does not.
        cli.check_memory(str(path), memory=size - vision // 2)


def test_prompt_chunks_never_cut_an_image(checkpoint, monkeypatch):
    """Prompts are encoded in chunks; a chunk end that falls inside an image moves past it,
    and the result equals encoding the prompt at once."""
    from mlx_diffgemma import prompts

    _, model, _, _ = checkpoint
    images = prepare_images(model, [picture(0)])
    ids = place_images(model, [2, 300, 301, IMAGE_ID, 302, 303], images)
    features = [image_features(model, images)]
    whole = model.make_cache()
    encode_prompt(model, [ids], whole, features)
    monkeypatch.setattr(prompts, "PREFILL_STEP", 8)
    bounds = prompts._chunks(len(ids), np.array([ids]) == IMAGE_ID)
    # bos, 300, 301, <|image>, then the image's tokens: the first chunk ends after them.
    assert bounds == [(0, 4 + images[0].soft_tokens), (4 + images[0].soft_tokens, len(ids))]
    chunked = model.make_cache()
    encode_prompt(model, [ids], chunked, features)
    for ours, theirs in zip(chunked, whole):
        np.testing.assert_allclose(np.array(ours.keys), np.array(theirs.keys), atol=1e-5)
