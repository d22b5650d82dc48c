"""What one image costs: the vision tower at the released widths, and an image
prompt on the mini preset.

    python benchmarks/image_encoding.py [--width 1024 --height 768] [--dtype float32]
        [--layers 27] [--quantized-error 8 4] [--mini]

1. The released vision tower (27 layers, hidden 1152, from the checkpoint's
   config.json in tests/data), random weights, encodes one photo-shaped image
   (1024 x 768 becomes 57 x 42 patches, 266 soft tokens at the default budget
   of 280): seconds (median of --repeats after a warm-up), the FLOPs of its
   matrix products, the rate, and the peak memory above the weights.
2. --quantized-error BITS...: the soft tokens of the tower quantized as
   nn.quantize does it (group 64, affine; the MLP's
   down projection, 4304 wide, fits no group size and stays in float) against the float tower's, as
   relative RMS error and cosine similarity, over --layers layers (random
   weights: trained ones, with outliers, quantize worse; a lower bound).
3. --mini: the mini preset's text model encoding a prompt of 32 text tokens
   and the image's span, beside the same length of text alone, with the
   vision tower's time for the image: what an image adds to a prompt there.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffgemma.images import ImageProcessor
from mlx_diffgemma.vision import VisionArgs, VisionEmbedder, VisionTower

CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "diffusiongemma-26B-A4B-it" / "config.json"


def released(layers=None):
    config = json.loads(CONFIG.read_text())
    args = VisionArgs.from_dict(config["vision_config"])
    if layers is not None:
        args.num_hidden_layers = layers
    return config, args


def build(args, text_hidden, dtype, seed=0):
    mx.random.seed(seed)
    tower, embed = VisionTower(args), VisionEmbedder(args, text_hidden)
    for module in (tower, embed):
        # Weights at transformers' initialiser scale (normal, std 0.02); norms and
        # standardisation at one and zero, but the q/k norms at 0.3: attention
        # logits then spread about as trained ones do (at one, q.k reaches 72 and
        # the random tower is chaotic: any rounding flips its attention).
        weights = []
        for k, v in tree_flatten(module.parameters()):
            if k.endswith(("q_norm.weight", "k_norm.weight")):
                v = mx.full(v.shape, 0.3)
            elif not ("norm" in k or k.startswith("std_")):
                v = mx.random.normal(v.shape) * 0.02
            weights.append((k, v.astype(dtype)))
        module.load_weights(weights)
    mx.eval(tower.parameters(), embed.parameters())
    return tower, embed


def image(processor, width, height, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    p = processor.preprocess(Image.fromarray(pixels))
    grid = (int(p.position_ids[:, 1].max()) + 1, int(p.position_ids[:, 0].max()) + 1)
    return mx.array(p.pixel_values), mx.array(p.position_ids), grid, p.soft_tokens


def flops(args, patches, soft, text_hidden):
    D, intermediate, P = args.hidden_size, args.intermediate_size, patches
    q_dims = args.num_attention_heads * args.head_dim
    kv_dims = args.num_key_value_heads * args.head_dim
    per_layer = 2 * P * D * (2 * q_dims + 2 * kv_dims) + 2 * P * D * 3 * intermediate + 2 * 2 * P * P * q_dims
    return 2 * P * 3 * args.patch_size**2 * D + args.num_hidden_layers * per_layer + 2 * soft * D * text_hidden


def nbytes(module):
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def encode(tower, embed, pixels, positions, grid):
    out = embed(tower(pixels, positions, grid))
    mx.eval(out)
    return out


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=None, help="Vision layers (default: the released 27).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantized-error", type=int, nargs="*", default=[], metavar="BITS")
    parser.add_argument("--mini", action="store_true")
    args = parser.parse_args()

    config, vision = released(args.layers)
    text_hidden = config["text_config"]["hidden_size"]
    dtype = getattr(mx, args.dtype)
    processor = ImageProcessor(max_soft_tokens=config.get("vision_soft_tokens_per_image", 280))
    pixels, positions, grid, soft = image(processor, args.width, args.height)
    patches = pixels.shape[0]
    print(f"image {args.width}x{args.height}: {grid[0]}x{grid[1]} patches ({patches}), {soft} soft tokens")

    tower, embed = build(vision, text_hidden, dtype)
    weights = nbytes(tower) + nbytes(embed)
    print(f"vision tower: {vision.num_hidden_layers} layers, {weights / 1e9:.2f} GB in {args.dtype}")
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    seconds = timed(lambda: encode(tower, embed, pixels, positions, grid), args.repeats)
    peak = mx.get_peak_memory() - base
    f = flops(vision, patches, soft, text_hidden)
    print(
        f"encode one image: {seconds:.2f} s (median of {args.repeats}), {f / 1e12:.2f} TFLOP, "
        f"{f / seconds / 1e9:.0f} GFLOP/s, peak {peak / 1e9:.2f} GB above the weights"
    )

    if args.quantized_error:
        reference = np.array(encode(tower, embed, pixels, positions, grid).astype(mx.float32))
        for bits in args.quantized_error:
            q_tower, q_embed = build(vision, text_hidden, dtype)
            # The MLP's down projection reads 4304 inputs, which no group size divides:
            # it stays in float, as the converter leaves it.
            fits = lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0  # noqa: E731
            nn.quantize(q_tower, group_size=64, bits=bits, class_predicate=fits)
            nn.quantize(q_embed, group_size=64, bits=bits, class_predicate=fits)
            tic = time.perf_counter()
            out = np.array(encode(q_tower, q_embed, pixels, positions, grid).astype(mx.float32))
            took = time.perf_counter() - tic
            rel = np.sqrt(((out - reference) ** 2).mean() / (reference**2).mean())
            cos = (out * reference).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(reference, axis=-1))
            print(
                f"{bits}-bit tower ({(nbytes(q_tower) + nbytes(q_embed)) / 1e9:.2f} GB): relative RMS error "
                f"{rel:.4f}, cosine min {cos.min():.4f} mean {cos.mean():.4f} ({took:.1f} s)"
            )

    if args.mini:
        from mlx_diffgemma.benchmark import PRESETS
        from mlx_diffgemma.benchmark.presets import random_model

        model = random_model(PRESETS["mini"], 0)
        features = mx.random.normal((soft, model.args.hidden_size)).astype(model.dtype)
        text = [2] + list(range(1000, 1031))
        with_image = text[:16] + [255999] + [258880] * soft + [258882] + text[16:]
        plain = text + list(range(2000, 2000 + soft + 2))

        def prompt(ids, feats):
            cache = model.make_cache()
            out = model.encode(mx.array([ids]), cache, image_features=feats)
            mx.eval(out, [c.state for c in cache])

        t_image = timed(lambda: prompt(with_image, features), args.repeats)
        t_text = timed(lambda: prompt(plain, None), args.repeats)
        print(
            f"mini: a {len(with_image)}-token prompt with the image encodes in {t_image:.3f} s, "
            f"the same length of text in {t_text:.3f} s (x{t_image / t_text:.2f}); with the tower's "
            f"{seconds:.2f} s the image prompt takes {seconds + t_image:.2f} s"
        )


if __name__ == "__main__":
    main()
