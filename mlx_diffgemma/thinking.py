"""Gemma 4's thought channel in generated text: ``<|channel>thought\n...<channel|>``.

One streaming reader, ``ThoughtParser``, says which part of the text is
thought and which is answer, however the text arrives in pieces; everything
that shows or returns thoughts is built on it: ``split_thinking`` for finished
text (``chat()``, the chat command's history), ``ThoughtFormatter`` for the
chat command's view, and the server's ``ChatOutput`` (``reasoning_content``).
"""

import copy
from typing import List, Optional, Tuple

CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
END_OF_TURN = "<turn|>"
END_MARKERS = (END_OF_TURN, "<eos>")
THOUGHT_NAME = "thought"  # the channel's name, written right after <|channel>
_MARKERS = (CHANNEL_START, CHANNEL_END) + END_MARKERS

Piece = Tuple[str, str]  # (kind, text): kind "thought", "answer", "open" or "close"


def partial_marker(text: str, markers) -> int:
    """Length of the longest tail of ``text`` that starts one of ``markers``
    (text to hold back until the next piece says whether it is one)."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


class _Field:
    """One field of the output with its surrounding whitespace dropped, even
    when it arrives in pieces: trailing whitespace waits until more text follows."""

    def __init__(self):
        self.started = False
        self.held = ""

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


class ThoughtParser:
    """Generated text, fed piece by piece, as ``(kind, text)`` pieces.

    - ``("open", "")`` and ``("close", "")`` mark where a thought starts and ends;
    - ``("thought", text)`` is a thought's text, the channel name dropped and
      each thought stripped of surrounding whitespace;
    - ``("answer", text)`` is the answer, stripped of surrounding whitespace
      as a whole (the whitespace around a thought within it is kept).

    The text ends at the first end-of-turn marker (`<turn|>` or `<eos>`); a
    channel marker where it means nothing (an end outside a thought, a start
    inside one) is dropped. A tail that may be the start of a marker, or of the
    channel's name, waits for the next piece; ``finish`` releases it.
    ``in_thought=True`` reads text generated after a prompt that opened the channel.
    """

    def __init__(self, in_thought: bool = False):
        self.in_thought = in_thought
        self.opened = in_thought  # any thought so far
        self.name_pending = False  # a thought just opened: its name may follow
        self.ended = False
        self.pending = ""  # text held back: a possible marker or name
        self.answer = _Field()
        self.thought = _Field()

    def feed(self, text: str) -> List[Piece]:
        pieces: List[Piece] = []
        text = self.pending + text
        self.pending = ""
        while text and not self.ended:
            if self.name_pending:
                if len(text) <= len(THOUGHT_NAME) and THOUGHT_NAME.startswith(text):
                    self.pending = text  # "thou": the name, or thought text?
                    break
                rest = text[len(THOUGHT_NAME) :] if text.startswith(THOUGHT_NAME) else None
                if rest is not None and partial_marker(rest, _MARKERS) == len(rest):
                    self.pending = text  # "thought<chan": the name before a marker, or not?
                    break
                self.name_pending = False
                # The name ends at whitespace or a marker ("<|channel>thought<channel|>" is empty).
                if rest is not None and (rest[0].isspace() or rest.startswith(_MARKERS)):
                    text = rest
                continue
            at, marker = min(((text.find(m), m) for m in _MARKERS if m in text), default=(-1, ""))
            body = text if at < 0 else text[:at]
            if at < 0:
                keep = partial_marker(body, _MARKERS)
                if keep:
                    body, self.pending = body[:-keep], body[-keep:]
            self._text(body, pieces)
            if at < 0:
                break
            self._marker(marker, pieces)
            text = text[at + len(marker) :]
        return pieces

    def finish(self) -> List[Piece]:
        """What was held back, once the text has ended."""
        pieces: List[Piece] = []
        text, self.pending = self.pending, ""
        if self.name_pending:
            self.name_pending = False
            if text == THOUGHT_NAME:
                text = ""
        self._text(text, pieces)
        return pieces

    def _text(self, text: str, pieces: List[Piece]):
        kind, field = ("thought", self.thought) if self.in_thought else ("answer", self.answer)
        out = field.add(text)
        if out:
            pieces.append((kind, out))

    def _marker(self, marker: str, pieces: List[Piece]):
        if marker in END_MARKERS:
            self.ended = True
        elif marker == CHANNEL_START and not self.in_thought:
            self.in_thought = self.opened = self.name_pending = True
            self.thought = _Field()
            pieces.append(("open", ""))
        elif marker == CHANNEL_END and self.in_thought:
            self.in_thought = self.name_pending = False
            pieces.append(("close", ""))


def split_thinking(text: str) -> Tuple[Optional[str], str]:
    """Split generated text into (thought, answer).

    - ``"<|channel>thought\\n...<channel|>answer"`` -> ``("...", "answer")``;
      several thought blocks (e.g. around tool calls) are joined with a newline and
      removed from the answer;
    - an empty channel gives ``("", answer)``;
    - an unclosed channel (still thinking) makes everything after it thought;
    - a closing `<channel|>` with no opening one before it (text generated after
      a prompt that already opened the channel) makes everything before it thought;
    - no channel at all gives ``(None, text)``.
    The answer is cut at the first end-of-turn marker (`<turn|>` or `<eos>`) and
    stripped of surrounding whitespace; so is each thought.
    """
    start, end = text.find(CHANNEL_START), text.find(CHANNEL_END)
    parser = ThoughtParser(in_thought=end >= 0 and (start < 0 or end < start))
    thoughts: List[str] = [""] if parser.in_thought else []
    answer = ""
    for kind, piece in parser.feed(text) + parser.finish():
        if kind == "open":
            thoughts.append("")
        elif kind == "thought":
            thoughts[-1] += piece
        elif kind == "answer":
            answer += piece
    if not parser.opened:
        return None, answer
    return "\n".join(t for t in thoughts if t), answer


class ThoughtFormatter:
    """Generated text as display pieces: each thought labelled, apart from the
    answer, and the channel markers hidden.

    Fed the text as it is committed; returns ``(kind, text)`` pieces, kind
    "thought" or "answer"; ``finish`` returns what was held back at the end.
    """

    LABEL = "Thought:\n"

    def __init__(self):
        self.parser = ThoughtParser()
        self.answer_start = True  # no answer shown since the start or the last thought

    def feed(self, text: str) -> List[Piece]:
        return self._show(self.parser.feed(text))

    def finish(self) -> List[Piece]:
        return self._show(self.parser.finish())

    def _show(self, pieces: List[Piece]) -> List[Piece]:
        shown = []
        for kind, text in pieces:
            if kind == "open":
                # A thought after answer text (around a tool call) starts a line.
                shown.append(("thought", self.LABEL if self.answer_start else "\n" + self.LABEL))
            elif kind == "close":
                shown.append(("thought", "\n\n"))
                self.answer_start = True
            elif kind == "answer":
                if self.answer_start:
                    text = text.lstrip()
                    self.answer_start = not text
                if text:
                    shown.append(("answer", text))
            else:
                shown.append((kind, text))
        return shown

    def preview(self, text: str) -> str:
        """How ``text`` would show if it came next and the text ended there,
        without changing the state."""
        ahead = copy.deepcopy(self)
        return "".join(piece for _, piece in ahead.feed(text) + ahead.finish())
