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

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..chat_template import render

SPLITS = ("train", "valid", "test")
# The roles the chat template renders (tests/tokenizer_fixture.py, the
# released template's shape): system or developer (as the first message),
# user, assistant (or Gemma's own name for it, model) and tool. Any other
# would be rendered as a turn of that name, or dropped, silently.
ROLES = ("system", "developer", "user", "assistant", "model", "tool")
EXPECTED_DIRECTORY = "a directory holding train.jsonl and valid.jsonl (and test.jsonl for --test)"


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
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
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


def _lines(path: Path):
    """(number, text) of each line, split at newlines only, as a text editor
    numbers them (str.splitlines would also split at U+2028 and friends,
    which JSON strings may hold); each line decoded on its own, so a byte
    that is not UTF-8 is reported with its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.removesuffix(b"\r")
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows write one
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}: {e.reason})"
            ) from None


def read_jsonl(path: Path, tokenizer) -> List[Example]:
    """Every example of one jsonl file, or DataError naming the file and line."""
    examples = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        examples.append(_example(tokenizer, record, where))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or blank)")
    return examples


def check_data_directory(data: str, flag: str = "--data") -> Path:
    """``data`` as a directory of splits, or DataError saying what is expected."""
    root = Path(data).expanduser()
    if root.is_dir():
        return root
    if root.exists():
        raise DataError(f"{flag} {data}: a file, not a directory; expected {EXPECTED_DIRECTORY}")
    # mlx_lm.lora downloads a Hugging Face dataset by that name; we read local files only.
    raise DataError(
        f"{flag} {data}: no such directory; expected {EXPECTED_DIRECTORY}; "
        "Hugging Face dataset names are not downloaded"
    )


def load_dataset(data: str, tokenizer, splits=SPLITS, required=()) -> Dict[str, Optional[List[Example]]]:
    """The splits found in directory ``data``; those in ``required`` must exist."""
    root = check_data_directory(data)
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
