"""Tokenizer loading and streaming detokenization.

The tokenizer is mlx-lm's `TokenizerWrapper` built from the checkpoint's own files
(tokenizer.json / tokenizer.model, tokenizer_config.json, chat_template.jinja), offline.

Two deliberate differences from a plain `mlx_lm.tokenizer_utils.load`:

- `apply_chat_template` defaults to ``enable_thinking=False``. mlx-lm defaults the
  thinking switch to ``has_thinking``, which is True for any vocabulary holding
  `<|channel>`/`<channel|>`, so it would turn Gemma 4's thinking on by default; the
  model's documented default is thinking off. Pass ``enable_thinking=True`` to think.
- For Gemma's SPM-style decoder (Replace("▁", " ") + ByteFallback + Fuse) the streaming
  detokenizer is `GemmaStreamingDetokenizer`, which reproduces `tokenizer.decode`
  exactly, also for invalid byte-fallback sequences (mlx-lm's SPMStreamingDetokenizer
  decodes those with Python's "replace", giving fewer U+FFFD than the tokenizers
  library, and turns bytes spelling "▁" into spaces).

Both keep special tokens: like `tokenizer.decode` (``skip_special_tokens=False`` by
default), they map every id to its token text, so `<|tool_call>`, `<|channel>`,
`<turn|>`... stay in the raw output. Tool calls and thoughts are parsed from that text
(thoughts in `thinking`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import jinja2
import jinja2.ext
import jinja2.sandbox
from mlx_lm.tokenizer_utils import (
    SPMStreamingDetokenizer,
    StreamingDetokenizer,
    TokenizerWrapper,
)
from mlx_lm.tokenizer_utils import load as _mlx_lm_load

from .config import token_ids

__all__ = [
    "DiffGemmaTokenizerWrapper",
    "TokenizerError",
    "GemmaStreamingDetokenizer",
    "load_tokenizer",
    "read_eos_token_ids",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# The JSON files a tokenizer is built from; each is read first, so a broken one
# is named instead of surfacing as the tokenizers library's bare parse error.
TOKENIZER_JSON_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "tokenizer.json",
)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


class GemmaStreamingDetokenizer(StreamingDetokenizer):
    """Streaming detokenizer for Gemma's decoder: Replace("▁", " "), ByteFallback, Fuse.

    Emits exactly what `tokenizer.decode(tokens)` gives (with special tokens kept):
    text pieces are appended as soon as they arrive; a run of byte tokens (`<0xNN>`)
    is held until the run ends and then decoded as a whole, or, when that run is not
    valid UTF-8, replaced by one U+FFFD per byte, as the tokenizers library does.
    Ids outside the vocabulary decode to nothing, as in `tokenizer.decode`.
    """

    def __init__(self, tokenizer, trim_space: bool = False):
        super().__init__()
        self.trim_space = trim_space
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        # Per id: an int (a byte token's value), the text of the piece, or None.
        self.tokenmap = [_token_entry(t) for t in tokens]
        self.reset()

    def reset(self):
        self.offset = 0
        self.text = ""
        self.tokens = []
        self._bytes = bytearray()

    def _append(self, piece: str):
        if self.trim_space and not self.text and piece.startswith(" "):
            piece = piece[1:]
        self.text += piece

    def _flush_bytes(self):
        if not self._bytes:
            return
        try:
            piece = self._bytes.decode("utf-8")
        except UnicodeDecodeError:
            piece = "\ufffd" * len(self._bytes)
        self._bytes = bytearray()
        self._append(piece)

    def add_token(self, token):
        self.tokens.append(token)
        v = self.tokenmap[token] if 0 <= token < len(self.tokenmap) else None
        if v is None:
            return  # decode() drops unknown ids without breaking a byte run
        if isinstance(v, int):
            self._bytes.append(v)
            return
        self._flush_bytes()
        self._append(v)

    def finalize(self):
        self._flush_bytes()


def _token_entry(token: Optional[str]) -> Union[int, str, None]:
    if token is None:
        return None
    # The tokenizers ByteFallback decoder's own test for a byte token.
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            pass
    return token.replace("\u2581", " ")


class DiffGemmaTokenizerWrapper(TokenizerWrapper):
    """mlx-lm's TokenizerWrapper with Gemma 4's default of thinking off."""

    def apply_chat_template(self, *args, **kwargs):
        kwargs.setdefault("enable_thinking", False)
        return super().apply_chat_template(*args, **kwargs)


def has_tokenizer_files(model_path: Union[str, Path]) -> bool:
    model_path = Path(model_path)
    return any((model_path / f).is_file() for f in TOKENIZER_FILES)


def read_eos_token_ids(model_path: Union[str, Path]) -> Optional[List[int]]:
    """`eos_token_id` of the checkpoint's generation_config.json (else config.json),
    as a list, or None when neither names one."""
    model_path = Path(model_path)
    for name in ("generation_config.json", "config.json"):
        f = model_path / name
        if not f.is_file():
            continue
        try:
            eos = token_ids(json.loads(f.read_text(encoding="utf-8")).get("eos_token_id"))
        except (json.JSONDecodeError, OSError, AttributeError, TypeError, ValueError):
            continue
        if eos:
            return eos
    return None


def _read_json_files(model_path: Path) -> Dict[str, dict]:
    """The tokenizer's JSON files that exist, parsed, or TokenizerError naming a broken one."""
    parsed = {}
    for name in TOKENIZER_JSON_FILES:
        f = model_path / name
        if not f.is_file():
            continue
        try:
            value = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise TokenizerError(f"{f}: expected a JSON object")
        parsed[name] = value
    return parsed


