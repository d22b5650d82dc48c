"""A request body's fields, checked one by one: each check returns the
field's value or raises ``APIError`` (a 400) naming the field. Everything a
client sends is untrusted: types, ranges and sizes are checked before any work.
"""

import json
from typing import Any, Dict, List, Optional, Union

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # as OpenAI
MAX_DEPTH = 64  # nesting of a request body; OpenAI's deepest (tool schemas) is far less


class APIError(Exception):
    """An OpenAI-style error: the HTTP status and ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


def check_body(body: Any) -> None:
    """A decoded body holds only text that is Unicode and nesting a server
    walks safely: a 400 naming the field otherwise. JSON's ``\\ud800`` escapes
    decode to lone surrogates, which no tokenizer takes."""
    stack = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad(f"the request body nests more than {MAX_DEPTH} levels deep (at '{where}')")
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if not is_unicode(key):
                    raise bad(f"a key in '{where or 'the body'}' is not valid Unicode (it holds a lone surrogate)")
                stack.append((item, path, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and not is_unicode(value):
            raise bad(f"'{where}' is not valid Unicode text (it holds a lone surrogate)", where or None)


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def type_name(value) -> str:
    return (
        "null"
        if value is None
        else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
            type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
        )
    )


def typed(body: dict, name: str, kind, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad(f"'{name}' must be {what} (got {type_name(value)})", name)
    return value


def positive_int(body: dict, name: str) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer (got {type_name(value)})", name)
    if value < 1:
        raise bad(f"'{name}' must be at least 1 (got {value})", name)
    return value


def content_parts(content, where: str, role: str) -> Optional[Union[str, List[Dict[str, Any]]]]:
    """A message's content: a string, or text parts and (in user messages)
    OpenAI's image parts, ``{"type": "image_url", "image_url": {"url": ...}}``
    (``image_url`` may be the URL itself), returned in that form."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"'{where}.content' must be a string or an array of content parts (got {type_name(content)})", where)
    parts = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise bad(f"'{here}' is an image part; images may only be sent in user messages (not {role})", here)
            parts.append({"type": "image_url", "image_url": {"url": image_url(part, here)}})
        else:
            got = "a text part without a 'text' string" if kind == "text" else kind or type_name(part)
            raise bad(
                f'\'{here}\' must be a text part ({{"type": "text", "text": ...}}) or an image part '
                f'({{"type": "image_url", "image_url": {{"url": ...}}}}; got {got})',
                here,
            )
    return parts


def image_url(part: dict, where: str) -> str:
    """An image part's URL: ``image_url.url`` (OpenAI's), or ``image_url`` as a string."""
    value = part.get("image_url")
    if isinstance(value, dict):
        where, value = where + ".image_url.url", value.get("url")
        if value is None:
            raise bad(f"'{where}' is required (the image's data: URL or URL)", where)
    else:
        where += ".image_url"
        if value is None:
            raise bad(f"'{where}' is required: {{\"url\": ...}} naming the image", where)
    if not isinstance(value, str):
        raise bad(f"'{where}' must be a string (got {type_name(value)})", where)
    if not value.strip():
        raise bad(f"'{where}' is empty", where)
    return value


def tool_calls(calls, where: str) -> List[Dict[str, Any]]:
    """An assistant's tool calls, their JSON-string arguments parsed (the
    template writes them in Gemma's own notation)."""
    if not isinstance(calls, list):
        raise bad(f"'{where}.tool_calls' must be an array", where)
    out = []
    for j, call in enumerate(calls):
        here = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad(f"'{here}' must hold a function with a name", here)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise bad(f"'{here}.function.arguments' is not valid JSON ({e.msg})", here) from None
        if not isinstance(arguments, dict):
            raise bad(f"'{here}.function.arguments' must be a JSON object", here)
        out.append(
            {
                "id": str(call.get("id") or ""),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out


def messages(value) -> List[Dict[str, Any]]:
    if value is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(value, list):
        raise bad(f"'messages' must be an array (got {type_name(value)})", "messages")
    if not value:
        raise bad("'messages' must hold at least one message", "messages")
    messages, names = [], {}
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object (got {type_name(m)})", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)} (got {role!r})", where)
        out = {"role": role, "content": content_parts(m.get("content"), where, role)}
        if role == "assistant" and m.get("tool_calls") is not None:
            out["tool_calls"] = tool_calls(m["tool_calls"], where)
            names.update({c["id"]: c["function"]["name"] for c in out["tool_calls"] if c["id"]})
        elif out["content"] is None:
            raise bad(f"'{where}.content' is required", where)
        if role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id"))
            if name is not None:
                if not isinstance(name, str):
                    raise bad(f"'{where}.name' must be a string", where)
                out["name"] = name
        messages.append(out)
    return messages


def tools(value) -> Optional[List[Dict[str, Any]]]:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise bad("'tools' must be an array of objects", "tools")
    for i, tool in enumerate(value):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad(f"'tools[{i}]' must hold a function with a name", "tools")
    return value


def stops(value) -> List[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or an array of them", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' holds at most {MAX_STOP} strings (got {len(stops)})", "stop")
    return stops


def prompt(value) -> Union[str, List[int]]:
    if value is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise bad("'prompt' is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and not value:
        raise bad("'prompt' is empty", "prompt")
    raise bad("'prompt' must be a string or an array of token ids (one prompt; use 'n' for several)", "prompt")


def n_predict(body: dict, default: int) -> int:
    """llama.cpp's ``n_predict``: -1 the server's limit, 0 nothing (a warm-up), or the most tokens."""
    value = body.get("n_predict")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'n_predict' must be an integer (got {type_name(value)})", "n_predict")
    if value < -1:
        raise bad(
            f"'n_predict' must be -1 (the server's limit), 0 (warm up only) or a number of tokens (got {value})",
            "n_predict",
        )
    return default if value == -1 else value


def infill_prefix(body: dict) -> str:
    """llama.cpp's /infill prefix: the extra context chunks, ``input_prefix``,
    then ``prompt`` (the start of the middle, already typed)."""
    extra = typed(body, "input_extra", list, 'an array of {"filename", "text"} objects', [])
    chunks = []
    for i, chunk in enumerate(extra):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text", ""), str):
            raise bad(f"'input_extra[{i}]' must be an object with a 'text' string", "input_extra")
        name = chunk.get("filename")
        if name is not None and not isinstance(name, str):
            raise bad(f"'input_extra[{i}].filename' must be a string", "input_extra")
        chunks.append((name + "\n" if name else "") + chunk.get("text", ""))
    prefix = typed(body, "input_prefix", str, "a string", "")
    return "".join(chunks) + prefix + typed(body, "prompt", str, "a string", "")
