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
import secrets
from typing import Any, Dict, List, Optional

from mlx_lm.tool_parsers import gemma4

from ..thinking import Piece, ThoughtParser, partial_marker

TOOL_START, TOOL_END = gemma4.tool_call_start, gemma4.tool_call_end


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
        keep = partial_marker(text, self.stops)
        if keep:
            self.held = text[-keep:]
            return text[:-keep]
        return text


class ChatOutput:
    """Gemma 4's generated text as OpenAI message deltas.

    Tool calls are taken out first; the rest is read by the thought channel's
    one parser (``thinking.ThoughtParser``), thoughts to ``reasoning_content``
    (several joined by a newline, as ``split_thinking`` joins them) and the
    answer to ``content``.
    """

    def __init__(self):
        self.thoughts = ThoughtParser()
        self.in_tool = False
        self.pending = ""  # a tail that may start a tool-call marker
        self.tool_text = ""
        self.tool_calls: List[Dict[str, Any]] = []
        self.reasoning_started = False
        self.new_thought = False

    def feed(self, text: str) -> Dict[str, Any]:
        """The delta for ``text``: any of ``content``, ``reasoning_content``, ``tool_calls``."""
        delta: Dict[str, Any] = {}
        text = self.pending + text
        self.pending = ""
        while text and not self.thoughts.ended:
            marker = TOOL_END if self.in_tool else TOOL_START
            at = text.find(marker)
            body = text if at < 0 else text[:at]
            if at < 0:
                keep = partial_marker(body, (marker,))
                if keep:
                    body, self.pending = body[:-keep], body[-keep:]
            if self.in_tool:
                self.tool_text += body
            else:
                self._read(self.thoughts.feed(body), delta)
            if at < 0:
                break
            text = text[at + len(marker) :]
            if self.in_tool:
                self._call(delta)
            else:
                self._read(self.thoughts.finish(), delta)  # a tool call ends any held tail
                self.in_tool, self.tool_text = True, ""
        return delta

    def finish(self) -> Dict[str, Any]:
        """What is left once the text ends (an unclosed tool call is text)."""
        delta: Dict[str, Any] = {}
        text, self.pending = self.pending, ""
        if self.in_tool:
            self.in_tool, text = False, TOOL_START + self.tool_text + text
        self._read(self.thoughts.feed(text) + self.thoughts.finish(), delta)
        return delta

    def _call(self, delta: Dict[str, Any]):
        self.in_tool = False
        calls = parse_tool_calls(self.tool_text)
        if calls is None:  # not a call: it stays text
            self._read(self.thoughts.feed(TOOL_START + self.tool_text + TOOL_END), delta)
            return
        start = len(self.tool_calls)
        self.tool_calls += calls
        delta.setdefault("tool_calls", []).extend(dict(call, index=start + i) for i, call in enumerate(calls))

    def _read(self, pieces: List[Piece], delta: Dict[str, Any]):
        for kind, text in pieces:
            if kind == "open":
                self.new_thought = True
            elif kind == "thought":
                if self.new_thought and self.reasoning_started:
                    text = "\n" + text
                self.new_thought, self.reasoning_started = False, True
                delta["reasoning_content"] = delta.get("reasoning_content", "") + text
            elif kind == "answer":
                delta["content"] = delta.get("content", "") + text


class TextAnswer:
    """One choice of a completion (a batch row), as its text commits."""

    def __init__(self, stops: StopStrings):
        self.stops = stops
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.generation_tokens = 0
        self.tokens_per_forward = 0.0

    def add(self, response) -> Dict[str, Any]:
        """The delta for a committed canvas (``response``: a GenerationResponse);
        sets ``finish_reason`` once the row ends, by itself or at a stop string."""
        self.generation_tokens = response.generation_tokens
        self.tokens_per_forward = response.tokens_per_forward
        final = response.finish_reason is not None
        text = self.stops.feed(response.text, final=final)
        final = final or self.stops.stopped
        delta = self._delta(text, final)
        if final:
            self.finish_reason = self._reason(response.finish_reason)
        return delta

    def _delta(self, text: str, final: bool) -> Dict[str, Any]:
        self.text += text
        return {"text": text} if text else {}

    def _reason(self, reason: str) -> str:
        return "stop" if self.stops.stopped else reason


class ChatAnswer(TextAnswer):
    """One choice of a chat completion: its message so far, and the deltas."""

    def __init__(self, stops: StopStrings):
        super().__init__(stops)
        self.output = ChatOutput()
        self.message: Dict[str, Any] = {}  # the fields so far
        self.started = False  # a stream's first delta carries the role

    def _delta(self, text: str, final: bool) -> Dict[str, Any]:
        delta = self.output.feed(text)
        if final:
            for name, value in self.output.finish().items():
                delta[name] = delta.get(name, "") + value
        for name, value in delta.items():
            if name == "tool_calls":
                self.message.setdefault("tool_calls", []).extend(
                    {k: v for k, v in call.items() if k != "index"} for call in value
                )
            else:
                self.message[name] = self.message.get(name, "") + value
        if not self.started:
            self.started = True
            delta = dict({"role": "assistant", "content": ""}, **delta)
        return delta

    def _reason(self, reason: str) -> str:
        return "tool_calls" if self.output.tool_calls else super()._reason(reason)

    def message_body(self) -> Dict[str, Any]:
        """The choice's ``message`` in a whole (not streamed) answer."""
        message = {"role": "assistant", "content": self.message.get("content", "")}
        if "reasoning_content" in self.message:
            message["reasoning_content"] = self.message["reasoning_content"]
        if self.message.get("tool_calls"):
            message["tool_calls"] = self.message["tool_calls"]
            message["content"] = message["content"] or None
        return message


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


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
