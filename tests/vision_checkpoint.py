"""A tiny checkpoint with a vision tower, for the tests of image input.

transformers builds it (random weights, the released structure at toy widths:
a standardized two-layer tower, image tokens that see each other both ways);
the test tokenizer's image markers stand in for the real ids, and the image
processor takes Gemma 4's smallest budget, 70 soft tokens, to keep prompts short.
"""

import io
import json

import numpy as np
from PIL import Image
from reference import build_reference
from tokenizer_fixture import BOI_ID, EOI_ID, IMAGE_ID, write_test_tokenizer

VISION = dict(num_hidden_layers=2, standardize=True, position_embedding_size=64)
SOFT_TOKENS = 70  # the smallest budget Gemma 4 supports, to keep prompts short


def write_vision_checkpoint(path, seed=1):
    ref = build_reference(path, seed=seed, vision=VISION, use_bidirectional_attention="vision")
    ref.config.image_token_id = IMAGE_ID
    write_test_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    config.update(image_token_id=IMAGE_ID, boi_token_id=BOI_ID, eoi_token_id=EOI_ID)
    (path / "config.json").write_text(json.dumps(config))
    (path / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": SOFT_TOKENS}}))
    return ref


def picture(seed, size=(64, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
