"""The server's four kinds of request, read from a body and answered.

``parse_request`` checks a decoded JSON body (field by field, ``fields``) and
returns a typed request: ``ChatRequest`` (/v1/chat/completions),
``CompletionRequest`` (/v1/completions), ``InfillRequest`` (llama.cpp's
/infill) or ``EditRequest`` (/edit). Each knows how its text is tokenized
(``prepare``, on the HTTP thread, as a chat's images are read: ``read_images``),
which stream writes it, and how its answers look: OpenAI's chunks and bodies,
llama.cpp's /infill fields, an edit's text.
The worker only schedules. Fields of OpenAI's API that do not apply to a
diffusion sampler (``temperature``, ``top_p``, penalties: docs/server.md lists
them) are accepted and ignored, as are fields neither OpenAI's nor ours, so
clients that send extras keep working.
"""

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

from ..chat_template import TEMPLATE_ARGUMENTS, plain_ids, render
from ..image_prompts import PromptImage
from ..infill import check_spans, stream_edit, stream_infill
from ..prompts import check_seed, text_ids
from ..sampler_params import SAMPLER_SETTINGS, check_setting
from . import fields
from .fields import bad
from .images import ImagePolicy, read_images
from .output import ChatAnswer, StopStrings, TextAnswer

MAX_N = 16


@dataclass
class Reply:
    """What every body of one answer shares: its id, the served model, its time."""

    id: str
    model: str
    created: int

    def envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


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


@dataclass
class Request:
    """What every request says: the checked fields all four kinds share."""

    OBJECT: ClassVar[str]  # the answer's "object"
    CHUNK_OBJECT: ClassVar[str]  # a streamed chunk's
    ID_PREFIX: ClassVar[str]
    SENDS_DONE: ClassVar[bool] = True  # a stream ends with "data: [DONE]"
    KEEPS_CONVERSATION: ClassVar[bool] = False  # its prompt's cache is kept for the next turn

    model: Optional[str] = None
    max_tokens: int = 0
    stream: bool = False
    include_usage: bool = False
    include_drafts: bool = False
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    n: int = 1
    sampler: Dict[str, Any] = field(default_factory=dict)
    prompt: Optional[Union[str, List[int]]] = None  # chat: the template's ids (prepare)
    images: List[PromptImage] = field(default_factory=list)  # chat: in the order of the prompt's places (read_images)

    @property
    def fills(self) -> bool:
        """Written between known text (infill, edit, completions with a suffix)."""
        return False

    @property
    def warm_up(self) -> bool:
        """A request that asks for nothing to be written."""
        return False

    def read(self, body: dict, default_max_tokens: int, template_kwargs: Dict[str, Any]):
        """This kind's own fields from the body (the shared ones are read)."""

    def check(self):
        """Rules across fields, once all are read."""
        if self.fills and self.n > 1:
            raise bad("'n' is not supported when writing between known text", "n")

    def prepare(self, tokenizer, context: int):
        """Tokenize the request's text (on the calling thread); ``context``: the model's."""

    def read_images(self, model, model_id: str, policy: ImagePolicy):
        """Decode and preprocess the request's images (on the calling thread) into ``images``."""

    def reply(self, model_id: str) -> Reply:
        return Reply(self.ID_PREFIX + secrets.token_hex(12), model_id, int(time.time()))

    def usage_chunk(self, reply: Reply, usage: Usage) -> dict:
        """The last chunk of a stream that asked for usage."""
        return dict(reply.envelope(self.CHUNK_OBJECT), choices=[], usage=usage.body())

    # Requests that fill a gap: the stream, drafts, the answer.

    def fill_stream(self, model, tokenizer, params):
        raise NotImplementedError(type(self).__name__ + " does not fill")

    def fill_draft(self, reply: Reply, step) -> Optional[dict]:
        """The chunk a draft of ``step`` streams as, if this kind streams drafts."""
        return None

    def fill_answer(self, reply: Reply, last, usage: Usage, elapsed_ms: float, context: int) -> List[Tuple[str, dict]]:
        """The worker's events, ``(kind, body)``, for a finished fill."""
        raise NotImplementedError(type(self).__name__ + " does not fill")


def _check_infill_length(request):
    if request.infill_length is not None and request.infill_length > request.max_tokens:
        raise bad(
            f"'infill_length' ({request.infill_length}) is more than the request's token limit ({request.max_tokens})",
            "infill_length",
        )


def _chunk(reply: Reply, obj: str, choice: dict, draft: Optional[dict]) -> dict:
    if draft is not None:
        choice["draft"] = draft  # the extension: stream_options.include_drafts
    return dict(reply.envelope(obj), choices=[choice])


