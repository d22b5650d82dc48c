"""Memory of one LoRA training step at the released model's widths, per layer.

    python benchmarks/lora_memory.py [--prompt-tokens 256] [--blocks 1] [--grad-checkpoint]

Builds models with the released config's widths (hidden 2816, 128 experts of
704, top-8, vocabulary 262,144, canvas 256) but only one or two layers, random
float32 weights, LoRA (rank 8, the default keys) on every layer, and measures
the peak memory of one training step (forward and backward of the
block-diffusion loss, self-conditioning pass included) above the weights.
From models of 1 and 2 layers of each kind it reads what one sliding layer,
one full-attention layer and the rest (embedding, head, logits) cost, and
prints the estimate for the 30-layer model: weights + 25 sliding + 5 full
layers + the rest. Float32 activations: a bf16 or quantized model keeps its
hidden states in bf16, about half the per-layer figure (the logits stay
float32 either way).
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_diffgemma.config import ModelArgs
from mlx_diffgemma.model import Model
from mlx_diffgemma.tuner import adapters
from mlx_diffgemma.tuner.datasets import Example
from mlx_diffgemma.tuner.objective import ObjectiveArgs, loss, make_batch
from mlx_diffgemma.tuner.trainer import checkpoint_feed_forward

CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "diffusiongemma-26B-A4B-it" / "config.json"
GB = 1e9


def step_memory(layer_types, prompt_tokens: int, blocks: int, grad_checkpoint: bool = False) -> dict:
    config = json.loads(CONFIG.read_text())
    text = dict(config["text_config"], num_hidden_layers=len(layer_types), layer_types=layer_types)
    text.pop("per_layer_config", None)
    args = ModelArgs.from_dict(dict(config, text_config=text))
    model = Model(args)
    adapters.prepare(model, "lora", -1)
    if grad_checkpoint:
        checkpoint_feed_forward(model)
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rng = np.random.default_rng(0)
    C = args.canvas_length
    example = Example(
        [2] + rng.integers(10, 1000, prompt_tokens - 1).tolist(), rng.integers(10, 1000, blocks * C - 1).tolist(), "x"
    )
    objective = ObjectiveArgs(C, args.vocab_size, [1, 106, 50], 0, self_conditioning_rate=1.0)
    batch = make_batch([example], objective, rng)
    value_and_grad = nn.value_and_grad(model, loss)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    (value, _), grad = value_and_grad(model, batch)
    mx.eval(value, grad)
    peak = mx.get_peak_memory() - base
    del model, grad
    mx.clear_cache()
    return {"weights": weights, "step": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=1, help="completion blocks of 256 (the encoder reads them all)")
    parser.add_argument("--grad-checkpoint", action="store_true", help="recompute the MLPs and experts backward")
    args = parser.parse_args()
    s, f = "sliding_attention", "full_attention"
    runs = {}
    for name, types in (("F", [f]), ("FF", [f, f]), ("SF", [s, f])):
        runs[name] = step_memory(types, args.prompt_tokens, args.blocks, args.grad_checkpoint)
        print(f"{name}: weights {runs[name]['weights'] / GB:.2f} GB, step {runs[name]['step'] / GB:.3f} GB", flush=True)
    full = runs["FF"]["step"] - runs["F"]["step"]
    sliding = runs["SF"]["step"] - runs["F"]["step"]
    rest = runs["F"]["step"] - full
    tokens = args.prompt_tokens + 256 * args.blocks
    print(f"Sequence: {tokens} tokens (prompt {args.prompt_tokens} + {args.blocks} blocks of 256), batch 1")
    print(f"Per sliding layer: {sliding / GB:.3f} GB; per full layer: {full / GB:.3f} GB; the rest: {rest / GB:.3f} GB")
    estimate = 25 * sliding + 5 * full + rest
    print(f"30 layers (25 sliding, 5 full), float32 activations: {estimate / GB:.2f} GB above the weights")


if __name__ == "__main__":
    main()
