"""Generated text into OpenAI's answer fields, piece by piece as canvases commit.

``StopStrings`` cuts the text at the first of the request's stop strings,
holding back a tail that may be the start of one. ``ChatOutput`` splits Gemma
4's output: the thought channel (``<|channel>thought\\n...<channel|>``) goes to
``reasoning_content``, tool calls (``<|tool_call>call:NAME{...}<tool_call|>``,
parsed by mlx-lm's Gemma 4 parser) to ``tool_calls``, the rest to ``content``.
Streaming and non-streaming answers are built by the same objects, so they say
the same thing.
"""

import json
import re
from typing import Any, Dict, List

from mlx_lm.tool_parsers import gemma4

from ..thinking import CHANNEL_END, CHANNEL_START
from .protocol import tool_call_id

TOOL_START, TOOL_END = gemma4.tool_call_start, gemma4.tool_call_end
_MARKERS = re.compile("(" + "|".join(re.escape(m) for m in (CHANNEL_START, CHANNEL_END, TOOL_START, TOOL_END)) + ")")
THOUGHT_NAME = "thought"  # the channel's name, written right after <|channel>


class StopStrings:
    """Text up to the first stop string; ``stopped`` once one is seen (``word``)."""

    def __init__(self, stops: List[str]):
        self.stops = stops
        self.held = ""
        self.stopped = False
        self.word = ""

    def feed(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        text = self.held + text
        self.held = ""
        found = [(i, s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            at, self.word = min(found)
            return text[:at]
        if final:
            return text
        # Hold back the longest tail that a stop string starts with.
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if keep:
            self.held = text[-keep:]
            return text[:-keep]
        return text


class _Field:
    """One text field of the answer: surrounding whitespace dropped, even when streamed."""

    def __init__(self):
        self.started = False
        self.held = ""  # trailing whitespace, sent only if more text follows

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        kept = text.rstrip()
        if not kept:
            self.held += text
            return ""
        out, self.held = self.held + kept, text[len(kept) :]
        return out


class ChatOutput:
    """Gemma 4's generated text as OpenAI message deltas."""

    def __init__(self):
        self.mode = "content"  # or "thought", "tool"
        self.name_pending = False
        self.tool_text = ""
        self.tool_calls: List[Dict[str, Any]] = []
        self.fields = {"content": _Field(), "reasoning_content": _Field()}

    def feed(self, text: str) -> Dict[str, Any]:
        """The delta for ``text``: any of ``content``, ``reasoning_content``, ``tool_calls``."""
        delta: Dict[str, Any] = {}
        for k, piece in enumerate(_MARKERS.split(text)):
            if k % 2:
                self._marker(piece, delta)
            elif piece:
                self._text(piece, delta)
        return delta

    def finish(self) -> Dict[str, Any]:
        """What is left once the text ends (an unclosed tool call is text)."""
        delta: Dict[str, Any] = {}
        if self.mode == "tool":
            self._add("content", TOOL_START + self.tool_text, delta)
            self.mode, self.tool_text = "content", ""
        return delta

    def _add(self, name: str, text: str, delta: Dict[str, Any]):
        out = self.fields[name].add(text)
        if out:
            delta[name] = delta.get(name, "") + out

    def _text(self, text: str, delta: Dict[str, Any]):
        if self.mode == "tool":
            self.tool_text += text
            return
        if self.mode == "thought":
            if self.name_pending:
                self.name_pending = False
                if text.startswith(THOUGHT_NAME):
                    text = text[len(THOUGHT_NAME) :]
            self._add("reasoning_content", text, delta)
            return
        self._add("content", text, delta)

    def _marker(self, marker: str, delta: Dict[str, Any]):
        if marker == CHANNEL_START and self.mode == "content":
            self.mode, self.name_pending = "thought", True
            reasoning = self.fields["reasoning_content"]
            if reasoning.started:
                reasoning.held = "\n"  # a second thought starts a new line
        elif marker == CHANNEL_END and self.mode == "thought":
            self.mode = "content"
        elif marker == TOOL_START and self.mode != "tool":
            self.mode, self.tool_text = "tool", ""
        elif marker == TOOL_END and self.mode == "tool":
            self.mode = "content"
            calls = parse_tool_calls(self.tool_text)
            if calls is None:
                self._add("content", TOOL_START + self.tool_text + TOOL_END, delta)
            else:
                start = len(self.tool_calls)
                self.tool_calls += calls
                delta.setdefault("tool_calls", []).extend(dict(call, index=start + i) for i, call in enumerate(calls))
        elif self.mode == "tool":
            self.tool_text += marker
        # A stray marker elsewhere (a channel end outside a thought) is dropped.


def parse_tool_calls(text: str):
    """OpenAI ``tool_calls`` from the text between Gemma 4's tool-call markers,
    or None if it is not a call."""
    try:
        parsed = gemma4.parse_tool_call(text)
    except (ValueError, json.JSONDecodeError):
        return None
    calls = parsed if isinstance(parsed, list) else [parsed]
    return [
        {
            "id": tool_call_id(),
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        for c in calls
    ]