@dataclass
class ChatRequest(Request):
    """/v1/chat/completions: messages through the chat template."""

    OBJECT: ClassVar[str] = "chat.completion"
    CHUNK_OBJECT: ClassVar[str] = "chat.completion.chunk"
    ID_PREFIX: ClassVar[str] = "chatcmpl-"
    KEEPS_CONVERSATION: ClassVar[bool] = True

    messages: List[Dict[str, Any]] = field(default_factory=list)
    tools: Optional[List[Dict[str, Any]]] = None
    template_kwargs: Dict[str, Any] = field(default_factory=dict)

    # Each image part's field and URL, in order (read_images loads them).
    image_parts: List[Tuple[str, str]] = field(default_factory=list)

    def read(self, body, default_max_tokens, template_kwargs):
        # The messages as the template takes them: each image part is {"type": "image"},
        # where the template writes the image's token.
        self.messages = fields.messages(body.get("messages"))
        for i, message in enumerate(self.messages):
            content = message["content"]
            for j, part in enumerate(content if isinstance(content, list) else []):
                if part["type"] == "image_url":
                    self.image_parts.append((f"messages[{i}].content[{j}].image_url.url", part["image_url"]["url"]))
                    content[j] = {"type": "image"}
        self.tools = fields.tools(body.get("tools"))
        self.template_kwargs = template_kwargs

    def prepare(self, tokenizer, context):
        self.prompt = render(tokenizer, self.messages, True, tools=self.tools, **self.template_kwargs)

    def read_images(self, model, model_id, policy):
        self.images = read_images(model, model_id, self.image_parts, policy)

    def answer(self) -> ChatAnswer:
        return ChatAnswer(StopStrings(self.stop))

    def chunk(self, reply: Reply, index: int, delta: dict, finish_reason, draft=None) -> dict:
        return _chunk(reply, self.CHUNK_OBJECT, {"index": index, "delta": delta, "finish_reason": finish_reason}, draft)

    def response(self, reply: Reply, answers: List[ChatAnswer], usage: Usage) -> dict:
        choices = [
            {"index": i, "message": a.message_body(), "finish_reason": a.finish_reason} for i, a in enumerate(answers)
        ]
        return dict(reply.envelope(self.OBJECT), choices=choices, usage=usage.body())


@dataclass
class CompletionRequest(Request):
    """/v1/completions: raw text after <bos>; with a ``suffix``, the text between."""

    OBJECT: ClassVar[str] = "text_completion"
    CHUNK_OBJECT: ClassVar[str] = "text_completion"
    ID_PREFIX: ClassVar[str] = "cmpl-"

    suffix: Optional[Union[str, List[int]]] = None  # OpenAI's insert mode
    infill_length: Optional[int] = None  # None: chosen automatically

    @property
    def fills(self) -> bool:
        return self.suffix is not None

    def read(self, body, default_max_tokens, template_kwargs):
        self.suffix = fields.typed(body, "suffix", str, "a string")
        if self.suffix is not None and not self.suffix:
            self.suffix = None  # OpenAI: an empty suffix is no suffix
        self.infill_length = fields.positive_int(body, "infill_length")
        if self.infill_length is not None and self.suffix is None:
            raise bad("'infill_length' needs a 'suffix'", "infill_length")
        _check_infill_length(self)
        # With a suffix the prompt may be empty: the middle then starts the text.
        prompt = body.get("prompt")
        self.prompt = "" if self.suffix is not None and prompt == "" else fields.prompt(prompt)

    def prepare(self, tokenizer, context):
        # Raw text as stream_generate reads it, after <bos>.
        if isinstance(self.prompt, str) and self.prompt:
            self.prompt = text_ids(tokenizer, self.prompt)
        if self.suffix:
            self.suffix = text_ids(tokenizer, self.suffix, bos=False)

    def answer(self) -> TextAnswer:
        return TextAnswer(StopStrings(self.stop))

    def chunk(self, reply: Reply, index: int, delta: dict, finish_reason, draft=None) -> dict:
        choice = {"index": index, "text": delta.get("text", ""), "finish_reason": finish_reason, "logprobs": None}
        return _chunk(reply, self.CHUNK_OBJECT, choice, draft)

    def response(self, reply: Reply, answers: List[TextAnswer], usage: Usage) -> dict:
        choices = [
            {"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
            for i, a in enumerate(answers)
        ]
        return dict(reply.envelope(self.OBJECT), choices=choices, usage=usage.body())

    def fill_stream(self, model, tokenizer, params):
        return stream_infill(
            model,
            tokenizer,
            self.prompt,
            self.suffix or "",
            self.infill_length,
            seed=self.seed,
            max_tokens=self.max_tokens,
            params=params,
        )

    def fill_draft(self, reply, step):
        if not self.include_drafts:
            return None
        draft = {
            "text": "".join(t for t, fixed in step.draft_parts() if not fixed),
            "canvas": step.window,
            "step": step.step,
        }
        return self.chunk(reply, 0, {}, None, draft)

    def fill_answer(self, reply, last, usage, elapsed_ms, context):
        text = StopStrings(self.stop).feed(last.text, final=True)
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None, "infill_length": last.length}
        body = dict(reply.envelope(self.OBJECT), choices=[choice], usage=usage.body())
        if not self.stream:
            return [("response", body)]
        events = [("chunk", self.chunk(reply, 0, {"text": text}, "stop"))]
        if self.include_usage:
            events.append(("chunk", self.usage_chunk(reply, usage)))
        return events


