"""Tiny checkpoints for quantization tests and measurements.

`build_reference` gives every weight a random value. Two things about such a
network make it a poor stand-in for a trained one when quantization error is
measured:

- its router logits spread by about 1/sqrt(hidden) (0.125 here), so top-k
  experts are near ties and any perturbation flips some; one flip changes a
  token's output wholesale (random experts share nothing) and, through
  attention, every later token;
- each sublayer adds as much to the residual as the residual holds, which
  amplifies a perturbation at every layer.

Measured on it: 0.1% noise on every matrix moves the logits by 0.34 RMS (0.01%
noise: 0.002). Routing flips make nearly all of it: with 0.1% noise on the
attention matrices alone, 0.34 RMS, and 0.014 with each router's choice held.

`build_quantization_reference` rescales the router so its logits spread by
ROUTER_SPREAD (a trained router picks its experts by a margin) and the
post-sublayer norms by POST_NORM_SCALE (each layer changes part of the
residual). 0.1% noise then moves the logits by 0.09 RMS, and the final
argmax is still the canvas token itself at only about half the positions
(the smaller the sublayers, the more the logits just echo the input). Widths
divide the group size 64, so every matrix can be quantized, as in the real
model.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from reference import build_reference

ROUTER_SPREAD = 1.5
POST_NORM_SCALE = 0.6
QUANTIZABLE_WIDTHS = dict(intermediate_size=128, moe_intermediate_size=64)


def build_quantization_reference(path: Path, dtype=torch.float32, seed: int = 0, **text_overrides):
    """Save the checkpoint to ``path`` (Hugging Face layout); return the torch model."""
    model = build_reference(path, dtype=torch.float32, seed=seed, **dict(QUANTIZABLE_WIDTHS, **text_overrides))
    hidden = model.config.get_text_config().hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.proj.weight"):
                p.mul_(ROUTER_SPREAD * hidden**0.5)
            elif ".post_" in name and "layernorm" in name:
                p.mul_(POST_NORM_SCALE)
    model = model.to(dtype)
    model.save_pretrained(path)
    return model


def quantization_logits(model, seed: int = 0, prompts: int = 4) -> np.ndarray:
    """Float32 logits [prompts, 2 x canvas, vocab] of two denoising steps.

    ``encode`` a 24-token prompt (longer than the sliding window), then
    ``denoise`` a random canvas twice: the first step, and a self-conditioned
    step fed the first step's logits / 0.6 (which goes through the embedding
    table, quantized or not).
    """
    rng = np.random.default_rng(1000 + seed)
    vocab, canvas_length = model.args.vocab_size, model.canvas_length
    prompt = mx.array(rng.integers(0, vocab, (prompts, 24)))
    canvas = mx.array(rng.integers(0, vocab, (prompts, canvas_length)))
    cache = model.make_cache()
    model.encode(prompt, cache)
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, first / 0.6)
    return np.array(mx.concatenate([first, second], axis=1))


def logit_error(ours: np.ndarray, ref: np.ndarray):
    """(RMS difference, max abs difference, top-1 agreement)."""
    d = ours - ref
    return (
        float(np.sqrt((d**2).mean())),
        float(np.abs(d).max()),
        float((ours.argmax(-1) == ref.argmax(-1)).mean()),
    )
