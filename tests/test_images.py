"""mlx_diffgemma.images: Gemma 4's image preprocessing against transformers' own
(Gemma4ImageProcessorPil, the reference it reimplements), and load_image's refusals.

Every refusal must be an ImageError with a one-line message naming the problem.
"""

import base64
import http.server
import io
import json
import struct
import threading
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    Gemma4ImageProcessorPil,
    get_aspect_ratio_preserving_size,
)

from mlx_diffgemma.images import ImageError, ImageProcessor, load_image, load_images

CHECKPOINT = Path(__file__).parent / "data" / "diffusiongemma-26B-A4B-it"

# (width, height): square, landscape, portrait, very wide, very tall, smaller than
# one pooled cell, large, and one already at the 280-token target (not resized).
SIZES = [(64, 64), (640, 480), (480, 640), (1200, 37), (37, 1200), (20, 20), (3000, 2000), (672, 960)]
# So wide or tall that the short side rounds to no cell at all: one row (column) of cells.
SIZES += [(3000, 7), (7, 3000)]
MODES = ["RGB", "RGBA", "L", "P", "LA", "P+transparency"]


def random_image(width, height, mode, seed=0):
    rng = np.random.default_rng([width, height, MODES.index(mode), seed])
    base = "P" if mode.startswith("P") else mode
    bands = len(Image.new(base, (1, 1)).getbands())
    image = Image.frombytes(base, (width, height), rng.integers(0, 256, (height, width, bands), np.uint8).tobytes())
    if base == "P":
        image.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
    if mode == "P+transparency":
        image.info["transparency"] = 7  # palette entry 7 transparent: composited onto white
    return image


def reference(processor, image):
    """transformers' output for one image, its padding rows (position (-1, -1)) dropped."""
    out = processor(images=[image], return_tensors="np")
    pixels, positions = np.asarray(out["pixel_values"])[0], np.asarray(out["image_position_ids"])[0]
    real = ~(positions == -1).all(axis=-1)
    assert (positions[~real] == -1).all() and (pixels[~real] == 0).all()
    assert real[: real.sum()].all()  # the real patches come first
    return pixels[real], positions[real], int(out["num_soft_tokens_per_image"][0])


def assert_same(ours, ref, atol=1e-6):
    pixels, positions, soft = ref
    assert ours.pixel_values.dtype == np.float32 and ours.position_ids.dtype == np.int32
    assert ours.pixel_values.shape == pixels.shape
    np.testing.assert_allclose(ours.pixel_values, pixels.astype(np.float32), rtol=0, atol=atol)
    np.testing.assert_array_equal(ours.position_ids, positions)
    assert ours.soft_tokens == soft == len(pixels) // 9


@pytest.fixture(scope="module")
def references():
    return {n: Gemma4ImageProcessorPil(max_soft_tokens=n) for n in (70, 280)}


# Preprocessing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_soft_tokens", [280, 70])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_matches_transformers(references, size, mode, max_soft_tokens):
    image = random_image(*size, mode)
    ours = ImageProcessor(max_soft_tokens=max_soft_tokens).preprocess(image)
    assert_same(ours, reference(references[max_soft_tokens], image))
    assert ours.soft_tokens == ImageProcessor(max_soft_tokens=max_soft_tokens).soft_tokens(*size)
    assert ours.soft_tokens <= max_soft_tokens
    if size == (672, 960) and max_soft_tokens == 280:
        assert ours.soft_tokens == 280  # already the target size: no resampling, every pixel as given


def test_transparency_is_composited_onto_white():
    # A fully transparent black image is white to the model, as in transformers.
    image = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    assert (ImageProcessor().preprocess(image).pixel_values == 1.0).all()