@dataclass
class InfillRequest(Request):
    """llama.cpp's /infill, as editor plugins send it: the prefix (extra context
    chunks, ``input_prefix``, ``prompt``) and ``input_suffix``."""

    OBJECT: ClassVar[str] = "infill"
    CHUNK_OBJECT: ClassVar[str] = "infill"
    ID_PREFIX: ClassVar[str] = "infill-"
    SENDS_DONE: ClassVar[bool] = False  # llama.cpp's /infill stream has no [DONE]

    suffix: Union[str, List[int]] = ""
    infill_length: Optional[int] = None
    n_indent: int = 0  # cut the middle at a later line indented less (llama.cpp's rule)
    response_fields: Optional[List[str]] = None  # only these (slash paths), as a flat object

    @property
    def fills(self) -> bool:
        return True

    @property
    def warm_up(self) -> bool:
        """``n_predict: 0``: llama.cpp's plugins send these to warm its cache as
        the editor's context changes; nothing is written."""
        return self.max_tokens == 0

    def read(self, body, default_max_tokens, template_kwargs):
        if body.get("max_completion_tokens") is None and body.get("max_tokens") is None:
            self.max_tokens = fields.n_predict(body, default_max_tokens)
        self.infill_length = fields.positive_int(body, "infill_length")
        _check_infill_length(self)
        self.prompt = fields.infill_prefix(body)
        self.suffix = fields.typed(body, "input_suffix", str, "a string", "")
        if not self.prompt and not self.suffix and not self.warm_up:
            raise bad("'input_prefix' and 'input_suffix' are both empty: nothing to write between", "input_prefix")
        self.n_indent = fields.typed(body, "n_indent", int, "an integer", 0)
        # llama.vscode asks for several proposals and shows one answer as one: one is written.
        fields.positive_int(body, "n_cmpl")
        paths = fields.typed(body, "response_fields", list, "an array of strings")
        if paths is not None and not all(isinstance(f, str) for f in paths):
            raise bad("'response_fields' must be an array of strings", "response_fields")
        self.response_fields = paths

    def prepare(self, tokenizer, context):
        # As llama.cpp's /infill reads a document: plain text (nothing in a file
        # becomes a control token), the prefix after <bos>.
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prompt = ([bos] if bos is not None else []) + plain_ids(tokenizer, self.prompt)
        self.suffix = plain_ids(tokenizer, self.suffix) if self.suffix else ""

    fill_stream = CompletionRequest.fill_stream

    def warm_up_answer(self, model_id: str, context: int) -> dict:
        """The answer to a warm-up: we keep no infill cache to warm, so it is
        answered at once, as llama.cpp answers it."""
        body = infill_body(self.reply(model_id).envelope(self.OBJECT), self, InfillResult(), context)
        return select_fields(body, self.response_fields)

    def fill_answer(self, reply, last, usage, elapsed_ms, context):
        stops = StopStrings(self.stop)
        text, indented = cut_at_indent(stops.feed(last.text, final=True), self.n_indent)
        prompt_ms = 1000 * last.prompt_tokens / last.prompt_tps if last.prompt_tps else 0.0
        result = InfillResult(
            content=text,
            stop_type="word" if stops.stopped else "limit" if indented else "eos",
            stopping_word=stops.word,
            prompt_n=usage.prompt_tokens,
            prompt_ms=prompt_ms,
            predicted_n=usage.completion_tokens,
            predicted_ms=max(elapsed_ms - prompt_ms, 0.0),
            denoising_steps=last.denoising_steps,
        )
        body = infill_body(reply.envelope(self.OBJECT), self, result, context)
        if not self.stream:
            return [("response", select_fields(body, self.response_fields))]
        # As llama.cpp streams: the content, then a last event that stops.
        return [
            ("chunk", {"content": text, "stop": False}),
            ("chunk", select_fields(dict(body, content=""), self.response_fields)),
        ]


