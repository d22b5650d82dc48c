"""One worker thread does all MLX work; requests take turns on it.

HTTP threads parse a request, check it against the server's limits,
tokenize it and decode its images (``prepare``: the tokenizer lets other
threads run meanwhile, so a long prompt is read beside the running model
rather than in its turn; an image is encoded in the worker's turn), wrap
it in a ``Job`` and ``submit`` it; the worker answers through the job's event
queue:

- ``("start", None)`` once the prompt is encoded and the first step ran (or
  ``("error", APIError)`` instead: a prompt too long for the context, say);
- ``("chunk", body)`` per streamed chunk (``stream: true``), or one
  ``("response", body)``;
- ``("end", None)`` last.

Batching: chat and completion requests with ``n`` = 1 and no images
become rows of a ``batch.Batch``, one batch per distinct sampler setting (a
batch's rows share each denoising step), at most ``max_batch_size`` rows
each; a request joins a running batch at its next canvas and leaves it when
its answer is done, a conversation's cache taken back out as one row for the
prompt cache. Other requests (``n`` > 1, images, infill and edit) and every
request with ``max_batch_size`` 1 run alone, each its own ``stream_generate``.

Fairness: the turns (batches and requests running alone; at most
``max_concurrency`` requests in all) take turns a canvas each, so a long
answer cannot hold up a short one by more than a canvas, and a request that
arrives joins its batch's next canvas. A request whose client went away
(``cancel``) is dropped before its next step, or, in a batch where others
still run, at the canvas' end. Beyond ``max_concurrency`` running and
``queue_size`` waiting, ``submit`` refuses with 503 and ``Retry-After``.

Under mlx.launch every process runs this worker on its share of the model,
step for step alike; only process 0 serves HTTP. What its loop decides from
outside the model, process 0 decides for all (``distributed.broadcast_object``):
which request starts (the prepared request itself goes to the others, as a
``MirroredJob`` that answers no one), which clients went away, which
conversations the prompt cache drops, and when to stop. Everything else
follows from the same requests and the same tokens.
"""

import itertools
import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional

from .. import distributed
from ..batch import Batch, BatchRow
from ..chat import ChatCache, commit_answer
from ..chat_template import render
from ..generate import stream_generate
from ..image_prompts import place_images
from ..sampler_params import SamplerParams
from .conversations import Conversations
from .fields import APIError
from .images import ImagePolicy
from .protocol import Request, Usage

log = logging.getLogger("mlx_diffgemma.server")


# A template that rejects a conversation is a ValueError too (chat_template.render says so).
INPUT_ERRORS = (APIError, ValueError, TypeError)
# A request may ask for this many self-conditioning candidates even when the
# server's default is fewer; a vocabulary-sized gather per step is what is bounded.
TOP_K_ALLOWANCE = 64
# How often an idle worker looks whether it was asked to stop (seconds).
IDLE_POLL = 0.5


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
        self.cancelled = threading.Event()  # set by the HTTP thread when the client goes away
        # The worker's view of ``cancelled``, read at agreed points only: under
        # mlx.launch the HTTP thread may set ``cancelled`` after process 0 told
        # the others, and every process must drop the job at the same step.
        self.gone = False

    def cancel(self):
        self.cancelled.set()

    def send(self, kind: str, payload: Any = None):
        self.events.put((kind, payload))


class MirroredJob(Job):
    """Process 0's request on another process of an mlx.launch group: it runs
    the same steps on this process's share of the model and answers no one."""

    def send(self, kind: str, payload: Any = None):
        pass


class Stopped(Exception):
    """The worker was asked to stop (``Worker.stop``)."""


STOP = object()  # what the worker takes instead of a job once asked to stop


@dataclass
class Settings:
    model_id: str
    max_concurrency: int = 8
    queue_size: int = 32
    sampler_defaults: Dict[str, Any] = field(default_factory=dict)
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_batch_size: int = 8  # rows of one batch; 1: every request runs alone, taking turns


