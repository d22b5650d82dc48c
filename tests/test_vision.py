"""The vision tower and image prompts against transformers' DiffusionGemma, same weights.

The tiny checkpoint has the released structure: a standardized vision tower of
two layers, 3 x 3 pooling, and image tokens that see each other both ways while
the prompt is encoded (use_bidirectional_attention="vision"). One image is
wider (12 soft tokens) than the sliding window (8), so that rule is exercised
in the sliding layers as well as in the full ones. Tolerance as the text
parity tests: 1e-4 on float32.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import CANVAS, VOCAB, build_reference
from transformers import DynamicCache

from mlx_diffgemma.utils import load_model

TOL = 1e-4
VISION = dict(num_hidden_layers=2, standardize=True, position_embedding_size=64)
IMAGE_ID, BOI, EOI = 258880 % VOCAB, 255999 % VOCAB, 258882 % VOCAB  # kept inside the tiny vocabulary
# Patch grids (rows, columns): 2 x 3 and 6 x 6 pooled cells.
GRIDS = [(6, 9), (6, 18)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vision_ckpt")
    ref = build_reference(path, vision=VISION, use_bidirectional_attention="vision")
    ref.config.image_token_id = IMAGE_ID
    config = path / "config.json"
    import json

    data = json.loads(config.read_text())
    data.update(image_token_id=IMAGE_ID, boi_token_id=BOI, eoi_token_id=EOI)
    config.write_text(json.dumps(data))
    return ref, load_model(path)


def patches(rng, grid, patch_pixels):
    rows, cols = grid
    pixels = rng.random((rows * cols, patch_pixels)).astype(np.float32)
    x, y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([x, y], axis=-1).reshape(-1, 2).astype(np.int64)
    return pixels, positions


def padded(images, length):
    """transformers' batch layout: every image padded to ``length`` patches, positions -1."""
    pixels = np.zeros((len(images), length, images[0][0].shape[1]), np.float32)
    positions = -np.ones((len(images), length, 2), np.int64)
    for i, (p, q) in enumerate(images):
        pixels[i, : len(p)], positions[i, : len(q)] = p, q
    return torch.tensor(pixels), torch.tensor(positions)


def soft_tokens(grid):
    return grid[0] * grid[1] // 9


def ours_features(model, images, grids):
    return mx.concatenate([model.encode_image(mx.array(p), mx.array(q), g) for (p, q), g in zip(images, grids)], axis=0)


def prompt(rng, grids):
    """Text, then each image as boi, its soft tokens, eoi, then text."""
    ids = [2, *rng.integers(110, VOCAB, 5).tolist()]
    for g in grids:
        ids += [BOI] + [IMAGE_ID] * soft_tokens(g) + [EOI] + rng.integers(110, VOCAB, 3).tolist()
    return ids


def test_image_features_match_the_reference(checkpoint):
    ref, model = checkpoint
    rng = np.random.default_rng(0)
    images = [patches(rng, g, 3 * 16 * 16) for g in GRIDS]
    pixel_values, position_ids = padded(images, max(len(p) for p, _ in images))
    with torch.no_grad():
        expected = ref.model.encoder.get_image_features(pixel_values, position_ids).pooler_output.numpy()
    ours = ours_features(model, images, GRIDS)
    assert ours.shape == expected.shape == (sum(map(soft_tokens, GRIDS)), model.args.hidden_size)
    assert float(np.abs(np.array(ours) - expected).max()) < TOL
    assert expected.std() > 0.1  # the features carry signal


