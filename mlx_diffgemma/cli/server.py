"""python -m mlx_diffgemma.server: an OpenAI-compatible server (docs/server.md)."""

import argparse
import ipaddress
import logging
import re
import signal
import sys

from .. import cli, distributed
from ..image_prompts import image_reader
from ..server import Config, Conversations, Settings, Worker, make_server
from ..server.images import MAX_IMAGE_BYTES, MAX_IMAGES, ImagePolicy, request_bytes_for

DEFAULT_MAX_TOKENS = 512
DEFAULT_REQUEST_BYTES = 8 * 1024 * 1024
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def byte_size(text: str) -> int:
    """'4000000', '512MB', '4GB', '2GiB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB or 512MB, got {text!r}")
    number, unit, binary = match.groups()
    scale = (1024 if binary else 1000) ** " kmgt".index(unit or " ")
    return int(float(number) * scale)


def positive_size(text: str) -> int:
    size = byte_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return size


def request_limit(args, reads_images: bool, policy: ImagePolicy) -> int:
    """--max-request-bytes, or by default a limit a request with the most
    images of the largest size fits in (for a model that reads images)."""
    needed = request_bytes_for(policy) if reads_images else 0
    if args.max_request_bytes is None:
        return max(DEFAULT_REQUEST_BYTES, needed)
    if args.max_request_bytes < needed:
        print(
            f"note: --max-request-bytes {args.max_request_bytes} is less than {args.max_images} base64 images of "
            f"--max-image-bytes {args.max_image_bytes} need ({needed}); larger requests get 413",
            file=sys.stderr,
        )
    return args.max_request_bytes


def setup_arg_parser():
    parser = cli.ArgumentParser(
        prog=cli.prog("server", "mlx_diffgemma.server"),
        description="Serve DiffusionGemma over an OpenAI-compatible HTTP API, with a page at / "
        "where the canvas visibly denoises.",
    )
    cli.add_model_arguments(parser)
    cli.add_distributed_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: 127.0.0.1, this machine only).")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on (default: 8080; 0 picks a free one).")
    cli.add_max_tokens_argument(parser, DEFAULT_MAX_TOKENS, "Most tokens per answer when a request names none")
    parser.add_argument(
        "--chat-template-args",
        type=cli.template_config,
        default={},
        metavar="JSON",
        help="Arguments for the chat template, as a JSON object (e.g. '{\"enable_thinking\": true}'); "
        "a request's chat_template_kwargs override them.",
    )
    parser.add_argument("--api-key", help="Require 'Authorization: Bearer KEY' on every route but / and /health.")
    parser.add_argument(
        "--allowed-origins",
        type=lambda text: tuple(o.strip() for o in text.split(",") if o.strip()),
        default=(),
        metavar="ORIGINS",
        help="Comma-separated origins (or *) that browsers may call the API from (default: none, no CORS).",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="Largest request body accepted; larger ones get 413 (default: 8MiB, or for a model that reads "
        "images enough for --max-images base64 images of --max-image-bytes: 214MiB with the defaults).",
    )
    parser.add_argument(
        "--request-timeout",
        type=cli.positive_float,
        default=30.0,
        metavar="SECONDS",
        help="Close a connection that sends (or reads) nothing for this long (default: 30).",
    )
    parser.add_argument(
        "--max-connections",
        type=cli.positive_int,
        default=128,
        metavar="N",
        help="Open connections served at once; more get 503 straight away (default: 128).",
    )
    parser.add_argument(
        "--max-concurrency",
        type=cli.positive_int,
        default=8,
        metavar="N",
        help="Requests generating at once, taking turns a canvas each (default: 8).",
    )
    parser.add_argument(
        "--max-batch-size",
        type=cli.positive_int,
        default=8,
        metavar="N",
        help="Requests with the same sampler settings that share one batch, joining at a canvas boundary "
        "(default: 8; 1: each runs alone, taking turns a canvas each).",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=32,
        metavar="N",
        help="Requests waiting beyond those; more get 503 with Retry-After (default: 32).",
    )
    parser.add_argument(
        "--prompt-cache-size",
        type=int,
        default=4,
        metavar="N",
        help="Conversations kept encoded for their next turn (default: 4; 0 keeps none).",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="Most memory those conversations' caches may hold, e.g. 4GB (default: no bound beyond their number).",
    )
    parser.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="Fetch http(s) image URLs that requests name (default: off; the server would fetch "
        "whatever a request names, addresses on its own network included). data: URLs are always taken.",
    )
    parser.add_argument(
        "--allow-image-files",
        action="store_true",
        help="Read image paths and file:// URLs that requests name, as this server's user (default: off; "
        "a request must not read the server's files).",
    )
    parser.add_argument(
        "--max-images",
        type=cli.positive_int,
        default=MAX_IMAGES,
        metavar="N",
        help=f"Most images in one chat request; more get 400 (default: {MAX_IMAGES}).",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=positive_size,
        default=MAX_IMAGE_BYTES,
        metavar="SIZE",
        help="Largest image, encoded (a data URL's decoded bytes, a download, a file); larger ones get 400 "
        "(default: 20MiB).",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="Logging level (default: INFO).",
    )
    cli.add_sampler_arguments(parser)
    return parser


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(args) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    group = distributed.init()
    if args.queue_size < 0 or args.prompt_cache_size < 0:
        raise ValueError("--queue-size and --prompt-cache-size must be >= 0")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port}: must be in 0..65535")
    sampler = cli.sampler_flags(args)  # resolved by the worker once the model is loaded

    images = ImagePolicy(args.allow_image_urls, args.allow_image_files, args.max_images, args.max_image_bytes)
    worker = Worker(
        lambda: cli.load_for_generation(args.model, args.adapter_path, args.pipeline),
        Settings(args.model, args.max_concurrency, args.queue_size, sampler, images, args.max_batch_size),
        Conversations(args.prompt_cache_size, args.prompt_cache_bytes),
        group,
    )
    worker.start()
    if not distributed.is_primary(group):
        # Process 0 serves; this one runs the same steps on its share. Ctrl-C
        # reaches every process: process 0's stops this one's worker with its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        worker.join()
        return 0
    try:
        return serve(args, worker, images)
    finally:
        worker.stop()  # under mlx.launch, the other processes' workers too


def serve(args, worker: Worker, images: ImagePolicy) -> int:
    """Serve HTTP until Ctrl-C (process 0 alone, under mlx.launch)."""
    try:
        image_reader(worker.model)
        reads_images = True
    except ValueError:
        reads_images = False
    config = Config(
        default_max_tokens=args.max_tokens,
        template_defaults=dict(args.chat_template_args),
        api_key=args.api_key,
        allowed_origins=args.allowed_origins,
        max_request_bytes=request_limit(args, reads_images, images),
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
    )
    try:
        server = make_server(args.host, args.port, worker, config)
    except OSError as e:
        raise OSError(f"--host {args.host} --port {args.port}: cannot listen ({e.strerror or e})") from None
    if not is_local(args.host):
        print(
            f"warning: listening on {args.host}, reachable from other machines; every request there "
            "runs the model" + ("" if args.api_key else " (no --api-key set)"),
            file=sys.stderr,
        )
        if args.allow_image_urls or args.allow_image_files:
            print(
                "warning: with --allow-image-urls or --allow-image-files, requests from other machines can "
                "make this server fetch URLs (its own network's too) or read its files",
                file=sys.stderr,
            )
    host, port = server.server_address[:2]
    print(f"Serving {args.model} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main():
    args = setup_arg_parser().parse_args()
    cli.run(lambda: run_server(args), interrupted="stopped")


if __name__ == "__main__":
    main()
