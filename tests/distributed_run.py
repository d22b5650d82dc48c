"""Run by tests/test_distributed.py in each process of an mlx.launch group.

    distributed_run.py MODEL OUT {tensor,pipeline} JOB.json

JOB.json: {"generate": [{"prompt": ids or [ids, ...], "seed": s, "max_tokens": n,
"images": [path, ...] (optional)}, ...], "forward": [ids or {"prompt": text,
"images": [path, ...]}, ...] (encoded, then a canvas denoised)}. Each process writes OUT-<rank>.json: the committed
token ids per generation, per forward the encoder's last hidden states and the
decoder's logits as lists, and which modules it holds.
"""

import json
import sys

import mlx.core as mx

from mlx_diffgemma import distributed, load
from mlx_diffgemma.generate import stream_generate
from mlx_diffgemma.image_prompts import image_features, place_images, prepare_images
from mlx_diffgemma.prompts import text_ids


def forward(model, tokenizer, entry) -> dict:
    """``entry`` (ids, or a text prompt with images) encoded, then its first
    ids as a canvas denoised: the last hidden states and the logits."""
    features = None
    if isinstance(entry, dict):
        images = prepare_images(model, entry["images"])
        ids = place_images(model, text_ids(tokenizer, entry["prompt"]), images)
        features = image_features(model, images)
    else:
        ids = entry
    cache = model.make_cache()
    hidden = model.encode(mx.array([ids]), cache, image_features=features)
    logits = model.denoise(mx.array([ids[: model.canvas_length]]), cache)
    return dict(hidden=hidden.tolist(), logits=logits.tolist())


def main():
    model_path, out, split, job = sys.argv[1:5]
    job = json.loads(open(job).read())
    group = distributed.init()
    assert group.size() > 1, "launch with mlx.launch"
    kwargs = dict(pipeline_group=group) if split == "pipeline" else dict(tensor_group=group)
    model, tokenizer = load(model_path, **kwargs)
    vision = "vision_tower" in model and "embed_vision" in model
    result = dict(rank=group.rank(), layers=len(model.layers), vision=vision, generate=[], forward=[])
    for g in job.get("generate", []):
        batch = isinstance(g["prompt"][0], list)
        rows = [[] for _ in range(len(g["prompt"]) if batch else 1)]
        kw = dict(seed=g.get("seed"), images=g.get("images"))
        for r in stream_generate(model, tokenizer, g["prompt"], g["max_tokens"], **kw):
            rows[r.row] += r.token_ids
        result["generate"].append(rows)
    for entry in job.get("forward", []):
        result["forward"].append(forward(model, tokenizer, entry))
    with open(f"{out}-{group.rank()}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
