"""Gemma 4's thought channel in generated text: ``<|channel>thought\n...<channel|>``.

``split_thinking`` splits finished text into thought and answer;
``ThoughtFormatter`` does the same for text arriving piece by piece (a stream),
for views that show the thought apart from the answer.
"""

from typing import List, Optional, Tuple

CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
END_OF_TURN = "<turn|>"
_END_MARKERS = (END_OF_TURN, "<eos>")


def split_thinking(text: str) -> Tuple[Optional[str], str]:
    """Split generated text into (thought, answer).

    - ``"<|channel>thought\\n...<channel|>answer"`` -> ``("...", "answer")``;
      several thought blocks (e.g. around tool calls) are joined with a newline and
      removed from the answer;
    - an empty channel gives ``("", answer)``;
    - an unclosed channel (still thinking) makes everything after it thought;
    - a closing `<channel|>` with no opening one (text generated after a prompt that
      already opened the channel) makes everything before it thought;
    - no channel at all gives ``(None, text)``.
    The answer is cut at the first end-of-turn marker (`<turn|>` or `<eos>`) and
    stripped of surrounding whitespace; so is each thought.
    """
    for marker in _END_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]

    thoughts: List[str] = []
    answer_parts: List[str] = []
    rest = text
    first = True
    while True:
        start = rest.find(CHANNEL_START)
        end = rest.find(CHANNEL_END)
        if first and end >= 0 and (start < 0 or end < start):
            # The prompt opened the channel; we only see its end.
            thoughts.append(_thought_body(rest[:end]))
            rest = rest[end + len(CHANNEL_END) :]
            first = False
            continue
        first = False
        if start < 0:
            answer_parts.append(rest)
            break
        answer_parts.append(rest[:start])
        rest = rest[start + len(CHANNEL_START) :]
        end = rest.find(CHANNEL_END)
        if end < 0:
            thoughts.append(_thought_body(rest))
            break
        thoughts.append(_thought_body(rest[:end]))
        rest = rest[end + len(CHANNEL_END) :]

    answer = "".join(answer_parts).replace(CHANNEL_END, "").strip()
    if not thoughts:
        return None, answer
    return "\n".join(t for t in thoughts if t), answer


def _thought_body(body: str) -> str:
    # Drop the channel's name ("thought"), which the model writes right after `<|channel>`.
    name = "thought"
    if body.startswith(name) and (len(body) == len(name) or body[len(name)].isspace()):
        body = body[len(name) :]
    return body.strip()


class ThoughtFormatter:
    """Generated text as display pieces: the thought channel labelled, apart
    from the answer, and the channel markers hidden.

    Fed the text as it is committed; returns ``(kind, text)`` pieces, kind
    "thought" or "answer".
    """

    LABEL = "Thought:\n"

    def __init__(self):
        self.in_thought = False
        self.name_pending = False  # "thought\n" follows the channel marker
        self.answer_start = True  # whitespace here is not shown
        self.held = ""  # a thought's trailing whitespace, shown if more follows

    def feed(self, text: str):
        pieces = []
        while text:
            if self.in_thought:
                if self.name_pending:
                    self.name_pending = False
                    if text.startswith("thought"):
                        text = text[len("thought") :].lstrip("\n")
                end = text.find(CHANNEL_END)
                body = text if end < 0 else text[:end]
                kept = body.rstrip()
                if kept:
                    pieces.append(("thought", self.held + kept))
                    self.held = body[len(kept) :]
                else:
                    self.held += body
                if end < 0:
                    break
                self.in_thought, self.held, self.answer_start = False, "", True
                pieces.append(("thought", "\n\n"))
                text = text[end + len(CHANNEL_END) :]
            else:
                start = text.find(CHANNEL_START)
                body = text if start < 0 else text[:start]
                if self.answer_start:
                    body = body.lstrip()
                    self.answer_start = not body
                if body:
                    pieces.append(("answer", body))
                if start < 0:
                    break
                # A thought after answer text (around a tool call) starts a line.
                label = self.LABEL if self.answer_start else "\n" + self.LABEL
                self.in_thought, self.name_pending = True, True
                pieces.append(("thought", label))
                text = text[start + len(CHANNEL_START) :]
        return pieces

    def preview(self, text: str) -> str:
        """How ``text`` would show if it came next, without changing the state."""
        copy = ThoughtFormatter()
        copy.__dict__.update(self.__dict__)
        return "".join(piece for _, piece in copy.feed(text))
