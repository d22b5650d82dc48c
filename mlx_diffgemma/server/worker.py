"""One worker thread does all MLX work; requests take turns on it.

HTTP threads parse a request, check it against the server's limits and
tokenize it (``prepare``: the tokenizer lets other threads run meanwhile, so
a long prompt is read beside the running model rather than in its turn), wrap
it in a ``Job`` and ``submit`` it; the worker answers through the job's event
queue:

- ``("start", None)`` once the prompt is encoded and the first step ran (or
  ``("error", APIError)`` instead: a prompt too long for the context, say);
- ``("chunk", body)`` per streamed chunk (``stream: true``), or one
  ``("response", body)``;
- ``("end", None)`` last.

Fairness: the active jobs (at most ``max_concurrency``) take turns a canvas
each, so a long answer cannot hold up a short one by more than a canvas. A
job whose client went away (``cancel``) is dropped before its next step.
Beyond ``max_concurrency`` running and ``queue_size`` waiting, ``submit``
refuses with 503 and ``Retry-After``.

Interleaving, not batching rows: measured in docs/server.md.
"""

import itertools
import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from ..chat import ChatCache, commit_answer
from ..chat_template import plain_ids, render
from ..generate import stream_generate
from ..infill import stream_edit, stream_infill
from ..prompts import text_ids
from ..sampler_params import SamplerParams
from .conversations import Conversations
from .output import ChatOutput, StopStrings
from .protocol import (
    APIError,
    InfillResult,
    Request,
    Usage,
    cut_at_indent,
    envelope,
    infill_body,
    new_id,
    select_fields,
)

log = logging.getLogger("mlx_diffgemma.server")


# A template that rejects a conversation is a ValueError too (chat_template.render says so).
INPUT_ERRORS = (APIError, ValueError, TypeError)
# A request may ask for this many self-conditioning candidates even when the
# server's default is fewer; a vocabulary-sized gather per step is what is bounded.
TOP_K_ALLOWANCE = 64


def input_error(e: Exception) -> APIError:
    """The answer to an error a request's input caused: a 400 naming it."""
    if isinstance(e, APIError):
        return e
    return APIError(400, str(e).splitlines()[0])


class Job:
    """A request on its way through the worker."""

    def __init__(self, request: Request):
        self.request = request
        self.events: "queue.Queue[tuple]" = queue.Queue()
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def send(self, kind: str, payload: Any = None):
        self.events.put((kind, payload))


@dataclass
class Settings:
    model_id: str
    max_concurrency: int = 8
    queue_size: int = 32
    sampler_defaults: Dict[str, Any] = field(default_factory=dict)


@dataclass
class _Row:
    """One choice of the answer (a batch row)."""

    stops: StopStrings
    output: Optional[ChatOutput]
    text: str = ""  # completions
    message: Dict[str, Any] = field(default_factory=dict)  # chat: the fields so far
    finish_reason: Optional[str] = None
    generation_tokens: int = 0
    tokens_per_forward: float = 0.0
    started: bool = False  # chat streams: the role chunk was sent


