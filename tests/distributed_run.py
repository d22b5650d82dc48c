"""Run by tests/test_distributed.py in each process of an mlx.launch group.

    distributed_run.py MODEL OUT {tensor,pipeline} JOB.json

JOB.json: {"generate": [{"prompt": ids or [ids, ...], "seed": s, "max_tokens": n}, ...],
"forward": [ids, ...] (token ids encoded then a canvas denoised)}. Each process
writes OUT-<rank>.json: the committed token ids per generation, and per forward
the encoder's last hidden states and the decoder's logits as lists.
"""

import json
import sys

import mlx.core as mx

from mlx_diffgemma import distributed, load
from mlx_diffgemma.generate import stream_generate


def main():
    model_path, out, split, job = sys.argv[1:5]
    job = json.loads(open(job).read())
    group = distributed.init()
    assert group.size() > 1, "launch with mlx.launch"
    kwargs = dict(pipeline_group=group) if split == "pipeline" else dict(tensor_group=group)
    model, tokenizer = load(model_path, **kwargs)
    result = dict(rank=group.rank(), layers=len(model.layers), generate=[], forward=[])
    for g in job.get("generate", []):
        batch = isinstance(g["prompt"][0], list)
        rows = [[] for _ in range(len(g["prompt"]) if batch else 1)]
        for r in stream_generate(model, tokenizer, g["prompt"], g["max_tokens"], seed=g.get("seed")):
            rows[r.row] += r.token_ids
        result["generate"].append(rows)
    for ids in job.get("forward", []):
        cache = model.make_cache()
        hidden = model.encode(mx.array([ids]), cache)
        canvas = mx.array([ids[: model.canvas_length]])
        logits = model.denoise(canvas, cache)
        result["forward"].append(dict(hidden=hidden.tolist(), logits=logits.tolist()))
    with open(f"{out}-{group.rank()}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
