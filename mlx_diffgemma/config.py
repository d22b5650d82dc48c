"""DiffusionGemma's text and vision configs, read from a checkpoint's config.json."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A config.json that does not describe a DiffusionGemma text model we can run."""


# The fields without which the model's shapes are unknown. The class defaults in
# transformers' DiffusionGemmaTextConfig describe a different model, so we never
# fall back to them for shapes.
_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "sliding_window",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)

DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    },
}


_VISION_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim")


@dataclass
class VisionArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    rope_theta: float = 100.0
    standardize: bool = False
    use_clipped_linears: bool = False

    @classmethod
    def from_dict(cls, vision: Dict[str, Any], source: str = "config.json") -> "VisionArgs":
        missing = [k for k in _VISION_REQUIRED if vision.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: vision_config is missing {', '.join(missing)}")
        if vision.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(
                f"{source}: vision_config.hidden_activation {vision['hidden_activation']!r} is not supported"
            )
        if vision["head_dim"] % 4:
            # Two axes, each rotated in halves.
            raise ConfigError(f"{source}: vision_config.head_dim {vision['head_dim']} is not a multiple of 4")
        rope = vision.get("rope_parameters") or {}
        return cls(
            hidden_size=vision["hidden_size"],
            intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"],
            num_key_value_heads=vision.get("num_key_value_heads") or vision["num_attention_heads"],
            head_dim=vision["head_dim"],
            rms_norm_eps=vision.get("rms_norm_eps", 1e-6),
            patch_size=vision.get("patch_size", 16),
            pooling_kernel_size=vision.get("pooling_kernel_size", 3),
            position_embedding_size=vision.get("position_embedding_size", 10 * 1024),
            rope_theta=rope.get("rope_theta", 100.0),
            standardize=bool(vision.get("standardize", False)),
            use_clipped_linears=bool(vision.get("use_clipped_linears", False)),
        )


# The ids that mark an image, when config.json does not name them: those of
# transformers' DiffusionGemmaConfig, the released model's.
IMAGE_TOKEN_DEFAULTS = {"image_token_id": 258_880, "boi_token_id": 255_999, "eoi_token_id": 258_882}


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    sliding_window: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    layer_types: List[str]
    # Full-attention layers may use other head dims / KV head counts; filled
    # from either `global_head_dim` / `num_global_key_value_heads` or
    # `per_layer_config`.
    layer_head_dims: List[int]
    layer_kv_heads: List[int]
    rope_parameters: Dict[str, Dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ROPE))
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: Optional[float] = 30.0
    max_position_embeddings: int = 262_144
    canvas_length: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: List[int] = field(default_factory=lambda: [1])
    model_type: str = "diffusion_gemma"
    # Image input: the vision tower's shapes (None: a text-only model) and the
    # ids that mark an image in a prompt (begin, one per soft token, end).
    vision: Optional[VisionArgs] = None
    image_token_id: Optional[int] = None
    boi_token_id: Optional[int] = None
    eoi_token_id: Optional[int] = None
    # "vision": a prompt's image tokens see each other both ways while encoding.
    bidirectional_images: bool = False

    @classmethod
    def from_dict(cls, config: Dict[str, Any], source: str = "config.json"):
        model_type = config.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'diffusion_gemma' "
                "(this package runs DiffusionGemma checkpoints only)"
            )
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing 'text_config'")
        missing = [k for k in _REQUIRED if text.get(k) is None]
        if missing:
            raise ConfigError(f"{source}: text_config is missing {', '.join(missing)}")
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{source}: use_bidirectional_attention='all' (a non-causal encoder) is not supported")
        if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(
                f"{source}: hidden_activation {text['hidden_activation']!r} is not "
                "supported (expected 'gelu_pytorch_tanh')"
            )

        n = text["num_hidden_layers"]
        layer_types = text.get("layer_types") or [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)
        ]
        if len(layer_types) != n:
            raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries for {n} layers")
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ConfigError(f"{source}: unknown layer types {sorted(unknown)}")
        # transformers forces the last layer to full attention; so do we.
        layer_types = list(layer_types[:-1]) + ["full_attention"]

        head_dims = [text["head_dim"]] * n
        kv_heads = [text["num_key_value_heads"]] * n
        per_layer = text.get("per_layer_config")
        if per_layer:
            for idx, override in per_layer.items():
                i = int(idx)
                if not 0 <= i < n:
                    raise ConfigError(f"{source}: per_layer_config names layer {idx} of {n}")
                head_dims[i] = override.get("head_dim", head_dims[i])
                kv_heads[i] = override.get("num_key_value_heads", kv_heads[i])
        else:
            global_head_dim = text.get("global_head_dim", 512)
            global_kv = text.get("num_global_key_value_heads")
            for i, t in enumerate(layer_types):
                if t == "full_attention":
                    head_dims[i] = global_head_dim
                    if global_kv is not None:
                        kv_heads[i] = global_kv

        for i, kv in enumerate(kv_heads):
            if text["num_attention_heads"] % kv:
                raise ConfigError(
                    f"{source}: layer {i} has {kv} KV heads, which does not divide "
                    f"{text['num_attention_heads']} attention heads"
                )

        rope = text.get("rope_parameters") or DEFAULT_ROPE
        for t in set(layer_types):
            if t not in rope:
                raise ConfigError(f"{source}: rope_parameters has no entry for {t}")

        # A null id counts as absent: the top level's, else the text config's, else Gemma's <eos>.
        try:
            eos = token_ids(config.get("eos_token_id")) or token_ids(text.get("eos_token_id")) or [1]
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: eos_token_id must be a token id or a list of them") from None
        vision = None
        if isinstance(config.get("vision_config"), dict):
            vision = VisionArgs.from_dict(config["vision_config"], source)
        image_ids = {}
        for key, default in IMAGE_TOKEN_DEFAULTS.items():
            # Absent: transformers' class defaults (the released ids); null: none.
            value = config.get(key, default)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{source}: {key} must be a token id (got {value!r})")
            image_ids[key] = value
        if vision is not None and image_ids["image_token_id"] is None:
            raise ConfigError(f"{source}: a vision_config needs an image_token_id")
        return cls(
            hidden_size=text["hidden_size"],
            num_hidden_layers=n,
            intermediate_size=text["intermediate_size"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"],
            head_dim=text["head_dim"],
            vocab_size=text["vocab_size"],
            sliding_window=text["sliding_window"],
            num_experts=text["num_experts"],
            top_k_experts=text["top_k_experts"],
            moe_intermediate_size=text["moe_intermediate_size"],
            layer_types=layer_types,
            layer_head_dims=head_dims,
            layer_kv_heads=kv_heads,
            rope_parameters=rope,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
            max_position_embeddings=text.get("max_position_embeddings", 262_144),
            canvas_length=config.get("canvas_length") or 256,
            pad_token_id=text.get("pad_token_id", 0) or 0,
            bos_token_id=text.get("bos_token_id", 2),
            eos_token_id=eos,
            vision=vision,
            bidirectional_images=text.get("use_bidirectional_attention") == "vision",
            **image_ids,
        )


def token_ids(value: Any) -> List[int]:
    """An ``eos_token_id``-style field as a list of ids: null gives [], one id [it]."""
    if value is None:
        return []
    if isinstance(value, str):  # iterable, but never a list of ids
        raise ValueError(f"token ids must be integers, not {value!r}")
    values = [value] if isinstance(value, int) else list(value)
    return [int(v) for v in values if v is not None]


def eos_token_ids(generation_config: Dict[str, Any], args: ModelArgs) -> List[int]:
    """The ids that end generation: generation_config.json's when it names any, else config.json's.

    The one place this rule lives: the sampler, the tokenizer's stop set and the
    training objective all read it here, so a null id means the same everywhere.
    """
    return token_ids(generation_config.get("eos_token_id")) or list(args.eos_token_id)


def pad_token_id(generation_config: Dict[str, Any], args: ModelArgs) -> int:
    """The id written after EOS: generation_config.json's unless null, else config.json's."""
    pad = generation_config.get("pad_token_id")
    return args.pad_token_id if pad is None else int(pad)