class Worker:
    """Loads the model on its own thread (MLX streams belong to the thread that
    made them) and runs every request there."""

    def __init__(
        self,
        load: Callable[[], tuple],
        settings: Settings,
        conversations: Conversations,
        group: Optional[Any] = None,
    ):
        self.load, self.settings, self.conversations = load, settings, conversations
        # The mlx.launch group whose processes run this worker alike (None or one process: alone).
        self.group = group if group is not None and group.size() > 1 else None
        self.primary = self.group is None or self.group.rank() == 0
        if self.group is not None:
            conversations.agree = self._agree
        self.model = self.tokenizer = None
        self.sampler: Optional[SamplerParams] = None  # the server's settings, resolved against the checkpoint
        self.pending: "queue.Queue[Job]" = queue.Queue(maxsize=settings.queue_size)
        self.turns: "deque[Any]" = deque()  # JobTurn and BatchTurn, in the order they run
        self.thread = threading.Thread(target=self._main, name="mlx-worker", daemon=True)
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._load_error: Optional[BaseException] = None

    def start(self):
        """Start the thread and wait for the model; a load error is raised here."""
        self.thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self, timeout: float = 10.0):
        """Under mlx.launch, stop every process's worker once its current step
        is done; wait up to ``timeout`` seconds. Alone there is no one to
        tell: the worker's thread ends with the process."""
        if self.group is None:
            return
        self._stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def join(self):
        """Wait until the worker stops: what processes other than 0 do while process 0 serves."""
        self.thread.join()

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
        """Tokenize the request's text, and decode and preprocess its images,
        on the calling (HTTP) thread: the worker only encodes them."""
        try:
            request.prepare(self.tokenizer, self.model.args.max_position_embeddings)
            request.read_images(self.model, self.settings.model_id, self.settings.images)
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

    def _running(self) -> int:
        return sum(turn.size for turn in self.turns)

    def _agree(self, value: Any = None) -> Any:
        """Process 0's ``value`` on every process of the group (alone: ``value``)."""
        if self.group is None:
            return value
        return distributed.broadcast_object(value if self.primary else None, self.group)

    def _take(self, block: bool):
        """The next job from the queue, None if there is none and ``block`` is
        false, or STOP once asked to stop (under mlx.launch)."""
        if self.group is None:
            # Blocking for good: a daemon thread that wakes while the process
            # exits is ended mid-call, and the process aborts (seen with a poll).
            try:
                return self.pending.get(block=block)
            except queue.Empty:
                return None
        while not self._stopping.is_set():
            try:
                return self.pending.get(timeout=IDLE_POLL) if block else self.pending.get_nowait()
            except queue.Empty:
                if not block:
                    return None
        return STOP

    def _next_job(self, block: bool) -> Optional[Job]:
        """The next request to start: process 0's, whose request (prepared:
        tokenized, images decoded) every other process mirrors."""
        job = self._take(block) if self.primary else None
        if self.group is not None:
            message = None if job is None else "stop" if job is STOP else (job.request, job.cancelled.is_set())
            message = self._agree(message)
            if not self.primary:
                job = None if message is None else STOP if message == "stop" else MirroredJob(message[0])
            if isinstance(message, tuple):
                job.gone = message[1]
        elif isinstance(job, Job):
            job.gone = job.cancelled.is_set()
        if job is STOP:
            raise Stopped
        return job

    def _agree_on_cancelled(self, turn):
        """The turn's jobs whose client went away (``Job.gone``), as process 0
        saw them, on every process."""
        jobs = turn.jobs()
        flags = self._agree([job.cancelled.is_set() for job in jobs])
        for job, gone in zip(jobs, flags):
            job.gone = gone

    def _admit(self):
        while self._running() < self.settings.max_concurrency:
            job = self._next_job(block=not self.turns)
            if job is None:
                return
            if job.gone:
                job.send("end")
                continue
            if self._batches(job.request):
                self._join(job)
            else:
                self.turns.append(JobTurn(job, self._run(job)))

    def _batches(self, request: Request) -> bool:
        """Whether ``request`` runs as a row of a batch."""
        return self.settings.max_batch_size > 1 and not request.fills and request.n == 1 and not request.images

    def _join(self, job: Job):
        """Put the job's row in the batch of its settings that has room (it
        joins at that batch's next canvas), or in a new batch, last in turn."""
        request = job.request
        try:
            params = self._params(request)
            prompt, _, chat_cache, length, cached = self._prompt(request)
            turn = next(
                (t for t in self.turns if isinstance(t, BatchTurn) and t.batch.params == params and not t.batch.full),
                None,
            )
            batch = turn.batch if turn else Batch(self.model, self.tokenizer, params, self.settings.max_batch_size)
            answer = Answer(self, job, chat_cache, length, cached)
            cache = None if chat_cache is None else chat_cache.cache
            batch.add(prompt, request.max_tokens, request.seed, cache, chat_cache is not None, answer)
        except INPUT_ERRORS as e:
            job.send("error", input_error(e))
            job.send("end")
            return
        except Exception as e:  # never let one request stop the worker
            log.exception("request failed")
            job.send("error", APIError(500, f"internal error: {type(e).__name__}", type="server_error"))
            job.send("end")
            return
        if turn is None:
            self.turns.append(BatchTurn(batch, self._run_batch(batch)))

    def _loop(self):
        while True:
            try:
                self._admit()
            except Stopped:
                return
            turn = self.turns.popleft()
            try:
                while True:
                    self._agree_on_cancelled(turn)
                    if turn.drop_cancelled():
                        break
                    if next(turn.steps):  # a canvas was committed: the next turn's
                        self.turns.append(turn)
                        break
            except StopIteration:
                turn.end()
            except Exception as e:  # never let one request stop the worker
                log.exception("request failed")
                turn.fail(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    # -- One request ----------------------------------------------------------------

    def _prompt(self, request: Request):
        """(ids or text to encode, the images among them, the chat cache to
        encode them into or None, the whole prompt's length or None, how many
        of its tokens are cached). Lengths count an image's tokens, as the
        model reads them."""
        if not request.KEEPS_CONVERSATION:
            return request.prompt, request.images, None, None, 0
        full = request.prompt  # the template's ids (prepare), one image token per image
        length = self._length(full, request.images)
        if request.n > 1:  # rows of one batch: a fresh batch cache, nothing kept
            return full, request.images, None, length, 0
        # A conversation holding the same ids with other images is another conversation.
        taken = self.conversations.take(full, [image.digest for image in request.images])
        if taken is None:
            return full, request.images, ChatCache(self.model.make_cache()), length, 0
        chat_cache, rest = taken
        new = request.images[len(chat_cache.images) :]  # the images after those the cache holds
        return rest, new, chat_cache, length, length - self._length(rest, new)

    def _length(self, ids, images) -> int:
        """The tokens ``ids`` are with each image's place made its span."""
        return len(place_images(self.model, ids, images)) if images else len(ids)

    def _run(self, job: Job) -> Iterator[bool]:
        """A request alone, as a generator the loop steps: True after each committed canvas."""
        request = job.request
        if request.fills:
            yield from self._run_fill(job)
            return
        try:
            prompt, images, chat_cache, length, cached = self._prompt(request)
            stream = stream_generate(
                self.model,
                self.tokenizer,
                prompt if request.n == 1 else [prompt] * request.n,
                request.max_tokens,
                seed=request.seed,
                prompt_cache=None if chat_cache is None else chat_cache.cache,
                params=self._params(request),
                images=(images if request.n == 1 else [images] * request.n) if images else None,
            )
            # Errors the prompt can cause (too long for the context) come with the first step.
            first = next(stream)
        except INPUT_ERRORS as e:
            job.send("error", input_error(e))
            return
        answer = Answer(self, job, chat_cache, length, cached)
        answer.add(first)
        yield False
        for response in stream:
            committed = answer.add(response)
            if answer.complete:
                break
            yield committed
        stream.close()
        answer.finish()

    def _run_batch(self, batch: Batch) -> Iterator[bool]:
        """A batch's canvases, as a generator the loop steps: True after each
        canvas; it ends when the batch has no rows left."""
        while len(batch):
            for row, response in batch.canvas():
                answer: Answer = row.tag
                committed = answer.add(response)
                if answer.complete:
                    if not row.done:  # a stop string cut the answer: the row goes
                        batch.cancel(row)
                    if row.cache is not None:  # a conversation, taken back out
                        answer.chat_cache.cache = row.cache
                    answer.finish()
                    answer.job.send("end")
                elif not committed:
                    yield False
            yield True

    def _params(self, request: Request) -> SamplerParams:
        """The request's sampler settings over the server's, resolved once."""
        return SamplerParams.resolve(self.model, **dict(self.settings.sampler_defaults, **request.sampler))

    def _fill_stream(self, request: Request):
        return request.fill_stream(self.model, self.tokenizer, self._params(request))

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
        reply = request.reply(self.settings.model_id)
        last, window = first, 0
        for last in itertools.chain([first], stream):
            if last.finished:
                break
            draft = request.fill_draft(reply, last)
            if draft is not None:
                job.send("chunk", draft)
            yield last.window != window
            window = last.window
        stream.close()
        elapsed_ms = 1000 * (time.perf_counter() - tic)
        # What the model read: the prompt, and the known text around the gaps it saw.
        written = last.length or 0
        usage = Usage(
            prompt_tokens=last.prompt_tokens + last.fixed_tokens,
            completion_tokens=written,
            cached_tokens=0,
            denoising_steps=last.denoising_steps,
            tokens_per_forward=written / max(last.denoising_steps, 1),
        )
        for kind, body in request.fill_answer(reply, last, usage, elapsed_ms, self.model.args.max_position_embeddings):
            job.send(kind, body)


class Answer:
    """A chat or completion request's answer, built from its ``GenerationResponse``s
    (from its own ``stream_generate`` or its batch row): chunks, drafts, the
    response and usage, and the conversation kept for its next turn."""

    def __init__(self, worker: Worker, job: Job, chat_cache: Optional[ChatCache], length, cached: int):
        self.worker, self.job, self.chat_cache = worker, job, chat_cache
        self.length, self.cached = length, cached
        request = job.request
        self.rows = [request.answer() for _ in range(request.n)]
        self.reply = request.reply(worker.settings.model_id)
        self.first = self.last = None
        self.finished = 0

    @property
    def complete(self) -> bool:
        return self.finished == len(self.rows)

    def add(self, response) -> bool:
        """Take a response; True when it committed a canvas. The first sends "start"."""
        job, request = self.job, self.job.request
        if self.first is None:
            self.first = response
            job.send("start")
        self.last = response
        row = self.rows[response.row]
        if row.finish_reason is not None:
            return False
        if not (response.token_ids or response.finish_reason is not None):  # a step, not a commit
            if request.include_drafts:
                draft = {"text": response.draft, "canvas": response.canvas_index, "step": response.step}
                job.send("chunk", request.chunk(self.reply, response.row, {}, None, draft))
            return False
        delta = row.add(response)
        if row.finish_reason is not None:
            self.finished += 1
        if request.stream and (delta or row.finish_reason is not None):
            job.send("chunk", request.chunk(self.reply, response.row, delta, row.finish_reason))
        return True

    def finish(self):
        """The response (or the usage chunk), and the conversation kept."""
        job, request, worker, last = self.job, self.job.request, self.worker, self.last
        usage = Usage(
            prompt_tokens=self.length if self.length is not None else self.first.prompt_tokens,
            completion_tokens=sum(r.generation_tokens for r in self.rows),
            cached_tokens=self.cached,
            denoising_steps=last.denoising_steps,
            tokens_per_forward=sum(r.tokens_per_forward for r in self.rows) / len(self.rows),
        )
        if not request.stream:
            job.send("response", request.response(self.reply, self.rows, usage))
        elif request.include_usage:
            job.send("chunk", request.usage_chunk(self.reply, usage))

        natural = not self.rows[0].stops.stopped and last.finish_reason is not None
        if self.chat_cache is not None and natural:
            # Keep the conversation encoded for the client's next turn.
            model, tokenizer, chat_cache = worker.model, worker.tokenizer, self.chat_cache
            digests = [image.digest for image in request.images]
            commit_answer(model, tokenizer, chat_cache, last, len(request.messages) + 1, digests)
            message = dict(self.rows[0].message, role="assistant")
            message.pop("reasoning_content", None)
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": dict(c["function"], arguments=_json(c))}
                    for c in message["tool_calls"]
                ]
            rendered = render(
                tokenizer, request.messages + [message], False, tools=request.tools, **request.template_kwargs
            )
            worker.conversations.put(rendered, chat_cache)


