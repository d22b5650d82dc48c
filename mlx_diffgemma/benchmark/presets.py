"""What the benchmark times when no checkpoint is given: presets in the
checkpoint's config.json format (the released model's shapes, narrower or
shallower), built with random weights, quantized with the converter's
recipes, or written as a transformers checkpoint for the comparisons; and
random prompts."""

import copy
import math
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..config import DEFAULT_ROPE, ModelArgs
from ..model import Model
from ..recipes import DEFAULT_RECIPE, module_quantization, quantization_settings

# The benchmark is text only; transformers and mlx-vlm still build a vision
# tower from the checkpoint, so it is kept minimal.
_TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=16,
)


def _preset(canvas_length: int = 256, **widths) -> dict:
    """A config with the released model's head counts, window and top-k
    unless ``widths`` says otherwise; full layers' heads are twice as wide."""
    text = dict(
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        sliding_window=1024,
        top_k_experts=8,
        max_position_embeddings=262_144,
        global_head_dim=2 * widths["head_dim"],
    )
    text.update(widths)
    layers = text["num_hidden_layers"]
    # The released pattern: five sliding-window layers, then one full layer.
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    text = dict(
        model_type="diffusion_gemma_text",
        layer_types=(pattern * math.ceil(layers / 6))[:layers],
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        final_logit_softcapping=30.0,
        rope_parameters=DEFAULT_ROPE,
        tie_word_embeddings=True,
        use_bidirectional_attention="vision",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        **text,
    )
    return dict(
        model_type="diffusion_gemma",
        architectures=["DiffusionGemmaForBlockDiffusion"],
        canvas_length=canvas_length,
        eos_token_id=[1, 106],
        tie_word_embeddings=True,
        text_config=text,
        vision_config=_TINY_VISION,
    )


PRESETS = {
    # Every structural feature at toy widths: runs in seconds anywhere.
    "tiny": _preset(
        canvas_length=32,
        hidden_size=128,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=128,
        vocab_size=4096,
        num_experts=8,
        top_k_experts=2,
        max_position_embeddings=16_384,
    ),
    # The real model's proportions at about 1/4 of its widths, 6 of its 30
    # layers (5 sliding + 1 full) and 1/4 of its vocabulary; real canvas and window.
    "mini": _preset(
        hidden_size=704,
        intermediate_size=528,
        moe_intermediate_size=176,
        num_hidden_layers=6,
        head_dim=64,
        vocab_size=65_536,
        num_experts=32,
    ),
    # google/diffusiongemma-26B-A4B-it's shapes (about 100 GB in float32).
    "full": _preset(
        hidden_size=2816,
        intermediate_size=2112,
        moe_intermediate_size=704,
        num_hidden_layers=30,
        head_dim=256,
        vocab_size=262_144,
        num_experts=128,
    ),
}


# ---------------------------------------------------------------------------
# Building the model.


def random_model(config: dict, seed: int) -> Model:
    mx.random.seed(seed)
    args = ModelArgs.from_dict(config)
    args.vision = None  # the benchmark is text only (and its random prompts may hold the image token)
    model = Model(args)
    mx.eval(model.parameters())
    model.eval()
    return model


def quantize(model: Model, bits: int, group_size: Optional[int], recipe: Optional[str]) -> str:
    """Quantize with one of the converter's recipes; a one-line description for the report."""
    recipe = recipe or DEFAULT_RECIPE
    requested = quantization_settings(q_bits=bits, q_group_size=group_size)

    def by_recipe(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return module_quantization(recipe, path, module.weight.shape[-1], requested) or False

    nn.quantize(model, class_predicate=by_recipe)
    mx.eval(model.parameters())
    return f"{bits}-bit (group {requested['group_size']}), recipe {recipe!r} from mlx_diffgemma.convert"


def write_hf_checkpoint(config: dict, path: Path, seed: int):
    """The preset's random weights as a Hugging Face checkpoint, written by transformers (float32)."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    hf_config = DiffusionGemmaConfig(
        text_config=copy.deepcopy(config["text_config"]),
        vision_config=copy.deepcopy(config["vision_config"]),
        canvas_length=config["canvas_length"],
        eos_token_id=config.get("eos_token_id"),
    )
    model = DiffusionGemmaForBlockDiffusion(hf_config).to(torch.float32).eval()
    model.save_pretrained(path)


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> List[List[int]]:
    return mx.random.randint(0, vocab, (batch, length), key=mx.random.key(seed)).tolist()
