"""The HTTP side: routes, limits, authentication, Server-Sent Events.

Every request is untrusted. Bodies need a ``Content-Length`` no larger than
``max_request_bytes`` (413 otherwise, unread); every route but ``/`` and
``/health`` needs the API key when one is set (401); CORS headers go only to
origins listed in ``allowed_origins``. A connection that sends nothing for
``request_timeout`` seconds is closed, and beyond ``max_connections`` open
ones a new one gets 503 at once, so stalled clients cannot pile up threads.
Errors are OpenAI's JSON (``{"error": {...}}``) with their status, and the
server keeps serving. While a job runs, the handler watches its socket: a
client that hangs up cancels the job before its next step.
"""

import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Optional, Tuple
from urllib.parse import unquote

from .fields import APIError, check_body
from .protocol import parse_request
from .worker import Job, Worker

log = logging.getLogger("mlx_diffgemma.server")
POLL = 0.05  # seconds between checks that the client is still there
DRAIN_LIMIT = 64 * 1024 * 1024  # oversized bodies up to this are read (and dropped) before the 413
POST_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/infill": "infill", "/edit": "edit"}
GET_ROUTES = ("/", "/health", "/v1/models")
# What clients send when the user gave no model name: mlx_lm.server's setups
# send "default_model", llama.vscode's OpenAI-compatible mode an empty string.
UNNAMED = ("", "default_model")


@dataclass
class Config:
    """The HTTP side's settings (the model's id is the worker's)."""

    default_max_tokens: int = 512
    template_defaults: dict = field(default_factory=dict)
    api_key: Optional[str] = None
    allowed_origins: Tuple[str, ...] = ()
    max_request_bytes: int = 8 * 1024 * 1024
    request_timeout: float = 30.0  # seconds a connection may stay silent (while sending or idle)
    max_connections: int = 128


def model_names(model_id: str) -> Tuple[str, ...]:
    """The names a request may give the served model: its id, the id's last
    path part ("diffusiongemma-26B-A4B-it" for "google/diffusiongemma-26B-A4B-it")
    and the names clients send when the user gave none."""
    names = [model_id, model_id.rstrip("/").rsplit("/", 1)[-1], *UNNAMED]
    return tuple(dict.fromkeys(names))


