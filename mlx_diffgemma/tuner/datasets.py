"""Training data: mlx-lm's jsonl formats, read into (prompt, completion) token pairs.

A data directory holds ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl``; each
line is one JSON object in one of mlx-lm's formats:

- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (optionally ``"tools"``):
  the last message is the assistant's answer, everything before it the prompt,
  rendered through the checkpoint's chat template;
- ``{"prompt": ..., "completion": ...}``: a user turn and the answer, also
  through the chat template;
- ``{"text": ...}``: plain text, all of it completion after a ``<bos>``.

Block diffusion always needs the split: the completion is what gets cut into
canvases. Every problem is reported as ``file:line: what``.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..chat_template import render

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A data file or line that cannot be trained on; the message names it."""


@dataclass
class Example:
    prompt: List[int]
    completion: List[int]
    source: str  # "file:line", for messages about this example


def _ids(encoded) -> List[int]:
    # transformers may hand back a BatchEncoding instead of a list.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _render(tokenizer, messages, tools, add_generation_prompt: bool) -> List[int]:
    return render(tokenizer, messages, add_generation_prompt, tools=tools)


def _chat_example(tokenizer, messages: list, tools, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: message {i} must be an object with a 'role' string")
        if not isinstance(m.get("content", ""), str) and "tool_calls" not in m:
            raise DataError(f"{where}: message {i} has a non-string 'content'")
    last = messages[-1]
    if last["role"] not in ("assistant", "model"):
        raise DataError(f"{where}: the last message must be the assistant's answer (got role {last['role']!r})")
    if len(messages) < 2:
        raise DataError(f"{where}: 'messages' needs a prompt before the assistant's answer")
    try:
        prompt = _render(tokenizer, messages[:-1], tools, True)
        full = _render(tokenizer, messages, tools, False)
    except Exception as e:  # jinja errors: the template rejected the conversation
        raise DataError(f"{where}: the chat template cannot render it ({str(e).splitlines()[0]})") from None
    if full[: len(prompt)] == prompt:
        completion = full[len(prompt) :]
    else:
        # Templates that render a finished answer differently from a
        # generation prompt (Gemma 4 drops the empty thought channel of past
        # turns): the answer is the content itself, closed by end of turn.
        completion = _ids(tokenizer.encode(last.get("content") or "", add_special_tokens=False))
        completion.append(tokenizer.convert_tokens_to_ids("<turn|>"))
    return Example(prompt, completion, where)


def _example(tokenizer, record, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _chat_example(tokenizer, record["messages"], record.get("tools"), where)
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                problem = "missing" if key not in record else "not a string"
                raise DataError(f"{where}: field {key!r} is {problem}")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        return _chat_example(tokenizer, messages, None, where)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: field 'text' is not a string")
        text = _ids(tokenizer.encode(record["text"], add_special_tokens=False))
        return Example([tokenizer.bos_token_id], text, where)
    raise DataError(f"{where}: no 'messages', 'prompt'/'completion' or 'text' field")


def read_jsonl(path: Path, tokenizer) -> List[Example]:
    """Every example of one jsonl file, or DataError naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        examples.append(_example(tokenizer, record, where))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def load_dataset(data: str, tokenizer, splits=SPLITS, required=()) -> Dict[str, Optional[List[Example]]]:
    """The splits found in directory ``data``; those in ``required`` must exist."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"{data}: no such data directory (expected train.jsonl, valid.jsonl, test.jsonl in it)")
    out = {}
    for split in splits:
        path = root / f"{split}.jsonl"
        if path.exists():
            out[split] = read_jsonl(path, tokenizer)
        elif split in required:
            raise DataError(f"{path}: missing (needed for {'--test' if split == 'test' else '--train'})")
        else:
            out[split] = None
    return out
