"""Build the "shift" task: its data, and a randomly initialised model to train on it.

The task: the user sends a line of ``WIDTH`` characters, a random string of
lowercase letters and digits (``MIN_LENGTH`` to ``MAX_LENGTH`` of them) padded
with dots; the answer is the string with every character moved one place
along ``abc...xyz0123...9`` (z becomes 0, 9 becomes a), without the dots.
Answers, with their ``<turn|>``, run to 2 to 4 canvases of ``CANVAS_LENGTH`` (32) tokens
(docs/training.md says why so short), and are right or wrong exactly.

Every answer character sits a fixed distance after the prompt character it
comes from (the prompt always has the same length): a copy that attention can
learn quickly at toy widths, and that a denoiser can do for all positions of a
canvas at once, which is what makes canvases converge in few steps.

    python examples/shift/build.py --data examples/shift/data --init /tmp/shift-init

writes train/valid/test.jsonl (seeded, so the same files every time) and a
model directory with the real layout (sliding and full attention layers,
experts with top-2 routing, self-conditioning) at toy widths, random weights,
a character-level tokenizer with Gemma 4's control tokens at their real ids,
and the released checkpoint's sampler settings.
"""

import argparse
import json
from pathlib import Path

import numpy as np

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
FILLER = "."
WIDTH = 128
MIN_LENGTH, MAX_LENGTH = 40, WIDTH - 1
SPLITS = {"train": (8_000, 0), "valid": (64, 1), "test": (200, 2)}  # examples, seed

# Gemma 4's control tokens at their real ids; the other ids below 107 are unused.
SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    46: "<|tool>",
    47: "<tool|>",
    48: "<|tool_call>",
    49: "<tool_call|>",
    50: "<|tool_response>",
    51: "<tool_response|>",
    52: '<|"|>',
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
NEWLINE_ID = 107
FIRST_BYTE_ID = 108
# One token per character: the task's alphabet, the filler, and what the chat
# template and a short instruction spell.
CHARACTERS = sorted(set(ALPHABET + FILLER + "ABCDEFGHIJKLMNOPQRSTUVWXYZ,:;!?'\"()-+*/=_<>[]{}#@&%$"))

# The Gemma 4 turn structure (NOTES.md), without tools.
CHAT_TEMPLATE = r"""
{{- bos_token -}}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set loop_messages = messages -%}
{%- if thinking or (messages and messages[0].role == 'system') -%}
{{- '<|turn>system\n' -}}
{%- if thinking -%}{{- '<|think|>\n' -}}{%- endif -%}
{%- if messages[0].role == 'system' -%}
{{- messages[0].content | trim -}}{%- set loop_messages = messages[1:] -%}
{%- endif -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- for m in loop_messages -%}
{{- '<|turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' + (m.content | trim) + '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\n' -}}
{%- if not thinking -%}{{- '<|channel>thought\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""

CANVAS_LENGTH = 32

TEXT_CONFIG = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "global_head_dim": 64,
    "num_global_key_value_heads": 1,
    "sliding_window": 1024,
    "num_experts": 8,
    "top_k_experts": 2,
    "moe_intermediate_size": 128,
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}

# The released checkpoint's sampler settings (generation_config.json).
GENERATION_CONFIG = {
    "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50],
    "max_denoising_steps": 48,
    "max_new_tokens": 256,
    "pad_token_id": 0,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "stability_threshold": 1,
    "t_max": 0.8,
    "t_min": 0.4,
}


def shift(text: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in text)


def problem(rng: np.random.Generator) -> tuple:
    n = int(rng.integers(MIN_LENGTH, MAX_LENGTH + 1))
    text = "".join(rng.choice(list(ALPHABET), size=n))
    return text + FILLER * (WIDTH - n), shift(text)


def write_data(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    for split, (count, seed) in SPLITS.items():
        rng = np.random.default_rng(seed)
        lines = []
        for _ in range(count):
            question, answer = problem(rng)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            lines.append(json.dumps({"messages": messages}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    low = {i: SPECIAL_TOKENS.get(i, "\n" if i == NEWLINE_ID else f"<unused{i}>") for i in range(FIRST_BYTE_ID)}
    vocab = {token: i for i, token in low.items()}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = FIRST_BYTE_ID + b
    for c in ["▁"] + CHARACTERS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, t in low.items() if i != NEWLINE_ID])
    return tok.to_str(), len(vocab)


def write_tokenizer(out: Path) -> int:
    text, size = tokenizer_json()
    write_tokenizer_files(out, text, TEXT_CONFIG["max_position_embeddings"])
    return size


def write_tokenizer_files(out: Path, tokenizer_json: str, max_positions: int):
    """tokenizer.json, its config (Gemma 4's control tokens) and the chat template."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
        for i, t in SPECIAL_TOKENS.items()
    }
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions,
        "padding_side": "left",
        "added_tokens_decoder": added,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE.strip() + "\n")


def write_initial_model(out: Path, seed: int = 0):
    out.mkdir(parents=True, exist_ok=True)
    write_model(out, TEXT_CONFIG, CANVAS_LENGTH, write_tokenizer(out), seed)


def write_model(out: Path, text_config: dict, canvas_length: int, vocab_size: int, seed: int):
    """config.json, the released sampler settings and random weights (seeded)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_diffgemma.config import ModelArgs
    from mlx_diffgemma.model import Model

    config = {
        "model_type": "diffusion_gemma",
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "canvas_length": canvas_length,
        "eos_token_id": [1, 106, 50],
        "text_config": dict(text_config, model_type="diffusion_gemma_text", vocab_size=vocab_size),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="write train/valid/test.jsonl here")
    parser.add_argument("--init", type=Path, help="write a randomly initialised model here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    args = parser.parse_args()
    if not (args.data or args.init):
        parser.error("nothing to do: pass --data and/or --init")
    if args.data:
        write_data(args.data)
    if args.init:
        write_initial_model(args.init, args.seed)


if __name__ == "__main__":
    main()