class JobTurn:
    """A request that runs alone, a turn being its next canvas."""

    size = 1

    def __init__(self, job: Job, steps: Iterator[bool]):
        self.job, self.steps = job, steps

    def jobs(self) -> "list[Job]":
        return [self.job]

    def drop_cancelled(self) -> bool:
        """True when the job's client went away: it is dropped."""
        if not self.job.gone:
            return False
        self.steps.close()
        self.job.send("end")
        return True

    def end(self):
        self.job.send("end")

    def fail(self, error: APIError):
        self.job.send("error", error)
        self.job.send("end")


class BatchTurn:
    """A batch, a turn being one canvas of all its rows."""

    def __init__(self, batch: Batch, steps: Iterator[bool]):
        self.batch, self.steps = batch, steps

    @property
    def size(self) -> int:
        return len(self.batch)

    def _rows(self) -> "list[BatchRow]":
        return [row for row in self.batch.rows + self.batch.joining if not row.done]

    def jobs(self) -> "list[Job]":
        return [row.tag.job for row in self._rows()]

    def drop_cancelled(self) -> bool:
        """Rows whose client went away leave the batch (at the canvas' end,
        or at once when no other row runs); False: the batch goes on."""
        for row in self._rows():
            if row.tag.job.gone:
                self.batch.cancel(row)
                row.tag.job.send("end")
        return False

    def end(self):
        """The batch ran out of rows; each job was ended with its answer."""

    def fail(self, error: APIError):
        for row in self._rows():
            row.tag.job.send("error", error)
            row.tag.job.send("end")
        self.batch.rows, self.batch.joining = [], []


def _json(call: Dict[str, Any]) -> Any:
    """A tool call's arguments as the template takes them (an object)."""
    return json.loads(call["function"]["arguments"])
