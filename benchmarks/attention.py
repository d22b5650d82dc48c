"""Why a denoising step's attention costs several times its matrix products here.

    python benchmarks/attention.py [--cache 512]

One layer's attention at the mini preset's canvas shapes (256 queries over the
cache plus the canvas; a sliding layer: 16 heads of 64 over 8 KV heads; the
full layer: 16 heads of 128 over 2): MLX's scaled_dot_product_attention
beside its parts, each timed alone: the two products (scores, then values, as
plain matmuls on the repeated KV heads), one softmax of the scores, and one exp
of them. Medians of 5, taking turns.
"""

import argparse

import mlx.core as mx

from mlx_diffgemma.benchmark import PRESETS
from mlx_diffgemma.benchmark.common import interleaved_medians

TEXT = PRESETS["mini"]["text_config"]
CANVAS = PRESETS["mini"]["canvas_length"]


def layer(heads: int, kv_heads: int, head_dim: int, keys: int) -> dict:
    key = mx.random.split(mx.random.key(0), 3)
    q = mx.random.normal((1, heads, CANVAS, head_dim), key=key[0])
    k = mx.random.normal((1, kv_heads, keys, head_dim), key=key[1])
    v = mx.random.normal((1, kv_heads, keys, head_dim), key=key[2])
    repeat = heads // kv_heads
    k_full, v_full = mx.repeat(k, repeat, axis=1), mx.repeat(v, repeat, axis=1)
    scores = q @ k_full.swapaxes(-1, -2)
    mx.eval(q, k, v, k_full, v_full, scores)
    probs = mx.softmax(scores, axis=-1)
    mx.eval(probs)
    return {
        "sdpa (what the model calls)": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0),
        "  q @ k^T": lambda: q @ k_full.swapaxes(-1, -2),
        "  p @ v": lambda: probs @ v_full,
        "  softmax of the scores": lambda: mx.softmax(scores, axis=-1),
        "  exp of the scores": lambda: mx.exp(scores),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=int, default=512, help="cached tokens before the canvas (default 512)")
    args = parser.parse_args()
    window = TEXT["sliding_window"] - 1
    sliding = layer(
        TEXT["num_attention_heads"], TEXT["num_key_value_heads"], TEXT["head_dim"], min(args.cache, window) + CANVAS
    )
    full = layer(
        TEXT["num_attention_heads"], TEXT["num_global_key_value_heads"], TEXT["global_head_dim"], args.cache + CANVAS
    )
    print(f"device: {mx.default_device()}; {CANVAS} queries over {args.cache} cached + {CANVAS} canvas keys")
    for name, ops in (("sliding layer", sliding), ("full layer", full)):
        times = interleaved_medians(ops, repeats=5)
        print(name)
        for op, seconds in times.items():
            print(f"  {op:34s} {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
