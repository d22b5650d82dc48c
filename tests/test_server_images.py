"""Images in chat requests, as apps send them: OpenAI's ``image_url`` parts,
through a server subprocess on the tiny vision checkpoint and OpenAI's own
client. Answers are compared with the library's ``chat`` on the same messages
and seed, in-process; every bad image is a 400 naming its part."""

import base64
import json
import re
import shutil
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlx.core as mx
import pytest
from openai import APIStatusError, OpenAI
from reference import CANVAS
from server_process import launch
from vision_checkpoint import picture, png, write_vision_checkpoint

from mlx_diffgemma import load
from mlx_diffgemma.chat import ChatCache, chat
from mlx_diffgemma.chat_template import render
from mlx_diffgemma.cli.server import DEFAULT_REQUEST_BYTES, request_limit, setup_arg_parser
from mlx_diffgemma.image_prompts import place_images, prepare_images, split_message_images
from mlx_diffgemma.server.conversations import Conversations
from mlx_diffgemma.server.images import ImagePolicy, request_bytes_for
from mlx_diffgemma.server.output import ChatOutput

MODEL_ID = "tiny-vision"
TEXT_ID = "tiny-text"
KW = dict(max_tokens=CANVAS, max_denoising_steps=3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The vision checkpoint, and the same without its vision tensors (text only)."""
    root = tmp_path_factory.mktemp("server_images")
    vision = root / MODEL_ID
    vision.mkdir()
    write_vision_checkpoint(vision)
    text = root / TEXT_ID
    text.mkdir()
    for f in vision.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, text / f.name)
    weights = {k: v for k, v in mx.load(str(vision / "model.safetensors")).items() if "vision" not in k}
    mx.save_safetensors(str(text / "model.safetensors"), weights)
    return vision, text


@pytest.fixture(scope="module")
def reference(checkpoints):
    return load(str(checkpoints[0]))


class Server:
    def __init__(self, proc, url):
        self.proc, self.url = proc, url

    def client(self):
        return OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)


def serving(model_dir, *extra):
    # Requests for 127.0.0.1 (the picture server) must not go through a proxy.
    proc, url = launch(
        model_dir.name, model_dir.parent, *extra, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost"
    )
    yield Server(proc, url)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoints):
    """The defaults: data: URLs only; at most 2 images of 16 KiB each."""
    yield from serving(checkpoints[0], "--max-images", "2", "--max-image-bytes", "16KiB")


@pytest.fixture(scope="module")
def open_server(checkpoints):
    """URLs and files allowed; bodies of at most 64 KiB."""
    yield from serving(checkpoints[0], "--allow-image-urls", "--allow-image-files", "--max-request-bytes", "64KiB")


@pytest.fixture(scope="module")
def text_server(checkpoints):
    yield from serving(checkpoints[1])


@pytest.fixture(scope="module")
def pictures():
    """A local http server holding pictures: /N.png is picture(N)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            match = re.fullmatch(r"/(\d+)\.png", self.path)
            if not match:
                self.send_error(404)
                return
            data = png(picture(int(match.group(1))))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def data_url(data: bytes, media_type="image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def image_part(url, plain=False):
    return {"type": "image_url", "image_url": url if plain else {"url": url}}


def ask(text, *urls):
    return {"role": "user", "content": [*(image_part(u) for u in urls), {"type": "text", "text": text}]}


def answer_of(raw: str) -> str:
    """The content OpenAI clients get for generated text."""
    output = ChatOutput()
    content = output.feed(raw).get("content", "")
    return content + output.finish().get("content", "")


def create(server, messages, seed, **kw):
    return server.client().chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=KW["max_tokens"],
        seed=seed,
        extra_body={"max_denoising_steps": KW["max_denoising_steps"]},
        **kw,
    )


def library(reference, messages, seed, chat_cache=None):
    model, tokenizer = reference
    return chat(model, tokenizer, messages, chat_cache=chat_cache, seed=seed, **KW)


def prompt_length(reference, messages, *pictures):
    """The prompt's tokens as the model reads them: each image its span."""
    model, tokenizer = reference
    ids = render(tokenizer, split_message_images(messages)[0], True)
    return len(place_images(model, ids, prepare_images(model, list(pictures))))


# -- Answers ---------------------------------------------------------------------------


def test_a_chat_with_an_image_equals_the_library_s(server, reference):
    messages = [ask("What is in the picture?", data_url(png(picture(1))))]
    want = library(reference, messages, seed=3)
    r = create(server, messages, seed=3)
    assert r.choices[0].message.content == answer_of(want.text)
    assert r.usage.completion_tokens == want.last.generation_tokens
    assert r.usage.prompt_tokens == prompt_length(reference, messages, picture(1)) == want.prompt_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # Streamed, the same; and image_url given as the URL itself is the same part.
    messages[0]["content"][0] = image_part(data_url(png(picture(1))), plain=True)
    chunks = list(create(server, messages, seed=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer_of(want.text)


def test_the_answer_depends_on_the_image(server, reference):
    one = [ask("Describe it.", data_url(png(picture(4))))]
    other = [ask("Describe it.", data_url(png(picture(5))))]  # the same size: the same prompt ids
    a, b = create(server, one, seed=1), create(server, other, seed=1)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content != b.choices[0].message.content
    assert b.choices[0].message.content == answer_of(library(reference, other, seed=1).text)


def test_n_rows_share_the_images(server, reference):
    messages = [ask("Again?", data_url(png(picture(6))))]
    r = create(server, messages, seed=20, n=2)
    for row, choice in enumerate(r.choices):
        # Row r draws from seed + r, as a batch row does in generate.
        assert choice.message.content == answer_of(library(reference, messages, seed=20 + row).text)


def test_a_follow_up_reuses_the_cache_only_with_the_same_images(server, reference):
    first = [ask("Look at this.", data_url(png(picture(7))))]
    one = create(server, first, seed=5)
    lib_one = library(reference, first, seed=5)
    assert one.choices[0].message.content == answer_of(lib_one.text)
    answer = {"role": "assistant", "content": one.choices[0].message.content}

    # The first picture replaced by another of the same size: the same ids, another conversation.
    replaced = [ask("Look at this.", data_url(png(picture(8)))), answer, ask("And now?")]
    r = create(server, replaced, seed=6)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.choices[0].message.content == answer_of(library(reference, replaced, seed=6).text)

    follow = first + [answer, ask("And now?")]
    r = create(server, follow, seed=6)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached > prompt_length(reference, first, picture(7))  # the first turn, its image and answer
    assert r.usage.prompt_tokens == prompt_length(reference, follow, picture(7))
    # What the library's chat makes of the same turn on its own cache of the first.
    want = library(reference, follow, seed=6, chat_cache=lib_one.chat_cache)
    assert r.usage.prompt_tokens - cached == want.prompt_tokens
    assert r.choices[0].message.content == answer_of(want.text)

    # The next turn brings another image: the cache is taken, only that image encoded after it.
    third = follow + [{"role": "assistant", "content": r.choices[0].message.content}]
    third.append(ask("And this one?", data_url(png(picture(9)))))
    r = create(server, third, seed=8)
    assert r.usage.prompt_tokens == prompt_length(reference, third, picture(7), picture(9))
    assert r.usage.prompt_tokens_details.cached_tokens > prompt_length(reference, follow, picture(7))
    want = library(reference, third, seed=8, chat_cache=want.chat_cache)
    assert r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens == want.prompt_tokens
    assert r.choices[0].message.content == answer_of(want.text)


def test_conversations_are_keyed_by_their_images():
    store = Conversations(4)
    store.put([1, 2, 9, 3], ChatCache(None, messages=2, stop_token=9, images=["a"]))
    assert store.take([1, 2, 9, 3, 4, 5], ["b"]) is None
    assert store.take([1, 2, 9, 3, 4, 5], []) is None
    taken = store.take([1, 2, 9, 3, 4, 5], ["a", "c"])
    assert taken is not None and taken[1] == [3, 4, 5]


# -- Bad images -------------------------------------------------------------------------


def huge_png(width=10000, height=8000) -> bytes:
    """A PNG whose header says 80 million pixels (its data is a few bytes)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


URL = "messages[0].content[0].image_url.url"
BAD = [
    ("corrupt PNG", [image_part(data_url(png(picture(1))[:120]))], URL, "corrupt or truncated"),
    ("not an image", [image_part(data_url(b"hello, world"))], URL, "not an image"),
    ("text/plain data URL", [image_part(data_url(b"hello", "text/plain"))], URL, "'text/plain', not an image"),
    ("bad base64", [image_part("data:image/png;base64,@@@@")], URL, "invalid base64"),
    ("too large", [image_part(data_url(png(picture(1, (128, 128)))))], URL, "above the 16 KB limit"),
    ("too many pixels", [image_part(data_url(huge_png()))], URL, "80,000,000 pixels, above the limit"),
    ("http URL", [image_part("http://127.0.0.1:9/a.png")], URL, "--allow-image-urls"),
    ("file path", [image_part("/etc/hostname")], URL, "--allow-image-files"),
    ("file URL", [image_part("file:///etc/hostname")], URL, "--allow-image-files"),
    ("other scheme", [image_part("ftp://example.com/a.png")], URL, "ftp:// is not supported"),
    (
        "too many images",
        [image_part(data_url(png(picture(i)))) for i in range(3)],
        "messages[0].content[2].image_url.url",
        "3 images, more than this server's limit of 2 (--max-images)",
    ),
    ("no url", [{"type": "image_url", "image_url": {"detail": "low"}}], URL, "is required"),
    ("no image_url", [{"type": "image_url"}], "messages[0].content[0].image_url", "is required"),
    ("url not a string", [{"type": "image_url", "image_url": {"url": 5}}], URL, "must be a string (got number)"),
    ("empty url", [image_part(" ")], URL, "is empty"),
    ("unknown part", [{"type": "input_audio", "input_audio": {}}], "messages[0].content[0]", "got input_audio"),
    ("text part without text", [{"type": "text"}], "messages[0].content[0]", "without a 'text' string"),
]


@pytest.mark.parametrize("name, content, param, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_image_is_a_400_naming_its_part(server, name, content, param, message):
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "What is it?"}]}]
    with pytest.raises(APIStatusError) as e:
        create(server, messages, seed=0)
    error = e.value.body
    assert e.value.status_code == 400, error
    assert message in error["message"] and f"'{param}'" in error["message"], error
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "\n" not in error["message"] and "Traceback" not in error["message"]


def test_images_only_in_user_messages(server):
    messages = [
        {"role": "system", "content": [image_part(data_url(png(picture(1))))]},
        {"role": "user", "content": "hi"},
    ]
    with pytest.raises(APIStatusError) as e:
        create(server, messages, seed=0)
    assert e.value.status_code == 400 and "only be sent in user messages" in e.value.body["message"]
    assert e.value.body["param"] == "messages[0].content[0]"
    # ... and the server keeps serving.
    r = create(server, [ask("Still there?", data_url(png(picture(2))))], seed=0)
    assert r.choices[0].finish_reason in ("stop", "length")


# -- Sources a server allows -------------------------------------------------------------------


def test_urls_and_files_when_allowed(open_server, reference, pictures, tmp_path):
    want = answer_of(library(reference, [ask("What is it?", data_url(png(picture(3))))], seed=2).text)
    path = tmp_path / "three.png"
    path.write_bytes(png(picture(3)))
    for url in (f"{pictures}/3.png", str(path), path.as_uri()):
        r = create(open_server, [ask("What is it?", url)], seed=2)
        assert r.choices[0].message.content == want, url
    with pytest.raises(APIStatusError) as e:
        create(open_server, [ask("What is it?", f"{pictures}/missing")], seed=2)
    assert e.value.status_code == 400 and "HTTP 404" in e.value.body["message"]
    with pytest.raises(APIStatusError) as e:
        create(open_server, [ask("What is it?", str(tmp_path / "nothing.png"))], seed=2)
    assert e.value.status_code == 400 and "no such file" in e.value.body["message"]


def test_a_body_beyond_the_limit_is_a_413_naming_it(open_server):
    big = data_url(png(picture(1, (160, 160))))  # ~100 KB as base64
    assert len(big) > 64 * 1024
    with pytest.raises(APIStatusError) as e:
        create(open_server, [ask("What is it?", big)], seed=0)
    assert e.value.status_code == 413
    assert "--max-request-bytes" in e.value.body["message"] and str(64 * 1024) in e.value.body["message"]


def test_the_default_body_limit_carries_the_images():
    parser = setup_arg_parser()
    args = parser.parse_args([])
    policy = ImagePolicy(max_images=args.max_images, max_bytes=args.max_image_bytes)
    limit = request_limit(args, True, policy)
    image = json.dumps({"type": "image_url", "image_url": {"url": data_url(b"\0" * args.max_image_bytes)}})
    assert limit >= args.max_images * len(image) and limit == request_bytes_for(policy)
    assert request_limit(args, False, policy) == DEFAULT_REQUEST_BYTES  # a text-only model
    args = parser.parse_args(["--max-request-bytes", "1MiB"])
    assert request_limit(args, True, policy) == 2**20
    help = parser.format_help()
    for flag in ("--allow-image-urls", "--allow-image-files", "--max-images", "--max-image-bytes"):
        assert flag in help


def test_a_text_only_checkpoint_refuses_images(text_server):
    client = text_server.client()
    with pytest.raises(APIStatusError) as e:
        client.chat.completions.create(
            model=TEXT_ID, messages=[ask("What is it?", data_url(png(picture(1))))], max_tokens=8
        )
    assert e.value.status_code == 400
    assert "reads text only" in e.value.body["message"] and e.value.body["code"] == "images_not_supported"
    assert e.value.body["param"] == URL
    r = client.chat.completions.create(model=TEXT_ID, messages=[ask("Text, then.")], max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")