def dumps(value) -> bytes:
    """JSON as llama.cpp writes it, compact: llama.vim takes an /infill answer
    only if it matches ``"content":"`` with no space after the colon."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def page() -> bytes:
    return resources.files(__package__).joinpath("page.html").read_bytes()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx_diffgemma"
    config: Config
    worker: Worker

    # -- Plumbing -------------------------------------------------------------

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    def _cors(self):
        headers = getattr(self, "headers", None)  # unset when the request line itself was bad
        origin = headers.get("Origin") if headers is not None else None
        if origin and ("*" in self.config.allowed_origins or origin in self.config.allowed_origins):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self._cors()
        self.end_headers()
        if not getattr(self, "_head", False):
            self.wfile.write(body)

    def _json(self, status: int, value, headers: Optional[dict] = None):
        self._send(status, dumps(value), "application/json", headers)

    def _error(self, e: APIError):
        self._json(e.status, e.body(), e.headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too
        long, an unknown method) as JSON, like every other error."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unreadable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        if code == HTTPStatus.NOT_IMPLEMENTED:
            return self._not_allowed()
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._error(APIError(code, message or phrase, type="invalid_request_error"))

    def _not_allowed(self):
        path = self.path.split("?", 1)[0] if isinstance(getattr(self, "path", None), str) else ""
        allowed = "POST" if path in POST_ROUTES else "GET, HEAD" if self._get_route(path) else None
        if allowed is None:
            return self._error(APIError(404, f"no route {path}", code="not_found"))
        if self.config.allowed_origins:
            allowed += ", OPTIONS"
        self._error(
            APIError(
                405,
                f"{path} takes {allowed.split(',')[0]}, not {self.command}",
                code="method_not_allowed",
                headers={"Allow": allowed},
            )
        )

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _client_gone(self) -> bool:
        """Whether the client closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _authorized(self) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        # The scheme is case-insensitive (RFC 9110); the key is not.
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())

    def _body(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self.close_connection = True
            raise APIError(411, "a request body needs a Content-Length header")
        try:
            length = int(length)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise APIError(400, f"Content-Length must be a number of bytes (got {self.headers['Content-Length']!r})")
        if length > self.config.max_request_bytes:
            self.close_connection = True
            remaining = length if length <= DRAIN_LIMIT else 0
            try:
                while remaining > 0:
                    # Read and drop the body, so the client is not cut off while sending and sees the answer.
                    chunk = self.rfile.read(min(1 << 16, remaining))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            except OSError:
                pass
            raise APIError(
                413,
                f"the request body is {length} bytes, more than this server's limit of "
                f"{self.config.max_request_bytes} bytes (--max-request-bytes; a base64 image takes 4/3 of its size)",
                code="request_too_large",
            )
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise APIError(
                408, f"the request body did not arrive within {self.config.request_timeout:g} s", code="timeout"
            ) from None
        if len(data) < length:
            self.close_connection = True
            raise APIError(400, f"the request body ended after {len(data)} of its {length} bytes")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        except RecursionError:
            raise APIError(400, "the request body nests too deeply to read") from None
        check_body(body)
        return body

    # -- Routes ---------------------------------------------------------------

    def do_OPTIONS(self):
        if not self.config.allowed_origins:
            return self._error(APIError(405, "CORS is not enabled on this server (see --allowed-origins)"))
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Content-Length", "0")
        self.end_headers()

    @staticmethod
    def _get_route(path: str) -> bool:
        return path in GET_ROUTES or path.startswith("/v1/models/")

    def do_HEAD(self):
        self._head = True  # _send writes the headers only
        try:
            self.do_GET()
        finally:
            self._head = False

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in POST_ROUTES:
            return self._not_allowed()
        if path == "/":
            return self._send(200, page(), "text/html; charset=utf-8")
        if path == "/health":
            return self._json(200, {"status": "ok"})
        if self._get_route(path):
            if not self._authorized():
                return self._unauthorized()
            model_id = self.worker.settings.model_id
            card = {"id": model_id, "object": "model", "created": 0, "owned_by": "mlx_diffgemma"}
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": [card]})
            try:
                return self._json(200, dict(card, id=self._served(unquote(path[len("/v1/models/") :]))))
            except APIError as e:
                return self._error(e)
        self._error(APIError(404, f"no route {path}", code="not_found"))

    def _served(self, name: str) -> str:
        """The served id, if ``name`` names it; 404 otherwise."""
        model_id = self.worker.settings.model_id
        names = model_names(model_id)
        if name not in names:
            listed = ", ".join(repr(n) for n in names)
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {model_id!r} (a request may name it {listed})",
                param="model",
                code="model_not_found",
            )
        return model_id

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            if path not in POST_ROUTES:
                if self._get_route(path):
                    return self._not_allowed()
                raise APIError(404, f"no route {path}", code="not_found")
            if not self._authorized():
                return self._unauthorized()
            body = self._body()
            request = parse_request(
                POST_ROUTES[path], body, self.config.default_max_tokens, self.config.template_defaults
            )
            if request.model is not None:
                self._served(request.model)
            self.worker.check_limits(request)
            if request.warm_up:
                n_ctx = self.worker.model.args.max_position_embeddings
                return self._json(200, request.warm_up_answer(self.worker.settings.model_id, n_ctx))
            self.worker.prepare(request)
            job = Job(request)
            self.worker.submit(job)
        except APIError as e:
            return self._error(e)
        try:
            self._answer(job)
        except OSError:  # the client went away (or stopped reading) while being answered
            job.cancel()
            self.close_connection = True

    def _unauthorized(self):
        self._error(
            APIError(
                401,
                "invalid or missing API key",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        )

    # -- Answering a job --------------------------------------------------------

    def _next(self, job: Job):
        """The job's next event; cancels the job if the client goes away meanwhile."""
        while True:
            try:
                return job.events.get(timeout=POLL)
            except queue.Empty:
                if self._client_gone():
                    job.cancel()
                    return ("gone", None)

    def _answer(self, job: Job):
        kind, payload = self._next(job)
        if kind == "error":
            return self._error(payload)
        if kind != "start":
            return
        if not job.request.stream:
            kind, payload = self._next(job)
            if kind == "error":
                return self._error(payload)
            if kind == "response":
                self._json(200, payload)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self._cors()
        self.end_headers()
        self.close_connection = True
        tic = time.perf_counter()
        try:
            while True:
                kind, payload = self._next(job)
                if kind == "chunk":
                    self.wfile.write(b"data: " + dumps(payload) + b"\n\n")
                    self.wfile.flush()
                elif kind == "error":
                    self.wfile.write(b"data: " + dumps(payload.body()) + b"\n\n")
                elif kind in ("end", "gone"):
                    break
            if kind == "end" and job.request.SENDS_DONE:
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
        except OSError:  # a hang-up, or a client that stopped reading for request_timeout
            job.cancel()
            log.info("client went away after %.2f s; its request was cancelled", time.perf_counter() - tic)


class Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 refuses connections when many clients start at once.
    request_queue_size = 128
    max_connections = 128

    def server_activate(self):
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            return self._refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request):
        """A 503 written from the accepting thread, without reading the request."""
        body = dumps(
            APIError(
                503,
                f"the server has {self.max_connections} connections open; retry later",
                type="server_error",
                code="server_busy",
            ).body()
        )
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            request.settimeout(0.5)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)


def make_server(host: str, port: int, worker: Worker, config: Config) -> Server:
    handler = type("BoundHandler", (Handler,), {"config": config, "worker": worker, "timeout": config.request_timeout})
    bounds = {"max_connections": config.max_connections}
    if ":" in host:
        bounds["address_family"] = socket.AF_INET6
    return type("BoundServer", (Server,), bounds)((host, port), handler)