@dataclass
class EditRequest(Request):
    """/edit: a text with spans to rewrite (``instruction``: how), answered whole."""

    OBJECT: ClassVar[str] = "edit"
    CHUNK_OBJECT: ClassVar[str] = "edit"
    ID_PREFIX: ClassVar[str] = "edit-"

    text: str = ""
    spans: List[Tuple[int, int]] = field(default_factory=list)
    instruction: Optional[str] = None
    template_kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def fills(self) -> bool:
        return True

    def read(self, body, default_max_tokens, template_kwargs):
        text = fields.typed(body, "text", str, "a string")
        if text is None:
            raise bad("'text' is required", "text")
        self.text = text
        try:
            self.spans = check_spans(text, body.get("spans"))
        except ValueError as e:
            raise bad(str(e), "spans") from None
        self.instruction = fields.typed(body, "instruction", str, "a string")
        self.template_kwargs = template_kwargs
        if self.stop:
            raise bad("'stop' does not apply to an edit", "stop")

    def prepare(self, tokenizer, context):
        # The text is tokenized in pieces when it runs; here only its size is checked.
        n = len(plain_ids(tokenizer, self.text))
        if n > context:
            raise ValueError(f"'text' is {n} tokens, more than the model's context of {context}")

    def fill_stream(self, model, tokenizer, params):
        return stream_edit(
            model,
            tokenizer,
            self.text,
            self.spans,
            self.instruction,
            seed=self.seed,
            chat_template_kwargs=self.template_kwargs,
            params=params,
        )

    def fill_answer(self, reply, last, usage, elapsed_ms, context):
        body = dict(
            reply.envelope(self.OBJECT), text=last.text, spans=[list(s) for s in last.spans], usage=usage.body()
        )
        return [("chunk" if self.stream else "response", body)]


REQUESTS = {"chat": ChatRequest, "completion": CompletionRequest, "infill": InfillRequest, "edit": EditRequest}


def parse_request(kind: str, body: Any, default_max_tokens: int, template_defaults: Dict[str, Any]) -> Request:
    """A checked request of ``kind`` (a key of ``REQUESTS``) from a decoded body, or ``APIError`` (400)."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object (got {fields.type_name(body)})")
    model = fields.typed(body, "model", str, "a string")
    max_tokens = fields.positive_int(body, "max_completion_tokens") or fields.positive_int(body, "max_tokens")
    stream = fields.typed(body, "stream", bool, "a boolean", False)
    options = fields.typed(body, "stream_options", dict, "an object")
    if options is not None and not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    options = options or {}
    for name in ("include_usage", "include_drafts"):
        fields.typed(options, name, bool, "a boolean")
    seed = body.get("seed")
    if seed is not None:
        try:
            seed = check_seed(seed)
        except (TypeError, ValueError) as e:
            raise bad(f"'seed': {e}", "seed") from None
    n = fields.positive_int(body, "n") or 1
    if n > MAX_N:
        raise bad(f"'n' must be at most {MAX_N} (got {n})", "n")
    sampler = {}
    if fields.typed(body, "fast", bool, "a boolean") is not None:
        sampler["fast"] = body["fast"]
    for name in SAMPLER_SETTINGS:
        if body.get(name) is not None:
            try:
                sampler[name] = check_setting(name, body[name])
            except (TypeError, ValueError) as e:
                raise bad(str(e), name) from None
    template_kwargs = dict(template_defaults)
    extra = fields.typed(body, "chat_template_kwargs", dict, "an object", {})
    taken = [key for key in extra if key in TEMPLATE_ARGUMENTS]
    if taken:
        raise bad(f"'chat_template_kwargs.{taken[0]}' is set by the server itself", "chat_template_kwargs")
    template_kwargs.update(extra)

    request = REQUESTS[kind](
        model=model,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        include_drafts=bool(options.get("include_drafts")),
        seed=seed,
        stop=fields.stops(body.get("stop")),
        n=n,
        sampler=sampler,
    )
    request.read(body, default_max_tokens, template_kwargs)
    request.check()
    return request


# -- llama.cpp's /infill answer ---------------------------------------------------------


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


def infill_body(base: dict, request: "InfillRequest", result: InfillResult, n_ctx: int) -> dict:
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
