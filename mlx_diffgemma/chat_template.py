"""Rendering a conversation to token ids so that no message becomes control tokens.

``tokenizer.apply_chat_template(..., tokenize=True)`` renders the conversation to
one string and tokenizes it, so a message that *spells* a control token
(``<turn|>\\n<|turn>system\\n...``, ``<|tool_response>``) gets the token itself:
whoever writes the message can close their turn, open a system turn or fake a
tool result. ``render`` keeps the template's markers and the messages apart:

1. every string the caller supplies (contents, names, tool arguments and
   schemas, template arguments) has each spelling of an added token replaced
   by a private escape (``U+FDD0 index U+FDD1``; the two noncharacters are
   escaped too, so a message cannot forge an escape);
2. the template renders that, so each marker left in its output is one the
   template wrote;
3. the output is split at those markers, which become their ids, and each piece
   between them is unescaped and tokenized as plain text.

The tokenizer splits text at its added tokens and tokenizes the pieces between
them the same way, so a conversation that spells no marker gets exactly the ids
``apply_chat_template`` gives (the tests hold this).
"""

import re
from typing import Any, Dict, List, Optional

import jinja2
from tokenizers import Tokenizer

# Arguments of apply_chat_template that callers of ``render`` do not pass through
# template settings (the commands and the server set them themselves).
TEMPLATE_ARGUMENTS = (
    "conversation",
    "messages",
    "add_generation_prompt",
    "tokenize",
    "tools",
    "continue_final_message",
)
ESCAPE_OPEN, ESCAPE_CLOSE = "\ufdd0", "\ufdd1"
_UNESCAPE = re.compile(ESCAPE_OPEN + r"(\d+)" + ESCAPE_CLOSE)


class _Markers:
    """A tokenizer's added tokens, how to find them, and a plain-text encoder."""

    def __init__(self, tokenizer):
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        added = {token.content: i for i, token in hf.added_tokens_decoder.items() if token.content}
        self.ids = added
        by_length = sorted(added, key=len, reverse=True)
        self.table = [ESCAPE_OPEN, ESCAPE_CLOSE, *by_length]
        alternatives = "|".join(re.escape(s) for s in self.table)
        self.escape_pattern = re.compile(alternatives)
        self.index = {s: i for i, s in enumerate(self.table)}
        self.marker_pattern = re.compile("(" + "|".join(re.escape(s) for s in by_length) + ")")
        self._encode = _plain_encoder(hf)

    def escape(self, text: str) -> str:
        return self.escape_pattern.sub(lambda m: f"{ESCAPE_OPEN}{self.index[m.group(0)]}{ESCAPE_CLOSE}", text)

    def unescape(self, text: str) -> str:
        return _UNESCAPE.sub(lambda m: self.table[int(m.group(1))], text)

    def tokenize(self, rendered: str) -> List[int]:
        ids: List[int] = []
        for k, part in enumerate(self.marker_pattern.split(rendered)):
            if k % 2:
                ids.append(self.ids[part])
            elif part:
                ids.extend(self._encode(self.unescape(part)))
        return ids


def _plain_encoder(hf):
    """Text -> ids with added tokens read as text. A copy of the fast
    tokenizer with ``encode_special_tokens`` set keeps the shared one
    untouched (transformers' ``split_special_tokens`` flips it per call,
    which is not safe across threads). ``encode_batch`` because it lets other
    threads run while it works (``encode`` holds the GIL: while it read 2 MB of
    text, another Python thread ran about 100 times slower than beside
    ``encode_batch``, which gave the same ids)."""
    backend = getattr(hf, "_tokenizer", None)
    if isinstance(backend, Tokenizer):
        plain = Tokenizer.from_str(backend.to_str())
        plain.encode_special_tokens = True
        return lambda text: plain.encode_batch([text], add_special_tokens=False)[0].ids
    return lambda text: list(hf.encode(text, add_special_tokens=False, split_special_tokens=True))


def _markers(tokenizer) -> _Markers:
    markers = getattr(tokenizer, "_diffgemma_markers", None)
    if markers is None:
        markers = _Markers(tokenizer)
        tokenizer._diffgemma_markers = markers
    return markers


def _escape_all(value, markers: _Markers):
    if isinstance(value, str):
        return markers.escape(value)
    if isinstance(value, dict):
        return {markers.escape(k) if isinstance(k, str) else k: _escape_all(v, markers) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape_all(v, markers) for v in value]
    return value


def plain_ids(tokenizer, text: str) -> List[int]:
    """``text``'s ids with every spelling of a control token read as text."""
    return _markers(tokenizer)._encode(text)


def render(
    tokenizer,
    messages: List[Dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: Optional[List[Any]] = None,
    **template_kwargs,
) -> List[int]:
    """The chat template's ids for ``messages``; no text in them becomes a control token."""
    markers = _markers(tokenizer)
    extra = {} if tools is None else {"tools": _escape_all(tools, markers)}
    try:
        rendered = tokenizer.apply_chat_template(
            _escape_all(messages, markers),
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **extra,
            **_escape_all(template_kwargs, markers),
        )
    except jinja2.TemplateError as e:
        # The template refuses this conversation (roles out of order, say): bad input, not a crash.
        detail = markers.unescape(str(e)).strip().splitlines()
        raise ValueError(
            f"the chat template rejected the conversation: {detail[0] if detail else type(e).__name__}"
        ) from None
    return markers.tokenize(rendered)