def test_patch_layout_and_positions():
    # An image already at its target size (not resized) whose pixels say where they
    # are: each patch holds its own pixels, row by row, channels innermost.
    width, height = 480, 336  # 30 x 21 patches of 16 = 630 = 70 soft tokens of 3 x 3
    processor = ImageProcessor(max_soft_tokens=70, rescale_factor=1.0)
    assert processor.target_size(width, height) == (width, height)
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs % 256, ys % 256, (xs // 3 + ys) % 256], axis=-1).astype(np.uint8)
    out = processor.preprocess(Image.fromarray(rgb))
    assert out.pixel_values.shape == (630, 3 * 16 * 16) and out.soft_tokens == 70
    for i, (x, y) in enumerate(out.position_ids):
        assert i == y * 30 + x
        patch = out.pixel_values[i].reshape(16, 16, 3)
        np.testing.assert_array_equal(patch, rgb[y * 16 : y * 16 + 16, x * 16 : x * 16 + 16])


def test_normalize_and_no_rescale_match_transformers():
    image = random_image(640, 480, "RGBA")
    options = dict(do_normalize=True, image_mean=[0.5, 0.25, 0.125], image_std=[0.2, 0.3, 0.7])
    ours = ImageProcessor(**options).preprocess(image)
    assert_same(ours, reference(Gemma4ImageProcessorPil(**options), image), atol=1e-5)
    ours = ImageProcessor(rescale_factor=1.0).preprocess(image)
    assert ours.pixel_values.max() > 1
    assert_same(ours, reference(Gemma4ImageProcessorPil(do_rescale=False), image))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_without_rgb_conversion_matches_transformers(mode):
    image = random_image(480, 640, mode)
    ours = ImageProcessor(do_convert_rgb=False).preprocess(image)
    assert ours.pixel_values.shape[1] == len(image.getbands()) * 256
    assert_same(ours, reference(Gemma4ImageProcessorPil(do_convert_rgb=False), image))


def test_soft_tokens_match_transformers_for_many_sizes():
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (1, 10_000), (10_000, 1), (47, 48), (48, 47), (960, 672), (4000, 3000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)]
    sizes += [tuple(int(v) for v in rng.integers(1, 40, 2)) for _ in range(50)]
    for budget in (70, 140, 280, 560, 1120):
        processor = ImageProcessor(max_soft_tokens=budget)
        for width, height in sizes:
            h, w = get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
            assert processor.target_size(width, height) == (w, h)
            assert processor.soft_tokens(width, height) == (h // 16) * (w // 16) // 9 <= budget


def test_processor_refuses_bad_settings_and_empty_images():
    with pytest.raises(ImageError, match="max_soft_tokens"):
        ImageProcessor(max_soft_tokens=100)
    with pytest.raises(ImageError, match="zero size"):
        ImageProcessor().soft_tokens(0, 10)


# from_checkpoint ------------------------------------------------------------------------------------


def write_json(path, value):
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def test_from_checkpoint_reads_processor_config(tmp_path):
    settings = {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 140, "patch_size": 16}
    write_json(tmp_path / "processor_config.json", {"image_processor": settings, "image_seq_length": 140})
    config = {"vision_soft_tokens_per_image": 560, "vision_config": {"patch_size": 14, "pooling_kernel_size": 2}}
    processor = ImageProcessor.from_checkpoint(tmp_path, config)
    assert (processor.max_soft_tokens, processor.patch_size, processor.pooling_kernel_size) == (140, 16, 2)
    assert processor.rescale_factor == 1 / 255 and processor.do_convert_rgb and not processor.do_normalize


def test_from_checkpoint_falls_back_to_config_then_defaults(tmp_path):
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert ImageProcessor.from_checkpoint(CHECKPOINT, config) == ImageProcessor()
    processor = ImageProcessor.from_checkpoint(tmp_path, {"vision_soft_tokens_per_image": 560})
    assert processor.max_soft_tokens == 560 and processor.patch_size == 16
    assert ImageProcessor.from_checkpoint(tmp_path, {}) == ImageProcessor()
    # A processor_config.json without an image processor (text only) is passed over.
    write_json(tmp_path / "processor_config.json", {"processor_class": "Gemma4Processor"})
    write_json(tmp_path / "preprocessor_config.json", {"max_soft_tokens": 1120, "do_rescale": False})
    processor = ImageProcessor.from_checkpoint(tmp_path, {"vision_soft_tokens_per_image": 70})
    assert processor.max_soft_tokens == 1120 and processor.rescale_factor == 1.0


def test_from_checkpoint_matches_transformers_reading_the_same_file(tmp_path):
    settings = {
        "max_soft_tokens": 70,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
    }
    write_json(tmp_path / "processor_config.json", {"image_processor": settings})
    ours = ImageProcessor.from_checkpoint(tmp_path, {})
    assert ours.resample == 2 and ours.do_normalize
    image = random_image(640, 480, "RGB")
    assert_same(ours.preprocess(image), reference(Gemma4ImageProcessorPil.from_pretrained(tmp_path), image))


@pytest.mark.parametrize(
    "file, text, words",
    [
        ("processor_config.json", '{"image_processor": {"max_soft_tokens": 28', ["not valid JSON"]),
        ("processor_config.json", {"image_processor": {"max_soft_tokens": 100}}, ["max_soft_tokens", "100"]),
        ("processor_config.json", {"image_processor": [1, 2]}, ["image_processor", "object"]),
        ("processor_config.json", [1, 2], ["JSON object"]),
        ("preprocessor_config.json", {"patch_size": "16"}, ["patch_size", "integer"]),
        ("preprocessor_config.json", {"do_normalize": "yes"}, ["do_normalize"]),
        ("preprocessor_config.json", {"image_std": [1, 0, 1]}, ["image_std"]),
        ("preprocessor_config.json", {"image_mean": [0.5, 0.5]}, ["image_mean", "3 numbers"]),
        ("preprocessor_config.json", {"resample": 99}, ["resample"]),
    ],
)
def test_from_checkpoint_refuses_malformed_files(tmp_path, file, text, words):
    path = write_json(tmp_path / file, text)
    assert_refused(lambda: ImageProcessor.from_checkpoint(tmp_path, {}), str(path), *words)


def test_from_checkpoint_refuses_unsupported_budget_in_config(tmp_path):
    assert_refused(
        lambda: ImageProcessor.from_checkpoint(tmp_path, {"vision_soft_tokens_per_image": 300}),
        "config.json",
        "vision_soft_tokens_per_image",
        "300",
    )


# load_image -----------------------------------------------------------------------------------------


def assert_refused(call, *words):
    with pytest.raises(ImageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


def encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header(width, height):
    """A PNG whose header declares width x height but holds almost no pixel data:
    decoding it would fail, so a refusal for its size shows it was not decoded."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def picture():
    return random_image(40, 30, "RGB")


@pytest.fixture(scope="module")
def png(picture):
    return encode(picture, "PNG")


def data_url(data, media_type="image/png"):
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def test_load_png_and_jpeg_from_path_bytes_and_data_url(tmp_path, picture, png):
    jpeg = encode(picture, "JPEG", quality=95)
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "a.jpg").write_bytes(jpeg)
    for source in [tmp_path / "a.png", str(tmp_path / "a.png"), png, bytearray(png), data_url(png)]:
        image = load_image(source)
        assert image.size == (40, 30) and image.format == "PNG"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(picture))
    for source in [tmp_path / "a.jpg", jpeg, data_url(jpeg, "image/jpeg")]:
        image = load_image(source)
        assert image.size == (40, 30) and image.mode == "RGB" and image.format == "JPEG"
    # base64 wrapped over lines, as some encoders write it
    wrapped = "data:image/png;base64," + base64.encodebytes(png).decode()
    assert "\n" in wrapped and load_image(wrapped).size == (40, 30)
    image = Image.new("RGBA", (5, 5))
    assert load_image(image) is image


def test_load_refuses_bad_files(tmp_path, png):
    assert_refused(lambda: load_image(tmp_path / "missing.png"), "missing.png", "no such file")
    assert_refused(lambda: load_image(str(tmp_path / "bad\nname.png")), "no such file")
    assert_refused(lambda: load_image(tmp_path), str(tmp_path), "directory")
    (tmp_path / "text.png").write_text("this is not a picture\n" * 10)
    assert_refused(lambda: load_image(tmp_path / "text.png"), "text.png", "not an image")
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    assert Image.open(tmp_path / "half.png").size == (40, 30)  # the header is whole: only decoding finds it
    assert_refused(lambda: load_image(tmp_path / "half.png"), "half.png", "truncated")
    jpeg = encode(random_image(64, 48, "RGB"), "JPEG")
    assert Image.open(io.BytesIO(jpeg[: len(jpeg) // 2])).size == (64, 48)
    assert_refused(lambda: load_image(jpeg[: len(jpeg) // 2]), "image", "truncated")
    assert_refused(lambda: load_image(b""), "not an image")
    assert_refused(lambda: load_image(""), "empty")
    assert_refused(lambda: load_image(12), "unsupported source type int")


def test_load_refuses_bad_data_urls(png):
    assert_refused(lambda: load_image("data:image/png;base64,!!not*base64!!"), "data URL", "base64")
    assert_refused(lambda: load_image(data_url(b"hello", "text/plain")), "data URL", "text/plain")
    assert_refused(lambda: load_image("data:image/png," + "x" * 10), "data URL", "base64")
    assert_refused(lambda: load_image("data:image/png;base64"), "data URL", "malformed")
    assert_refused(lambda: load_image(data_url(b"not a png")), "data URL", "not an image")
    assert_refused(lambda: load_image(data_url(png), max_bytes=100), "data URL", "above the 100 bytes limit")


def test_load_refuses_too_many_bytes(tmp_path, png):
    (tmp_path / "a.png").write_bytes(png)
    assert_refused(lambda: load_image(png, max_bytes=len(png) - 1), "limit")
    message = assert_refused(lambda: load_image(tmp_path / "a.png", max_bytes=100), "a.png", "above the")
    assert "is 3.6 KB, above the 100 bytes limit" in message and len(png) == 3698
    assert load_image(png, max_bytes=len(png)).size == (40, 30)
    big = b"\0" * (31 * 2**20 + 2**18)
    assert_refused(lambda: load_image(big), "is 31.2 MB, above the 20 MB limit")


def test_load_refuses_decompression_bombs_without_decoding(png):
    filters = list(warnings.filters)
    # Above our limit (and below Pillow's): refused from the header alone.
    assert_refused(lambda: load_image(png_header(8000, 8000)), "8000x8000", "pixels", "limit")
    # Above Pillow's own limits, ours raised: Pillow's warning and its error become ImageErrors.
    assert_refused(lambda: load_image(png_header(12000, 8000), max_pixels=10**12), "too large to decode")
    assert_refused(lambda: load_image(png_header(30000, 30000), max_pixels=10**12), "too large to decode")
    assert warnings.filters == filters
    # The header is read: with a higher limit the same file fails at decoding instead.
    assert_refused(lambda: load_image(png_header(3000, 3000)), "truncated")
    assert_refused(lambda: load_image(png, max_pixels=40 * 30 - 1), "40x30", "pixels")
    assert_refused(lambda: load_image(Image.new("RGB", (100, 100)), max_pixels=5000), "pixels")
    assert_refused(lambda: load_image(Image.new("RGB", (0, 0))), "zero size")


def test_load_takes_the_first_frame_of_an_animation():
    frames = [Image.new("RGB", (20, 10), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for fmt in ("GIF", "WEBP", "PNG"):
        data = encode(
            frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {})
        )
        assert Image.open(io.BytesIO(data)).n_frames == 3
        image = load_image(data)
        assert getattr(image, "n_frames", 1) == 1 and image.size == (20, 10)
        assert image.convert("RGB").getpixel((5, 5)) == (255, 0, 0)
        assert ImageProcessor().preprocess(image).soft_tokens > 0


def test_load_applies_the_exif_orientation(picture):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image = load_image(encode(picture, "JPEG", exif=exif))
    assert image.size == (30, 40)


def test_load_refuses_other_schemes_and_disabled_sources(tmp_path, png):
    (tmp_path / "a.png").write_bytes(png)
    assert_refused(lambda: load_image((tmp_path / "a.png").as_uri()), "file://", "not supported")
    assert_refused(lambda: load_image("ftp://example.com/a.png"), "ftp://", "not supported")
    assert_refused(lambda: load_image("https://example.com/a.png", allow_urls=False), "example.com", "not enabled")
    long_url = "http://example.com/" + "a" * 500 + ".png"
    message = assert_refused(lambda: load_image(long_url, allow_urls=False), "URLs are not enabled")
    assert len(message) < 160 and "..." in message
    assert_refused(lambda: load_image(tmp_path / "a.png", allow_paths=False), "a.png", "paths are not enabled")
    assert_refused(lambda: load_image(str(tmp_path / "a.png"), allow_paths=False), "paths are not enabled")
    # Bytes and data URLs need neither.
    assert load_image(data_url(png), allow_paths=False, allow_urls=False).size == (40, 30)


# http -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(png):
    big = b"\0" * 50_000
    routes = {
        "/a.png": (200, {"Content-Length": str(len(png)), "Content-Type": "image/png"}, png),
        "/big": (200, {"Content-Length": str(len(big))}, big),
        "/big-unsized": (200, {}, big),  # no length: read until the server closes
        "/missing": (404, {}, b"not found"),
        "/to-png": (302, {"Location": "/a.png"}, b""),
        "/to-ftp": (302, {"Location": "ftp://127.0.0.1/a.png"}, b""),
    }
    endless = {"sent": 0, "done": threading.Event()}  # what /endless wrote before the client hung up

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/endless":
                return self.endless()
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading at its limit

        def endless(self):
            # 128 MB with no length, written until the client hangs up.
            self.send_response(200)
            self.end_headers()
            chunk = b"\0" * 2**16
            try:
                for _ in range(2**11):
                    self.wfile.write(chunk)
                    endless["sent"] += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                endless["done"].set()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", endless=endless)
    httpd.shutdown()
    httpd.server_close()


def test_load_from_http(server, picture, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    endless, server = server.endless, server.url
    image = load_image(server + "/a.png")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(picture))
    assert load_image(server + "/to-png").size == (40, 30)
    assert_refused(
        lambda: load_image(server + "/big", max_bytes=1000), "/big", "is 48.8 KB, above the 1000 bytes limit"
    )
    assert_refused(
        lambda: load_image(server + "/big-unsized", max_bytes=1000), "/big-unsized", "larger than the 1000 bytes limit"
    )
    assert_refused(lambda: load_image(server + "/missing"), "/missing", "404")
    assert_refused(lambda: load_image(server + "/to-ftp"), "ftp://", "not allowed")
    assert_refused(lambda: load_image(server + "/a.png", allow_urls=False), "not enabled")
    # A body without end is refused after max_bytes + 1 bytes, not read whole.
    assert_refused(lambda: load_image(server + "/endless", max_bytes=1000), "larger than the 1000 bytes limit")
    assert endless["done"].wait(10)
    assert endless["sent"] < 2**25, endless["sent"]  # what the sockets' buffers took, not the 128 MB
    # A port nobody listens on.
    assert_refused(lambda: load_image("http://127.0.0.1:9/a.png", timeout=2), "cannot be downloaded")


# load_images ----------------------------------------------------------------------------------------


def test_load_images(png):
    assert [image.size for image in load_images([png, data_url(png)])] == [(40, 30)] * 2
    assert_refused(lambda: load_images([png] * 9), "9 images, above the limit of 8")
    assert len(load_images([png] * 3, max_images=3)) == 3
    assert_refused(lambda: load_images([png, b"junk"]), "image 2", "not an image")
    assert_refused(lambda: load_images([png, data_url(b"x", "text/plain")]), "image 2 (data URL)", "text/plain")
    assert_refused(lambda: load_images([png, png], max_bytes=10), "image 1", "limit")
    assert_refused(lambda: load_images(["x.png"], allow_paths=False), "x.png", "not enabled")
