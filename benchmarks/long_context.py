"""Encoding a long prompt: its speed, and its peak memory against weights + KV cache.

    python benchmarks/long_context.py [--preset mini] [--prompt-tokens 32768] [--chunk 2048]

Random weights and a random prompt, encoded by ``prompts.encode_prompt`` (in
chunks of ``--chunk`` tokens) into a fresh cache. Whatever the encoder holds
besides the weights and the cache (attention scores, masks, a chunk's
activations) is the peak minus the two; the goal is under 1 GB at 32,768
tokens on mini.
"""

import argparse
import importlib
import time

import mlx.core as mx

from mlx_diffgemma import blas
from mlx_diffgemma.benchmark import PRESETS, random_model, random_prompts
from mlx_diffgemma.benchmark.common import weight_bytes

# The package exports a function of the same name, so the module is imported by name.
prompts = importlib.import_module("mlx_diffgemma.prompts")

GB = 1e9
ALLOWANCE = 1 * GB


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=prompts.PREFILL_STEP, help="tokens per encoder call")
    args = parser.parse_args()

    config = PRESETS[args.preset]
    limit = config["text_config"]["max_position_embeddings"]
    if args.prompt_tokens > limit:
        parser.error(f"--prompt-tokens is above the preset's max_position_embeddings ({limit})")
    model = random_model(config, seed=0)
    prompt = random_prompts(1, args.prompt_tokens, model.args.vocab_size, 0)
    prompts.PREFILL_STEP = args.chunk  # encode_prompt reads it at each call
    weights = weight_bytes(model)

    cache = model.make_cache()
    mx.synchronize()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompts.encode_prompt(model, prompt, cache)
    mx.synchronize()
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory()

    bound = weights + cache.nbytes
    print(f"device: {mx.default_device()}, BLAS: {blas.describe()}")
    print(f"preset {args.preset}, chunks of {args.chunk} tokens")
    print(f"prompt tokens:              {args.prompt_tokens}")
    print(f"time:                       {seconds:.1f} s")
    print(f"prompt tokens/s:            {args.prompt_tokens / seconds:.1f}")
    print(f"weights:                    {weights / GB:.3f} GB")
    print(f"KV cache:                   {cache.nbytes / GB:.3f} GB")
    print(f"peak memory:                {peak / GB:.3f} GB")
    print(f"peak - (weights + cache):   {(peak - bound) / GB:.3f} GB")
    under = peak < bound + ALLOWANCE
    print(f"under weights + cache + 1 GB: {'yes' if under else 'no'}")


if __name__ == "__main__":
    main()
