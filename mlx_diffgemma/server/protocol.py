"""OpenAI's request and response bodies: what the server accepts, and its answers.

``parse_request`` checks a decoded JSON body field by field and returns a
``Request``, or raises ``APIError`` naming the field. Everything a client
sends is untrusted: types, ranges and sizes are checked here, before any work.
Fields of OpenAI's API that do not apply to a diffusion sampler (``temperature``,
``top_p``, penalties: docs/server.md lists them) are accepted and ignored, as are
fields neither OpenAI's nor ours, so clients that send extras keep working.
"""

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from ..chat_template import TEMPLATE_ARGUMENTS
from ..infill import check_spans
from ..prompts import check_seed
from ..sampler_params import SAMPLER_SETTINGS, check_setting

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # as OpenAI
MAX_N = 16
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


@dataclass
class Request:
    """A checked request. ``messages`` for chat, ``prompt`` for completions
    and infill (the prefix), ``text`` and ``spans`` for edit."""

    kind: str  # "chat", "completion", "infill" or "edit"
    model: Optional[str]
    max_tokens: int
    messages: Optional[List[Dict[str, Any]]] = None
    prompt: Optional[Union[str, List[int]]] = None
    stream: bool = False
    include_usage: bool = False
    include_drafts: bool = False
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    n: int = 1
    tools: Optional[List[Dict[str, Any]]] = None
    template_kwargs: Dict[str, Any] = field(default_factory=dict)
    sampler: Dict[str, Any] = field(default_factory=dict)
    suffix: Optional[str] = None  # completions' insert mode, and infill
    infill_length: Optional[int] = None  # None: chosen automatically
    text: Optional[str] = None  # edit
    spans: Optional[List[Tuple[int, int]]] = None  # edit
    instruction: Optional[str] = None  # edit
    n_indent: int = 0  # infill: cut the middle at a later line indented less (llama.cpp's rule)
    response_fields: Optional[List[str]] = None  # infill: only these (slash paths), as a flat object

    @property
    def warm_up(self) -> bool:
        """An /infill with ``n_predict: 0``: llama.cpp's plugins send these to
        warm its cache as the editor's context changes; nothing is written."""
        return self.kind == "infill" and self.max_tokens == 0

    @property
    def fills(self) -> bool:
        """Written between known text (infill, edit, completions with a suffix)."""
        return self.kind in ("infill", "edit") or self.suffix is not None


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
                if not _is_unicode(key):
                    raise bad(f"a key in '{where or 'the body'}' is not valid Unicode (it holds a lone surrogate)")
                stack.append((item, path, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and not _is_unicode(value):
            raise bad(f"'{where}' is not valid Unicode text (it holds a lone surrogate)", where or None)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _type_name(value) -> str:
    return (
        "null"
        if value is None
        else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
            type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
        )
    )


def _get(body: dict, name: str, kind, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad(f"'{name}' must be {what} (got {_type_name(value)})", name)
    return value


def _positive_int(body: dict, name: str) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer (got {_type_name(value)})", name)
    if value < 1:
        raise bad(f"'{name}' must be at least 1 (got {value})", name)
    return value


def _text_parts(content, where: str) -> Optional[Union[str, List[Dict[str, str]]]]:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"'{where}.content' must be a string or an array of text parts (got {_type_name(content)})", where)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise bad(f'\'{where}.content[{j}]\' must be a text part ({{"type": "text", "text": ...}}; got {kind})')
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _tool_calls(calls, where: str) -> List[Dict[str, Any]]:
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


def _messages(value) -> List[Dict[str, Any]]:
    if value is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(value, list):
        raise bad(f"'messages' must be an array (got {_type_name(value)})", "messages")
    if not value:
        raise bad("'messages' must hold at least one message", "messages")
    messages, names = [], {}
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object (got {_type_name(m)})", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)} (got {role!r})", where)
        out = {"role": role, "content": _text_parts(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls") is not None:
            out["tool_calls"] = _tool_calls(m["tool_calls"], where)
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


def _tools(value) -> Optional[List[Dict[str, Any]]]:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise bad("'tools' must be an array of objects", "tools")
    for i, tool in enumerate(value):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad(f"'tools[{i}]' must hold a function with a name", "tools")
    return value


def _stop(value) -> List[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or an array of them", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' holds at most {MAX_STOP} strings (got {len(stops)})", "stop")
    return stops


def _prompt(value) -> Union[str, List[int]]:
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


def _n_predict(body: dict, default: int) -> int:
    """llama.cpp's ``n_predict``: -1 the server's limit, 0 nothing (a warm-up), or the most tokens."""
    value = body.get("n_predict")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'n_predict' must be an integer (got {_type_name(value)})", "n_predict")
    if value < -1:
        raise bad(
            f"'n_predict' must be -1 (the server's limit), 0 (warm up only) or a number of tokens (got {value})",
            "n_predict",
        )
    return default if value == -1 else value


def _infill_prefix(body: dict) -> str:
    """llama.cpp's /infill prefix: the extra context chunks, ``input_prefix``,
    then ``prompt`` (the start of the middle, already typed)."""
    extra = _get(body, "input_extra", list, 'an array of {"filename", "text"} objects', [])
    chunks = []
    for i, chunk in enumerate(extra):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text", ""), str):
            raise bad(f"'input_extra[{i}]' must be an object with a 'text' string", "input_extra")
        name = chunk.get("filename")
        if name is not None and not isinstance(name, str):
            raise bad(f"'input_extra[{i}].filename' must be a string", "input_extra")
        chunks.append((name + "\n" if name else "") + chunk.get("text", ""))
    prefix = _get(body, "input_prefix", str, "a string", "")
    return "".join(chunks) + prefix + _get(body, "prompt", str, "a string", "")


def parse_request(kind: str, body: Any, default_max_tokens: int, template_defaults: Dict[str, Any]) -> Request:
    """A checked ``Request`` from a decoded body, or ``APIError`` (400)."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object (got {_type_name(body)})")
    model = _get(body, "model", str, "a string")
    max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    if kind == "infill" and max_tokens is None:
        max_tokens = _n_predict(body, default_max_tokens)
    stream = _get(body, "stream", bool, "a boolean", False)
    options = _get(body, "stream_options", dict, "an object")
    if options is not None and not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    options = options or {}
    for name in ("include_usage", "include_drafts"):
        _get(options, name, bool, "a boolean")
    seed = body.get("seed")
    if seed is not None:
        try:
            seed = check_seed(seed)
        except (TypeError, ValueError) as e:
            raise bad(f"'seed': {e}", "seed") from None
    n = _positive_int(body, "n") or 1
    if n > MAX_N:
        raise bad(f"'n' must be at most {MAX_N} (got {n})", "n")
    sampler = {}
    if _get(body, "fast", bool, "a boolean") is not None:
        sampler["fast"] = body["fast"]
    for name in SAMPLER_SETTINGS:
        if body.get(name) is not None:
            try:
                sampler[name] = check_setting(name, body[name])
            except (TypeError, ValueError) as e:
                raise bad(str(e), name) from None
    template_kwargs = dict(template_defaults)
    extra = _get(body, "chat_template_kwargs", dict, "an object", {})
    taken = [key for key in extra if key in TEMPLATE_ARGUMENTS]
    if taken:
        raise bad(f"'chat_template_kwargs.{taken[0]}' is set by the server itself", "chat_template_kwargs")
    template_kwargs.update(extra)

    request = Request(
        kind=kind,
        model=model,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        include_drafts=bool(options.get("include_drafts")),
        seed=seed,
        stop=_stop(body.get("stop")),
        n=n,
        sampler=sampler,
    )
    if kind in ("completion", "infill"):
        request.infill_length = _positive_int(body, "infill_length")
    if kind == "chat":
        request.messages = _messages(body.get("messages"))
        request.tools = _tools(body.get("tools"))
        request.template_kwargs = template_kwargs
    elif kind == "completion":
        request.suffix = _get(body, "suffix", str, "a string")
        if request.suffix is not None and not request.suffix:
            request.suffix = None  # OpenAI: an empty suffix is no suffix
        if request.infill_length is not None and request.suffix is None:
            raise bad("'infill_length' needs a 'suffix'", "infill_length")
        # With a suffix the prompt may be empty: the middle then starts the text.
        prompt = body.get("prompt")
        request.prompt = "" if request.suffix is not None and prompt == "" else _prompt(prompt)
    elif kind == "infill":
        request.prompt = _infill_prefix(body)
        request.suffix = _get(body, "input_suffix", str, "a string", "")
        if not request.prompt and not request.suffix and not request.warm_up:
            raise bad("'input_prefix' and 'input_suffix' are both empty: nothing to write between", "input_prefix")
        request.n_indent = _get(body, "n_indent", int, "an integer", 0)
        # llama.vscode asks for several proposals and shows one answer as one: one is written.
        _positive_int(body, "n_cmpl")
        fields = _get(body, "response_fields", list, "an array of strings")
        if fields is not None and not all(isinstance(f, str) for f in fields):
            raise bad("'response_fields' must be an array of strings", "response_fields")
        request.response_fields = fields
    else:  # edit
        request.text = _get(body, "text", str, "a string")
        if request.text is None:
            raise bad("'text' is required", "text")
        try:
            request.spans = check_spans(request.text, body.get("spans"))
        except ValueError as e:
            raise bad(str(e), "spans") from None
        request.instruction = _get(body, "instruction", str, "a string")
        request.template_kwargs = template_kwargs
    if request.fills and request.n > 1:
        raise bad("'n' is not supported when writing between known text", "n")
    if kind == "edit" and request.stop:
        raise bad("'stop' does not apply to an edit", "stop")
    if request.infill_length is not None and request.infill_length > request.max_tokens:
        raise bad(
            f"'infill_length' ({request.infill_length}) is more than the request's token limit ({request.max_tokens})",
            "infill_length",
        )
    return request


# -- Responses ------------------------------------------------------------------


def new_id(kind: str) -> str:
    return {"chat": "chatcmpl-", "completion": "cmpl-"}.get(kind, kind + "-") + secrets.token_hex(12)


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    denoising_steps: int
    tokens_per_forward: float

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "denoising_steps": self.denoising_steps,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
        }


def cut_at_indent(text: str, n_indent: int) -> Tuple[str, bool]:
    """llama.cpp's ``n_indent``: the text up to the first line after the first
    that is indented less than ``n_indent`` (spaces and tabs) and has anything
    after its indentation, keeping that indentation; and whether it was cut."""
    if n_indent <= 0:
        return text, False
    at = text.find("\n")
    while at != -1:
        pos = at + 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and pos - (at + 1) < n_indent:
            return text[:pos], True
        at = text.find("\n", pos)
    return text, False


def select_fields(body: dict, paths: Optional[List[str]]) -> dict:
    """llama.cpp's ``response_fields``: a flat object of the ``a/b`` paths
    found in ``body`` (missing ones left out), or the whole body."""
    if paths is None:
        return body
    out = {}
    for path in paths:
        value, found = body, bool(path)
        for part in path.split("/"):
            if not isinstance(value, dict) or part not in value:
                found = False
                break
            value = value[part]
        if found:
            out[path] = value
    return out


def timings(prompt_n: int, prompt_ms: float, predicted_n: int, predicted_ms: float) -> dict:
    """llama.cpp's ``timings`` (editor plugins show them)."""

    def rates(n, ms):
        return round(ms / n, 3) if n else 0.0, round(1000 * n / ms, 3) if ms > 0 else 0.0

    prompt_per_token, prompt_per_second = rates(prompt_n, prompt_ms)
    predicted_per_token, predicted_per_second = rates(predicted_n, predicted_ms)
    return {
        "prompt_n": prompt_n,
        "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": prompt_per_token,
        "prompt_per_second": prompt_per_second,
        "predicted_n": predicted_n,
        "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": predicted_per_token,
        "predicted_per_second": predicted_per_second,
    }


@dataclass
class InfillResult:
    """What an /infill answer reports (llama.cpp's fields, which editor plugins read)."""

    content: str = ""
    stop_type: str = "eos"  # "eos", "limit" (cut by n_indent) or "word" (a stop string)
    stopping_word: str = ""
    prompt_n: int = 0  # tokens the model read: the prefix, and the suffix's head it saw
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    denoising_steps: int = 0


def infill_body(base: dict, request: Request, result: InfillResult, n_ctx: int) -> dict:
    """llama.cpp's /infill answer (``base``: the envelope), with the gap's length and steps."""
    return dict(
        base,
        content=result.content,
        stop=True,
        tokens_predicted=result.predicted_n,
        tokens_evaluated=result.prompt_n,
        tokens_cached=0,  # a canvas is written whole; no prompt is kept between requests
        truncated=False,
        stop_type=result.stop_type,
        stopping_word=result.stopping_word,
        has_new_line="\n" in result.content,
        generation_settings={
            "n_ctx": n_ctx,
            "n_predict": request.max_tokens,
            "n_indent": request.n_indent,
            "seed": request.seed,
            "model": base["model"],
        },
        timings=timings(result.prompt_n, result.prompt_ms, result.predicted_n, result.predicted_ms),
        infill_length=result.predicted_n,
        denoising_steps=result.denoising_steps,
    )


def envelope(request: Request, response_id: str, model_id: str, created: Optional[int] = None, chunk=False) -> dict:
    if request.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    elif request.kind == "completion":
        obj = "text_completion"
    else:
        obj = request.kind
    return {"id": response_id, "object": obj, "created": created or int(time.time()), "model": model_id}
