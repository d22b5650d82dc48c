"""Quantization recipes: which pieces of the model the converter quantizes,
and how (the requested settings, 8 bits, or none).
"""

from typing import Dict, Optional, Union

from .staging import ConvertError
from .utils import (
    MODES,
)

# The model's quantizable pieces. The embedding is also the LM head and the
# self-conditioning table; the router picks experts (a discrete choice that
# small weight errors can flip). The vision tower (and its projection) is one
# piece: 3% of the weights, read once per image.
PIECES = ("experts", "router", "embedding", "attention", "mlp", "self_conditioning", "vision")

# What each recipe does with each piece: "requested" takes the --q-* settings,
# "high" takes HIGH_PRECISION, None keeps the piece in --dtype. docs/convert.md
# has the measurements behind the default.
RECIPES = {
    "mixed": dict(
        experts="requested",
        router=None,
        embedding="high",
        attention="high",
        mlp="high",
        self_conditioning="high",
        vision=None,
    ),
    "uniform": dict.fromkeys(PIECES, "requested"),
    "experts-only": dict(dict.fromkeys(PIECES, None), experts="requested"),
}
DEFAULT_RECIPE = "mixed"
HIGH_PRECISION = {"group_size": 64, "bits": 8, "mode": "affine"}


def piece(path: str) -> str:
    """Which piece of the model a quantizable module belongs to."""
    if path.startswith(("vision_tower.", "embed_vision.")):
        return "vision"
    if ".experts." in path:
        return "experts"
    if path.endswith(".router.proj"):
        return "router"
    if path == "embed_tokens":
        return "embedding"
    if ".self_attn." in path:
        return "attention"
    if path.startswith("self_conditioning."):
        return "self_conditioning"
    if ".mlp." in path:
        return "mlp"
    raise ValueError(f"no recipe rule for module {path}")


def quantization_settings(
    q_bits: Optional[int] = None, q_group_size: Optional[int] = None, q_mode: Optional[str] = None
) -> dict:
    """The requested group_size, bits and mode, with the mode's defaults filled in."""
    mode = q_mode or "affine"
    if mode not in MODES:
        raise ConvertError(f"unknown quantization mode {mode!r} (choose from {', '.join(MODES)})")
    rules = MODES[mode]
    bits = rules["default_bits"] if q_bits is None else q_bits
    group_size = rules["default_group_size"] if q_group_size is None else q_group_size
    if bits not in rules["bits"]:
        allowed = ", ".join(map(str, rules["bits"]))
        raise ConvertError(f"{mode} quantization takes {allowed} bits, not {bits}")
    if group_size not in rules["group_sizes"]:
        allowed = ", ".join(map(str, rules["group_sizes"]))
        raise ConvertError(f"{mode} quantization takes group size {allowed}, not {group_size}")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def module_quantization(
    recipe: Union[str, Dict[str, Optional[str]]], path: str, in_dims: int, requested: dict
) -> Optional[dict]:
    """How ``recipe`` quantizes the module at ``path`` (None: kept in float).

    ``recipe`` is a name from RECIPES or a table like theirs. A group size
    that does not divide the module's input width is lowered for affine
    modes (at 128 the real experts' down_proj, 704 wide, takes 64); where no
    allowed size divides it, the module stays in float.
    """
    table = RECIPES[recipe] if isinstance(recipe, str) else recipe
    choice = table[piece(path)]
    if choice is None:
        return None
    params = dict(requested if choice == "requested" else HIGH_PRECISION)
    sizes = [g for g in MODES[params["mode"]]["group_sizes"] if g <= params["group_size"]]
    for group_size in sorted(sizes, reverse=True):
        if in_dims % group_size == 0:
            return dict(params, group_size=group_size)
    return None
