"""generate --image and chat's /image, run as a user runs them, against the library."""

import os
import subprocess
import sys

import pytest
from vision_checkpoint import picture, png, write_vision_checkpoint

from mlx_diffgemma import chat, generate, load

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
KW = dict(max_tokens=32, max_denoising_steps=3, seed=5)
FLAGS = ["--max-tokens", "32", "--max-denoising-steps", "3", "--seed", "5"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("image_cli")
    write_vision_checkpoint(path)
    images = path / "pictures"
    images.mkdir()
    for i in range(2):
        (images / f"p{i}.png").write_bytes(png(picture(i)))
    model, tokenizer = load(str(path))
    return path, images, model, tokenizer


def run(*args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)], input=stdin, capture_output=True, text=True, env=ENV, timeout=300
    )


def ask(text, *images):
    return [
        {
            "role": "user",
            "content": [*({"type": "image", "image": str(i)} for i in images), {"type": "text", "text": text}],
        }
    ]


def test_generate_reads_its_images_as_the_library_does(checkpoint):
    path, images, model, tokenizer = checkpoint
    a, b = images / "p0.png", images / "p1.png"
    r = run("mlx_diffgemma.generate", "--model", path, "--image", a, b, "--prompt", "Compare them.", *FLAGS)
    assert r.returncode == 0, r.stderr
    want = chat(model, tokenizer, ask("Compare them.", a, b), **KW).text
    assert r.stdout == want + "\n"
    # Repeated flags are the same list.
    again = run(
        "mlx_diffgemma.generate", "--model", path, "--image", a, "--image", b, "--prompt", "Compare them.", *FLAGS
    )
    assert again.stdout == r.stdout
    # The raw prompt takes its image where it writes <|image|>.
    raw = run(
        "mlx_diffgemma.generate", "--model", path, "--ignore-chat-template", "--image", a,
        "--prompt", "<|image|>A picture of", *FLAGS,
    )  # fmt: skip
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == generate(model, tokenizer, "<|image|>A picture of", images=[str(a)], **KW) + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "missing.png"),
        (["--image", "not-an-image.png"], "not-an-image.png"),
        (["--image", "ftp://example.com/a.png"], "ftp"),
        (["--image", "p0.png", "--suffix", "end"], "--image cannot be used with --suffix"),
        (["--ignore-chat-template", "--image", "p0.png"], "0 image place"),
    ],
)
def test_generate_refuses_bad_images_in_one_line(checkpoint, args, message):
    path, images, _, _ = checkpoint
    (images / "not-an-image.png").write_text("hello")
    args = [str(images / a) if a.endswith(".png") else a for a in args]
    r = run("mlx_diffgemma.generate", "--model", path, "--prompt", "hi", *args, *FLAGS)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_chat_attaches_images_to_the_next_message(checkpoint):
    path, images, model, tokenizer = checkpoint
    a = images / "p0.png"
    stdin = f"/image {images / 'missing.png'}\n/image {a}\nWhat is it?\n"
    r = run("mlx_diffgemma.chat", "--model", path, *FLAGS, stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert "[image not attached:" in r.stdout and "missing.png" in r.stdout
    assert "[image attached to your next message:" in r.stdout
    want = chat(model, tokenizer, ask("What is it?", a), **KW).text
    assert want in r.stdout
    # --image attaches to the first message the same way.
    r2 = run("mlx_diffgemma.chat", "--model", path, "--image", a, *FLAGS, stdin="What is it?\n")
    assert r2.returncode == 0, r2.stderr
    assert want in r2.stdout
