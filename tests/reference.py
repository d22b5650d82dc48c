"""Tiny DiffusionGemma checkpoints built with transformers, the reference.

The config keeps the real model's structure at toy widths: sliding layers and
full layers with another head_dim and KV-head count, grouped-query attention,
top-k > 1 experts, and a sliding window shorter than the test prompts.
"""

from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

# Large enough for the test tokenizer (tokenizer_fixture.py, ~670 tokens).
VOCAB = 768

TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=5,
    layer_types=[
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=8,
    vocab_size=VOCAB,
    num_experts=8,
    top_k_experts=3,
    moe_intermediate_size=24,
    max_position_embeddings=4096,
)

VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=16,
)

CANVAS = 16


def make_config(vision=None, **text_overrides) -> DiffusionGemmaConfig:
    text = dict(TEXT_CONFIG, **text_overrides)
    return DiffusionGemmaConfig(
        text_config=text, vision_config=dict(VISION_CONFIG, **(vision or {})), canvas_length=CANVAS
    )


def randomize_(model: torch.nn.Module, seed: int = 0, same_scalars: bool = True):
    """Random values for every weight and buffer a port could get wrong.

    transformers initialises norms, router scales and layer scalars to ones,
    which would hide a missing or misplaced one; the embedding is made large
    enough that logits are far from uniform.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                # Keeps attention logits (scale 1.0) near unit spread, as trained
                # q/k norms do; larger ones make the toy network chaotic and
                # float32 rounding alone then exceeds the test tolerance.
                p.copy_(0.5 + 0.05 * torch.randn(p.shape, generator=g))
            elif "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        scalars = {}
        for name, b in model.named_buffers():
            if name.endswith("vision_tower.std_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("vision_tower.std_scale"):
                b.copy_(1.0 + 0.1 * torch.randn(b.shape, generator=g))
            if name.endswith("layer_scalar"):
                layer = name.split(".layers.")[1].split(".")[0]
                # Encoder and decoder carry equal scalars in the release, but
                # they are stored apart, so a test can make them differ.
                if not same_scalars:
                    layer = name
                scalars.setdefault(layer, 0.75 + 0.5 * torch.rand(1, generator=g))
                b.copy_(scalars[layer])


def build_reference(
    path: Path, dtype=torch.float32, seed: int = 0, same_scalars: bool = True, vision=None, **text_overrides
):
    """Save a random tiny checkpoint in the Hugging Face layout; return the torch
    model. ``vision`` overrides fields of the vision config."""
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(make_config(vision, **text_overrides)).eval()
    randomize_(model, seed, same_scalars)
    model = model.to(dtype)
    model.save_pretrained(path)
    return model


def build_test_checkpoint(path: Path, seed: int = 0, **text_overrides) -> Path:
    """``build_reference`` plus the test tokenizer: a checkpoint ``load`` reads whole."""
    from tokenizer_fixture import write_test_tokenizer

    build_reference(path, seed=seed, **text_overrides)
    write_test_tokenizer(path)
    return path