def _legacy_chat_template(model_path: Path, json_files: Dict[str, dict]) -> Optional[str]:
    """A template only found in a processor-style chat_template.json, which the
    tokenizer does not read by itself."""
    if (model_path / "chat_template.jinja").is_file():
        return None
    if json_files.get("tokenizer_config.json", {}).get("chat_template"):
        return None
    template = json_files.get("chat_template.json", {}).get("chat_template")
    return template if isinstance(template, str) and template else None


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which transformers' template
    environment knows (it marks assistant text); parsed here as its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# Parses as transformers' chat template environment does (its options and extensions).
_TEMPLATE_PARSER = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
)


def _template_sources(model_path: Path, templates, json_files: Dict[str, dict]) -> Dict[str, Path]:
    """The file each named template was read from, by transformers' order of precedence."""
    in_config = bool(json_files.get("tokenizer_config.json", {}).get("chat_template"))
    fallback = model_path / ("tokenizer_config.json" if in_config else "chat_template.json")
    sources = {}
    for name in templates:
        own = model_path / ("chat_template.jinja" if name == "default" else f"additional_chat_templates/{name}.jinja")
        sources[name] = own if own.is_file() else fallback
    return sources


def check_chat_templates(model_path: Path, tokenizer, json_files: Dict[str, dict]) -> None:
    """Compile the checkpoint's chat templates now, so a broken one is named
    (file and line) when the model loads, not as a traceback at the first prompt."""
    templates = getattr(tokenizer, "chat_template", None)
    if not templates:
        return
    if isinstance(templates, str):
        templates = {"default": templates}
    sources = _template_sources(model_path, templates, json_files)
    for name, template in templates.items():
        source = sources[name]
        try:
            _TEMPLATE_PARSER.parse(template)
        except jinja2.TemplateSyntaxError as e:
            where = f"line {e.lineno}" if source.suffix == ".jinja" else f"template {name!r}, line {e.lineno}"
            raise TokenizerError(f"{source}: {where}: not a valid chat template ({e.message})") from None


def load_tokenizer(
    model_path: Union[str, Path], eos_token_ids: Optional[Iterable[int]] = None
) -> Optional[TokenizerWrapper]:
    """Build mlx-lm's TokenizerWrapper from the tokenizer files in `model_path`.

    Returns None when the directory holds neither tokenizer.json nor tokenizer.model.
    `eos_token_ids` default to the checkpoint's generation_config.json (`[1, 106, 50]`
    for the released model); the tokenizer's own `<eos>` is always added by mlx-lm.
    Works offline: only local files are read.
    """
    model_path = Path(model_path)
    if not model_path.is_dir() or not has_tokenizer_files(model_path):
        return None
    eos_token_ids = read_eos_token_ids(model_path) if eos_token_ids is None else token_ids(eos_token_ids)

    json_files = _read_json_files(model_path)
    extra = {"local_files_only": True}
    template = _legacy_chat_template(model_path, json_files)
    if template is not None:
        extra["chat_template"] = template
    try:
        wrapper = _mlx_lm_load(model_path, tokenizer_config_extra=extra, eos_token_ids=eos_token_ids)
    except OSError:
        raise  # an unreadable file: the caller names it
    except Exception as e:  # the tokenizers / sentencepiece libraries' parse errors
        files = ", ".join(f for f in TOKENIZER_FILES if (model_path / f).is_file())
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{model_path / files.split(', ')[0]}: cannot build the tokenizer ({detail})") from None
    check_chat_templates(model_path, wrapper._tokenizer, json_files)

    old = wrapper._detokenizer
    if isinstance(old, SPMStreamingDetokenizer):
        # Gemma's decoder; mlx-lm picked its SPM detokenizer. Use the exact one.
        wrapper._detokenizer = GemmaStreamingDetokenizer(wrapper._tokenizer, trim_space=old.trim_space)
    wrapper.__class__ = DiffGemmaTokenizerWrapper
    return wrapper