class Worker:
    """Loads the model on its own thread (MLX streams belong to the thread that
    made them) and runs every request there."""

    def __init__(self, load: Callable[[], tuple], settings: Settings, conversations: Conversations):
        self.load, self.settings, self.conversations = load, settings, conversations
        self.model = self.tokenizer = None
        self.sampler: Optional[SamplerParams] = None  # the server's settings, resolved against the checkpoint
        self.pending: "queue.Queue[Job]" = queue.Queue(maxsize=settings.queue_size)
        self.active: "deque[tuple]" = deque()
        self.thread = threading.Thread(target=self._main, name="mlx-worker", daemon=True)
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None

    def start(self):
        """Start the thread and wait for the model; a load error is raised here."""
        self.thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def _main(self):
        try:
            self.model, self.tokenizer = self.load()
            # Bad settings fail before serving; what they resolve to bounds every request.
            self.sampler = SamplerParams.resolve(self.model, **self.settings.sampler_defaults)
        except BaseException as e:
            self._load_error = e
            return
        finally:
            self._ready.set()
        self._loop()

    def check_limits(self, request: Request):
        """A 400 for settings beyond the server's own: a request cannot make its
        canvases cost more than the server was started to spend on one."""
        steps = request.sampler.get("max_denoising_steps")
        if steps is not None and steps > self.sampler.max_denoising_steps:
            raise APIError(
                400,
                f"'max_denoising_steps' is {steps}, more than this server allows "
                f"({self.sampler.max_denoising_steps}; a larger --max-denoising-steps allows more)",
                param="max_denoising_steps",
            )
        top_k = request.sampler.get("self_conditioning_top_k")
        limit = max(TOP_K_ALLOWANCE, self.sampler.self_conditioning_top_k)
        if top_k is not None and (top_k > limit or (top_k == 0 and self.sampler.self_conditioning_top_k != 0)):
            raise APIError(
                400,
                f"'self_conditioning_top_k' is {top_k}, beyond this server's limit (1 to {limit})",
                param="self_conditioning_top_k",
            )

    def prepare(self, request: Request):
        """Tokenize the request's text on the calling (HTTP) thread: the chat
        template's ids, a prompt's, a prefix's and suffix's. An edit's text is
        tokenized in pieces when it runs; here only its size is checked."""
        tokenizer = self.tokenizer
        try:
            if request.kind == "chat":
                request.prompt = render(
                    tokenizer, request.messages, True, tools=request.tools, **request.template_kwargs
                )
            elif request.kind == "edit":
                n, context = len(plain_ids(tokenizer, request.text)), self.model.args.max_position_embeddings
                if n > context:
                    raise ValueError(f"'text' is {n} tokens, more than the model's context of {context}")
            elif request.kind == "infill":
                # As llama.cpp's /infill reads a document: plain text (nothing in a file
                # becomes a control token), the prefix after <bos>.
                bos = getattr(tokenizer, "bos_token_id", None)
                request.prompt = ([bos] if bos is not None else []) + plain_ids(tokenizer, request.prompt)
                request.suffix = plain_ids(tokenizer, request.suffix) if request.suffix else ""
            else:  # completions: raw text as stream_generate reads it, after <bos>
                if isinstance(request.prompt, str) and request.prompt:
                    request.prompt = text_ids(tokenizer, request.prompt)
                if request.suffix:
                    request.suffix = text_ids(tokenizer, request.suffix, bos=False)
        except INPUT_ERRORS as e:
            raise input_error(e) from None

    def submit(self, job: Job):
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise APIError(
                503,
                "the server is busy: too many requests in flight; retry later",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": "1"},
            ) from None

    # -- Scheduling -------------------------------------------------------------

    def _admit(self):
        while len(self.active) < self.settings.max_concurrency:
            try:
                job = self.pending.get(block=not self.active)
            except queue.Empty:
                return
            if job.cancelled.is_set():
                job.send("end")
                continue
            self.active.append((job, self._run(job)))

    def _loop(self):
        while True:
            self._admit()
            job, steps = self.active.popleft()
            try:
                while True:
                    if job.cancelled.is_set():
                        steps.close()
                        job.send("end")
                        break
                    if next(steps):  # a canvas was committed: the next job's turn
                        self.active.append((job, steps))
                        break
            except StopIteration:
                job.send("end")
            except Exception as e:  # never let one request stop the worker
                log.exception("request failed")
                job.send("error", APIError(500, f"internal error: {type(e).__name__}", type="server_error"))
                job.send("end")

    # -- One request ----------------------------------------------------------------

    def _prompt(self, request: Request):
        """(ids or text to encode, the chat cache to encode them into or None,
        ids of the whole prompt or None, how many of those are cached)."""
        if request.kind == "completion":
            return request.prompt, None, None, 0
        full = request.prompt  # the template's ids (prepare)
        if request.n > 1:  # rows of one batch: a fresh batch cache, nothing kept
            return full, None, full, 0
        taken = self.conversations.take(full)
        if taken is None:
            return full, ChatCache(self.model.make_cache()), full, 0
        chat_cache, rest = taken
        return rest, chat_cache, full, len(full) - len(rest)

    def _run(self, job: Job) -> Iterator[bool]:
        """The request as a generator the loop steps: True after each committed canvas."""
        request = job.request
        if request.fills:
            yield from self._run_fill(job)
            return
        try:
            prompt, chat_cache, full, cached = self._prompt(request)
            stream = stream_generate(
                self.model,
                self.tokenizer,
                prompt if request.n == 1 else [prompt] * request.n,
                request.max_tokens,
                seed=request.seed,
                prompt_cache=None if chat_cache is None else chat_cache.cache,
                params=self._params(request),
            )
            # Errors the prompt can cause (too long for the context) come with the first step.
            first = next(stream)
        except INPUT_ERRORS as e:
            job.send("error", input_error(e))
            return
        job.send("start")
        yield False

        chat = request.kind == "chat"
        answer = [_Row(StopStrings(request.stop), ChatOutput() if chat else None) for _ in range(request.n)]
        response_id, created = new_id(request.kind), int(time.time())
        prompt_tokens = len(full) if full is not None else first.prompt_tokens
        last, finished = first, 0
        for response in itertools.chain([first], stream):
            last = response
            row = answer[response.row]
            if row.finish_reason is not None:
                continue
            committed = bool(response.token_ids) or response.finish_reason is not None
            if not committed:
                if request.include_drafts:
                    draft = {"text": response.draft, "canvas": response.canvas_index, "step": response.step}
                    job.send("chunk", self._chunk(request, response_id, created, response.row, {}, None, draft))
                yield False
                continue
            row.generation_tokens = response.generation_tokens
            row.tokens_per_forward = response.tokens_per_forward
            final = response.finish_reason is not None
            text = row.stops.feed(response.text, final=final)
            if row.stops.stopped:
                final = True
            delta = self._delta(row, text, final)
            if final:
                row.finish_reason = (
                    "tool_calls"
                    if chat and row.output.tool_calls
                    else ("stop" if row.stops.stopped else response.finish_reason)
                )
                finished += 1
            if request.stream and (delta or final):
                job.send(
                    "chunk",
                    self._chunk(request, response_id, created, response.row, delta, row.finish_reason),
                )
            if finished == request.n:
                break
            yield True
        stream.close()

        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(r.generation_tokens for r in answer),
            cached_tokens=cached,
            denoising_steps=last.denoising_steps,
            tokens_per_forward=sum(r.tokens_per_forward for r in answer) / len(answer),
        )
        if request.stream:
            if request.include_usage:
                job.send(
                    "chunk",
                    dict(
                        envelope(request, response_id, self.settings.model_id, created, True),
                        choices=[],
                        usage=usage.body(),
                    ),
                )
        else:
            job.send("response", self._response(request, response_id, created, answer, usage))

        natural = not answer[0].stops.stopped and last.finish_reason is not None
        if chat_cache is not None and natural:
            # Keep the conversation encoded for the client's next turn.
            commit_answer(self.model, self.tokenizer, chat_cache, last, len(request.messages) + 1)
            message = dict(answer[0].message, role="assistant")
            message.pop("reasoning_content", None)
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": dict(c["function"], arguments=_json(c))}
                    for c in message["tool_calls"]
                ]
            rendered = render(
                self.tokenizer,
                request.messages + [message],
                False,
                tools=request.tools,
                **request.template_kwargs,
            )
            self.conversations.put(rendered, chat_cache)

    def _params(self, request: Request) -> SamplerParams:
        """The request's sampler settings over the server's, resolved once."""
        return SamplerParams.resolve(self.model, **dict(self.settings.sampler_defaults, **request.sampler))

    def _fill_stream(self, request: Request):
        sampler = self._params(request)
        if request.kind == "edit":
            return stream_edit(
                self.model,
                self.tokenizer,
                request.text,
                request.spans,
                request.instruction,
                seed=request.seed,
                chat_template_kwargs=request.template_kwargs,
                params=sampler,
            )
        return stream_infill(
            self.model,
            self.tokenizer,
            request.prompt,
            request.suffix or "",
            request.infill_length,
            seed=request.seed,
            max_tokens=request.max_tokens,
            params=sampler,
        )

    def _run_fill(self, job: Job) -> Iterator[bool]:
        """An infill or edit: drafts while it denoises (if asked), then the result.
        Its turn ends with each window (canvas) it finishes."""
        request = job.request
        tic = time.perf_counter()
        try:
            stream = self._fill_stream(request)
            first = next(stream)  # errors the input can cause come with the first step
        except INPUT_ERRORS as e:
            job.send("error", input_error(e))
            return
        job.send("start")
        response_id, created = new_id(request.kind), int(time.time())
        last, window = first, 0
        for last in itertools.chain([first], stream):
            if last.finished:
                break
            if request.include_drafts and request.kind == "completion":  # OpenAI's chunks carry drafts
                draft = {
                    "text": "".join(t for t, fixed in last.draft_parts() if not fixed),
                    "canvas": last.window,
                    "step": last.step,
                }
                job.send("chunk", self._chunk(request, response_id, created, 0, {}, None, draft))
            yield last.window != window
            window = last.window
        stream.close()
        elapsed_ms = 1000 * (time.perf_counter() - tic)
        # What the model read: the prompt, and the known text around the gaps it saw.
        read = last.prompt_tokens + last.fixed_tokens
        written = last.length or 0
        usage = Usage(
            prompt_tokens=read,
            completion_tokens=written,
            cached_tokens=0,
            denoising_steps=last.denoising_steps,
            tokens_per_forward=written / max(last.denoising_steps, 1),
        )
        body = envelope(request, response_id, self.settings.model_id, created)
        if request.kind == "edit":  # an edit's text is returned whole
            body.update(text=last.text, spans=[list(s) for s in last.spans], usage=usage.body())
            return job.send("chunk" if request.stream else "response", body)
        stops = StopStrings(request.stop)
        text = stops.feed(last.text, final=True)
        if request.kind == "infill":
            text, indented = cut_at_indent(text, request.n_indent)
            prompt_ms = 1000 * last.prompt_tokens / last.prompt_tps if last.prompt_tps else 0.0
            result = InfillResult(
                content=text,
                stop_type="word" if stops.stopped else "limit" if indented else "eos",
                stopping_word=stops.word,
                prompt_n=read,
                prompt_ms=prompt_ms,
                predicted_n=written,
                predicted_ms=max(elapsed_ms - prompt_ms, 0.0),
                denoising_steps=last.denoising_steps,
            )
            body = infill_body(body, request, result, self.model.args.max_position_embeddings)
            if not request.stream:
                return job.send("response", select_fields(body, request.response_fields))
            # As llama.cpp streams: the content, then a last event that stops.
            job.send("chunk", {"content": text, "stop": False})
            return job.send("chunk", select_fields(dict(body, content=""), request.response_fields))
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None, "infill_length": last.length}
        body.update(choices=[choice], usage=usage.body())
        if not request.stream:
            return job.send("response", body)
        job.send("chunk", self._chunk(request, response_id, created, 0, {"text": text}, "stop"))
        if request.include_usage:
            usage_chunk = envelope(request, response_id, self.settings.model_id, created, True)
            job.send("chunk", dict(usage_chunk, choices=[], usage=usage.body()))

    def _delta(self, row: _Row, text: str, final: bool) -> Dict[str, Any]:
        if row.output is None:
            row.text += text
            return {"text": text} if text else {}
        delta = row.output.feed(text)
        if final:
            for name, value in row.output.finish().items():
                delta[name] = delta.get(name, "") + value
        for name, value in delta.items():
            if name == "tool_calls":
                row.message.setdefault("tool_calls", []).extend(
                    {k: v for k, v in call.items() if k != "index"} for call in value
                )
            else:
                row.message[name] = row.message.get(name, "") + value
        if not row.started:
            row.started = True
            delta = dict({"role": "assistant", "content": ""}, **delta)
        return delta

    def _chunk(self, request, response_id, created, index, delta, finish_reason, draft=None) -> dict:
        body = envelope(request, response_id, self.settings.model_id, created, chunk=True)
        if request.kind == "chat":
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta.get("text", ""), "finish_reason": finish_reason, "logprobs": None}
        if draft is not None:
            choice["draft"] = draft  # the extension: stream_options.include_drafts
        body["choices"] = [choice]
        return body

    def _response(self, request, response_id, created, answer: List[_Row], usage: Usage) -> dict:
        body = envelope(request, response_id, self.settings.model_id, created)
        if request.kind == "chat":
            choices = []
            for i, row in enumerate(answer):
                message = {"role": "assistant", "content": row.message.get("content", "")}
                if "reasoning_content" in row.message:
                    message["reasoning_content"] = row.message["reasoning_content"]
                if row.message.get("tool_calls"):
                    message["tool_calls"] = row.message["tool_calls"]
                    message["content"] = message["content"] or None
                choices.append({"index": i, "message": message, "finish_reason": row.finish_reason})
        else:
            choices = [
                {"index": i, "text": row.text, "finish_reason": row.finish_reason, "logprobs": None}
                for i, row in enumerate(answer)
            ]
        return dict(body, choices=choices, usage=usage.body())


def _json(call: Dict[str, Any]) -> Any:
    """A tool call's arguments as the template takes them (an object)."""
    return json.loads(call["function"]["arguments"])
