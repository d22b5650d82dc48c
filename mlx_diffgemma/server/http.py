"""The HTTP side: routes, limits, authentication, Server-Sent Events.

Every request is untrusted. Bodies need a ``Content-Length`` no larger than
``max_request_bytes`` (413 otherwise, unread); ``/v1`` routes need the API key
when one is set (401); CORS headers go only to origins listed in
``allowed_origins``. Errors are OpenAI's JSON (``{"error": {...}}``) with their
status, and the server keeps serving. While a job runs, the handler watches
its socket: a client that hangs up cancels the job before its next step.
"""

import hmac
import json
import logging
import queue
import select
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Optional, Tuple

from .protocol import APIError, parse_request
from .worker import Job, Worker

log = logging.getLogger("mlx_diffgemma.server")
POLL = 0.05  # seconds between checks that the client is still there
DRAIN_LIMIT = 64 * 1024 * 1024  # oversized bodies up to this are read (and dropped) before the 413


@dataclass
class Config:
    """The HTTP side's settings (the model's id is the worker's)."""

    default_max_tokens: int = 512
    template_defaults: dict = field(default_factory=dict)
    api_key: Optional[str] = None
    allowed_origins: Tuple[str, ...] = ()
    max_request_bytes: int = 8 * 1024 * 1024


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
        origin = self.headers.get("Origin")
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
        self.wfile.write(body)

    def _json(self, status: int, value, headers: Optional[dict] = None):
        self._send(status, json.dumps(value, ensure_ascii=False).encode(), "application/json", headers)

    def _error(self, e: APIError):
        self._json(e.status, e.body(), e.headers)

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
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())

    def _body(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self.close_connection = True
            raise APIError(411, "a request body needs a Content-Length header")
        try:
            length = int(length)
        except ValueError:
            self.close_connection = True
            raise APIError(400, "Content-Length is not a number") from None
        if length < 0 or length > self.config.max_request_bytes:
            self.close_connection = True
            remaining = length if length <= DRAIN_LIMIT else 0
            while remaining > 0:
                # Read and drop the body, so the client is not cut off while sending and sees the answer.
                chunk = self.rfile.read(min(1 << 16, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
            raise APIError(
                413,
                f"the request body is {length} bytes, more than this server's limit of {self.config.max_request_bytes}",
                code="request_too_large",
            )
        data = self.rfile.read(length)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

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

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            return self._send(200, page(), "text/html; charset=utf-8")
        if path == "/health":
            return self._json(200, {"status": "ok"})
        if path in ("/v1/models", f"/v1/models/{self.worker.settings.model_id}"):
            if not self._authorized():
                return self._unauthorized()
            card = {"id": self.worker.settings.model_id, "object": "model", "created": 0, "owned_by": "mlx_diffgemma"}
            return self._json(200, card if path != "/v1/models" else {"object": "list", "data": [card]})
        self._error(APIError(404, f"no route {path}", code="not_found"))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/infill": "infill", "/edit": "edit"}
        try:
            if path not in kinds:
                raise APIError(404, f"no route {path}", code="not_found")
            if not self._authorized():
                return self._unauthorized()
            body = self._body()
            request = parse_request(kinds[path], body, self.config.default_max_tokens, self.config.template_defaults)
            if request.model is not None and request.model != self.worker.settings.model_id:
                raise APIError(
                    404,
                    f"model {request.model!r} is not served here; this server serves {self.worker.settings.model_id!r}",
                    param="model",
                    code="model_not_found",
                )
            job = Job(request)
            self.worker.submit(job)
        except APIError as e:
            return self._error(e)
        self._answer(job)

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
                    self.wfile.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
                    self.wfile.flush()
                elif kind == "error":
                    self.wfile.write(b"data: " + json.dumps(payload.body()).encode() + b"\n\n")
                elif kind in ("end", "gone"):
                    break
            if kind == "end":
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            job.cancel()
            log.info("client went away after %.2f s; its request was cancelled", time.perf_counter() - tic)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 refuses connections when many clients start at once.
    request_queue_size = 128


def make_server(host: str, port: int, worker: Worker, config: Config) -> Server:
    handler = type("BoundHandler", (Handler,), {"config": config, "worker": worker})
    server_class = type("Server6", (Server,), {"address_family": socket.AF_INET6}) if ":" in host else Server
    return server_class((host, port), handler)