def ref_logits(ref, ids, images, canvas, attention_mask=None):
    pixel_values, position_ids = padded(images, max(len(p) for p, _ in images))
    input_ids = torch.tensor(ids)
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    # The masks as transformers' generate builds them: its encoder's forward
    # computes the image-aware masks but drops them, so a direct call would
    # run the images causally; generation passes them in.
    masks = ref.model.encoder.create_masks_for_generate(
        config=ref.config,
        inputs_embeds=torch.empty((*input_ids.shape, 0)),
        attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
        past_key_values=cache,
        position_ids=torch.arange(input_ids.shape[1])[None],
        mm_token_type_ids=(input_ids == IMAGE_ID).long(),
    )
    with torch.no_grad():
        hidden = ref.model.encoder(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_position_ids=position_ids,
            attention_mask=masks,
            past_key_values=cache,
        ).last_hidden_state.numpy()
        logits = ref(
            decoder_input_ids=torch.tensor(canvas),
            past_key_values=cache,
            decoder_attention_mask=None
            if attention_mask is None
            else torch.tensor(np.concatenate([attention_mask, np.ones_like(canvas)], axis=1)),
        ).logits.numpy()
    return hidden, logits


def test_a_prompt_with_images_matches_the_reference(checkpoint):
    ref, model = checkpoint
    rng = np.random.default_rng(1)
    images = [patches(rng, g, 3 * 16 * 16) for g in GRIDS]
    ids = prompt(rng, GRIDS)
    canvas = rng.integers(0, VOCAB, (1, CANVAS))
    hidden, logits = ref_logits(ref, [ids], images, canvas)

    cache = model.make_cache()
    features = ours_features(model, images, GRIDS)
    ours_hidden = model.encode(mx.array([ids]), cache, image_features=features)
    ours_logits = model.denoise(mx.array(canvas), cache)
    assert float(np.abs(np.array(ours_hidden) - hidden).max()) < TOL
    assert float(np.abs(np.array(ours_logits) - logits).max()) < TOL

    # Both halves of the rule matter here: the image in place of its tokens,
    # and its tokens seeing each other both ways.
    causal = model.make_cache()
    model.args.bidirectional_images = False
    try:
        causal_hidden = model.encode(mx.array([ids]), causal, image_features=features)
    finally:
        model.args.bidirectional_images = True
    assert float(np.abs(np.array(causal_hidden) - hidden).max()) > 1e-2
    text_only = model.encode(mx.array([ids]), model.make_cache())
    assert float(np.abs(np.array(text_only) - hidden).max()) > 1e-2


def test_a_left_padded_batch_with_images_matches_the_reference(checkpoint):
    """Row 0 has both images, row 1 (shorter, left-padded) only the first."""
    ref, model = checkpoint
    rng = np.random.default_rng(2)
    images = [patches(rng, g, 3 * 16 * 16) for g in GRIDS + GRIDS[:1]]
    rows = [prompt(rng, GRIDS), prompt(rng, GRIDS[:1])]
    length = max(map(len, rows))
    pad = [length - len(r) for r in rows]
    ids = [[0] * n + r for n, r in zip(pad, rows)]
    mask = np.array([[0] * n + [1] * len(r) for n, r in zip(pad, rows)])
    canvas = rng.integers(0, VOCAB, (2, CANVAS))
    hidden, logits = ref_logits(ref, ids, images, canvas, attention_mask=mask)

    cache = model.make_cache()
    features = ours_features(model, images, GRIDS + GRIDS[:1])
    ours_hidden = model.encode(mx.array(ids), cache, left_padding=pad, image_features=features)
    ours_logits = model.denoise(mx.array(canvas), cache)
    real = mask.astype(bool)
    assert float(np.abs(np.array(ours_hidden)[real] - hidden[real]).max()) < TOL
    assert float(np.abs(np.array(ours_logits) - logits).max()) < TOL


def test_image_tokens_and_features_must_agree(checkpoint):
    _, model = checkpoint
    rng = np.random.default_rng(3)
    images = [patches(rng, GRIDS[0], 3 * 16 * 16)]
    features = ours_features(model, images, GRIDS[:1])
    ids = prompt(rng, GRIDS[:1])
    ids.remove(IMAGE_ID)
    with pytest.raises(ValueError, match="5 image tokens for 6 image soft tokens"):
        model.encode(mx.array([ids]), model.make_cache(), image_features=features)
