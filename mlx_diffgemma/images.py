"""Images for Gemma 4's vision tower: loading them safely, and its preprocessing.

The preprocessing is transformers' Gemma 4 image processor (Gemma4ImageProcessorPil
in 5.23) redone in numpy and Pillow, so that running the model needs neither torch
nor transformers. It gives the same numbers: the tests compare against it.

1. Convert to RGB. An image with transparency (an alpha band, or a palette or
   colour marked transparent) is composited onto white; anything else is
   Pillow's plain convert("RGB").
2. Resize, keeping the aspect ratio, to the largest size whose sides are
   multiples of patch_size * pooling_kernel_size and that has at most
   max_soft_tokens * pooling_kernel_size**2 patches (PIL bicubic, on the 8-bit
   image; an image already at that size is left alone).
3. Rescale to [0, 1] (optionally normalize), cut into patch_size squares.

transformers pads every image's patches to the budget with zero rows at position
(-1, -1); we keep only the real patches, since each image is encoded on its own.

load_image turns what a user or an API request names (a path, bytes, a data URL,
an http(s) URL) into a decoded Pillow image, refusing with an ImageError, in one
line, anything too big, not an image, truncated or from a source not enabled.
"""

import base64
import binascii
import http.client
import io
import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

# The budgets transformers accepts (the ones Gemma 4 was trained with).
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)

ImageSource = Union[Image.Image, bytes, bytearray, memoryview, str, Path]


class ImageError(ValueError):
    """A problem with an image (or with a checkpoint's image-processor settings).

    The message is one line naming the image and the problem: whitespace in it,
    including any newline from a path, URL or Pillow's own message, is collapsed.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray  # [patches, channels * patch_size**2] float32, only the real patches
    position_ids: np.ndarray  # [patches, 2] int32, (x, y) of each patch in the patch grid, row by row
    soft_tokens: int  # patches // pooling_kernel_size**2: the image's tokens in the prompt


def _target_size(height: int, width: int, patch_size: int, max_patches: int, kernel: int) -> Tuple[int, int]:
    """transformers' get_aspect_ratio_preserving_size, step for step (the same float
    arithmetic, so the same rounding at the edges): (height, width) after resizing."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image of {width}x{height} pixels has zero size")
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = kernel * patch_size
    target_height = int(math.floor(factor * height / side)) * side
    target_width = int(math.floor(factor * width / side)) * side
    # A very wide or tall image: its short side would round to nothing, so it gets
    # one pooled cell and the long side the aspect ratio (in whole cells), up to
    # the longest row of cells the budget allows.
    longest = (max_patches // kernel**2) * side
    if target_height == 0 and target_width == 0:  # cannot happen with a budget of at least one cell
        raise ImageError(f"image of {width}x{height} pixels cannot be resized to whole {side}-pixel cells")
    if target_height == 0:
        target_height = side
        target_width = min(int(math.floor(width / height)) * side, longest)
    elif target_width == 0:
        target_width = side
        target_height = min(int(math.floor(height / width)) * side, longest)
    return target_height, target_width


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency over white, else convert("RGB").

    Plain convert("RGB") would keep whatever colour transparent pixels happen to
    hold (often black), so a logo on a transparent background would lose its
    background; transformers composites and so do we.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


_FIELD_TYPES = {
    "patch_size": "int",
    "max_soft_tokens": "int",
    "pooling_kernel_size": "int",
    "rescale_factor": "number",
    "do_rescale": "bool",
    "do_normalize": "bool",
    "image_mean": "triple",
    "image_std": "triple",
    "resample": "int",
    "do_convert_rgb": "bool",
}


def _check_field(name: str, value: Any) -> Tuple[Any, Optional[str]]:
    """(the value as the processor keeps it, None) or (None, what is wrong with it)."""
    kind = _FIELD_TYPES[name]
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "bool":
        return (value, None) if isinstance(value, bool) else (None, f"must be true or false, got {value!r}")
    if kind == "number":
        if not is_number(value) or value <= 0:
            return None, f"must be a positive number, got {value!r}"
        return float(value), None
    if kind == "triple":
        # transformers also takes one number for all three channels.
        values = [value] * 3 if is_number(value) else value
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(is_number(v) for v in values):
            return None, f"must be a list of 3 numbers, got {value!r}"
        if name == "image_std" and any(v == 0 for v in values):
            return None, f"must not contain 0 (it divides), got {value!r}"
        return [float(v) for v in values], None
    if not isinstance(value, int) or isinstance(value, bool):
        return None, f"must be an integer, got {value!r}"
    if name == "max_soft_tokens" and value not in SUPPORTED_SOFT_TOKENS:
        return None, f"must be one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}, got {value}"
    if name == "resample" and value not in {int(r) for r in Image.Resampling}:
        return None, f"is not a Pillow resampling filter (0 to {max(map(int, Image.Resampling))}), got {value}"
    if name != "resample" and value <= 0:
        return None, f"must be positive, got {value}"
    return value, None


@dataclass
class ImageProcessor:
    """Gemma 4's image preprocessing (defaults: transformers' Gemma4ImageProcessorPil's)."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    rescale_factor: float = 1 / 255  # 1.0 when the checkpoint says do_rescale false
    do_normalize: bool = False  # Gemma 4 was trained on pixels in [0, 1]: the identity
    image_mean: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    resample: int = int(Image.Resampling.BICUBIC)
    do_convert_rgb: bool = True

    def __post_init__(self):
        for name in _FIELD_TYPES:
            if name == "do_rescale":
                continue
            value, problem = _check_field(name, getattr(self, name))
            if problem:
                raise ImageError(f"ImageProcessor: {name} {problem}")
            setattr(self, name, value)

    @classmethod
    def from_checkpoint(cls, model_path: Union[str, Path], config: Dict[str, Any]) -> "ImageProcessor":
        """The checkpoint's image-processor settings.

        From processor_config.json's "image_processor" object, else from
        preprocessor_config.json (the order transformers reads them in); fields
        missing there come from config.json (vision_config's patch_size and
        pooling_kernel_size, vision_soft_tokens_per_image), then the defaults.
        """
        model_path = Path(model_path)
        values, source = _read_processor_settings(model_path)
        vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
        fallback = {
            "patch_size": (vision.get("patch_size"), "vision_config.patch_size"),
            "pooling_kernel_size": (vision.get("pooling_kernel_size"), "vision_config.pooling_kernel_size"),
            "max_soft_tokens": (config.get("vision_soft_tokens_per_image"), "vision_soft_tokens_per_image"),
        }
        kwargs = {}
        for name in _FIELD_TYPES:
            # A null is taken as not given (as a missing field), not as a value.
            if values.get(name) is not None:
                value, where = values[name], f"{source}: field '{name}'"
            elif fallback.get(name, (None,))[0] is not None:
                value, key = fallback[name]
                where = f"{model_path / 'config.json'}: field '{key}'"
            else:
                continue
            value, problem = _check_field(name, value)
            if problem:
                raise ImageError(f"{where} {problem}")
            kwargs[name] = value
        if kwargs.pop("do_rescale", True) is False:
            kwargs["rescale_factor"] = 1.0
        return cls(**kwargs)

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    def target_size(self, width: int, height: int) -> Tuple[int, int]:
        """(width, height) the image is resized to."""
        h, w = _target_size(height, width, self.patch_size, self.max_patches, self.pooling_kernel_size)
        return w, h

    def soft_tokens(self, width: int, height: int) -> int:
        """The image's soft tokens (its tokens in the prompt), without touching pixels."""
        w, h = self.target_size(width, height)
        return (h // self.patch_size) * (w // self.patch_size) // self.pooling_kernel_size**2

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        width, height = image.size
        target = self.target_size(width, height)
        if self.do_convert_rgb:
            image = _to_rgb(image)
            if target != image.size:
                image = image.resize(target, resample=self.resample)
            pixels = np.asarray(image)
        else:
            # transformers takes the array as it is and, to resize, makes a Pillow
            # image of it again (so a palette image's indices get resampled, as there).
            pixels = np.asarray(image)
            if pixels.dtype != np.uint8:
                raise ImageError(f"image of mode {image.mode} needs do_convert_rgb (it is not 8-bit)")
            if target != image.size:
                pixels = np.asarray(Image.fromarray(pixels).resize(target, resample=self.resample))
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]

        # Rescale as transformers does: in float64, then to float32 (one rounding).
        values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            # In float32, as transformers normalizes the float32 image.
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            values = (values - mean) / std

        # [H, W, C] -> [rows, cols, p, p, C] -> one row per patch, pixels row by
        # row and channels innermost: transformers' layout from its [C, H, W].
        p = self.patch_size
        h, w, c = values.shape
        rows, cols = h // p, w // p
        patches = values.reshape(rows, p, cols, p, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * c)
        ys, xs = np.divmod(np.arange(rows * cols, dtype=np.int32), cols)
        positions = np.stack([xs, ys], axis=-1).astype(np.int32)
        return ProcessedImage(
            pixel_values=np.ascontiguousarray(patches),
            position_ids=positions,
            soft_tokens=rows * cols // self.pooling_kernel_size**2,
        )


def _read_processor_settings(model_path: Path) -> Tuple[Dict[str, Any], Optional[Path]]:
    """(the image processor's settings, the file they came from); ({}, None) if no file."""
    processor = model_path / "processor_config.json"
    if processor.exists():
        data = _read_json_object(processor)
        if "image_processor" in data:
            settings = data["image_processor"]
            if not isinstance(settings, dict):
                raise ImageError(f"{processor}: field 'image_processor' must be an object")
            return settings, processor
    preprocessor = model_path / "preprocessor_config.json"
    if preprocessor.exists():
        return _read_json_object(preprocessor), preprocessor
    return {}, None


def _read_json_object(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ImageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, dict):
        raise ImageError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


# Loading -------------------------------------------------------------------------------------------

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_URL = re.compile(r"^data:([^,]*),", re.IGNORECASE | re.DOTALL)


def _short(text: str, limit: int = 80) -> str:
    """A URL (or a data URL) shortened for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(n: int) -> str:
    """A byte count for a message: "31.2 MB", "20 MB", "512 bytes"."""
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} bytes"


def _too_big(name: str, size: Optional[int], max_bytes: int) -> ImageError:
    if size is None:  # only the first max_bytes + 1 bytes were read
        return ImageError(f"{name} is larger than the {_size(max_bytes)} limit")
    return ImageError(f"{name} is {_size(size)}, above the {_size(max_bytes)} limit")


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has zero size ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} pixels"
        )


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The decoded image (its first frame if animated), or an ImageError."""
    # Pillow warns (then refuses) above its own pixel limit, a guard against
    # decompression bombs; we make the warning an error too. The filter is
    # process-wide state, set only for the length of the decode.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            # Open reads only the header: refuse a bomb before any pixel is decoded.
            _check_pixels(image, name, max_pixels)
            # Decode the whole (first) frame now, so a truncated or corrupt file
            # fails here with its name and not later, deep in preprocessing.
            image.load()
            if getattr(image, "n_frames", 1) > 1:
                image = image.copy()  # the first frame alone, without the file's other frames
            elif image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                # A camera's "rotate me" tag: the upright image is what was photographed
                # (as transformers' load_image gives).
                image = ImageOps.exif_transpose(image)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name} is too large to decode ({e})") from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"{name} is not an image Pillow can read (unknown or unsupported format)") from None
        except Exception as e:  # Pillow's decoders raise many kinds (OSError, SyntaxError, ValueError, ...)
            raise ImageError(f"{name} cannot be decoded, corrupt or truncated ({type(e).__name__}: {e})") from None
    return image


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; an image URL may only lead to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageError(f"{_short(req.full_url)} redirects to a {scheme}:// URL, which is not allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_HttpOnlyRedirects)


def _download(url: str, name: str, max_bytes: int, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-diffgemma", "Accept": "image/*"})
    try:
        with _opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise _too_big(name, int(length), max_bytes)
            # One byte more than the limit tells a body over it from one at it,
            # without reading (or holding) a huge body whole.
            data = response.read(max_bytes + 1)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"{name}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ImageError(f"{name} cannot be downloaded ({e.reason})") from None
    except TimeoutError:
        raise ImageError(f"{name} cannot be downloaded (timed out after {timeout:g} s)") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ImageError(f"{name} cannot be downloaded ({type(e).__name__}: {e})") from None
    if len(data) > max_bytes:
        raise _too_big(name, None, max_bytes)
    return data


def _from_data_url(url: str, name: str, max_bytes: int) -> bytes:
    match = _DATA_URL.match(url)
    if not match:
        raise ImageError(f"{name} is malformed (expected data:image/<type>;base64,<data>)")
    header = [part.strip() for part in match.group(1).split(";")]
    media_type = header[0].lower()
    if not media_type.startswith("image/"):
        raise ImageError(f"{name} has media type {media_type or '(none)'!r}, not an image/ type")
    if "base64" not in (part.lower() for part in header[1:]):
        raise ImageError(f"{name} is not base64-encoded (expected data:{media_type};base64,<data>)")
    payload = "".join(url[match.end() :].split())  # base64 may be wrapped over lines
    if len(payload) // 4 * 3 > max_bytes + 2:  # refuse before decoding: 4 characters carry 3 bytes
        raise _too_big(name, len(payload) // 4 * 3, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name} has invalid base64 data ({e})") from None
    if len(data) > max_bytes:
        raise _too_big(name, len(data), max_bytes)
    return data


def _read_file(path: Path, name: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise _too_big(name, size, max_bytes)
            data = f.read(max_bytes + 1)  # a device or a growing file can hold more than its size says
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"{name}: cannot be read (permission denied)") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot be read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise _too_big(name, None, max_bytes)
    return data


def load_image(
    source: ImageSource,
    *,
    allow_paths: bool = True,
    allow_urls: bool = True,
    max_bytes: int = 20 * 2**20,
    max_pixels: int = 50_000_000,
    timeout: float = 10.0,
    label: Optional[str] = None,
) -> Image.Image:
    """A decoded image from a PIL image, encoded bytes, a data:image/...;base64 URL,
    an http(s) URL or a local path; ImageError for any problem. ``label``
    ("image 2" in a list) names a source that has no name of its own.

    A server taking requests from others should pass allow_paths=False (a request
    must not read the server's files) and decide on allow_urls (the server would
    fetch what requests name).
    """
    if isinstance(source, Image.Image):
        _check_pixels(source, label or "image", max_pixels)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = label or "image"
        data = bytes(source)
        if len(data) > max_bytes:
            raise _too_big(name, len(data), max_bytes)
        return _decode(data, name, max_pixels)
    if isinstance(source, str) and source[:5].lower() == "data:":
        name = f"{label} (data URL)" if label else "data URL"
        return _decode(_from_data_url(source, name, max_bytes), name, max_pixels)
    if isinstance(source, str) and _URL_SCHEME.match(source):
        name = _short(source)
        scheme = _URL_SCHEME.match(source).group(1).lower()
        if scheme not in ("http", "https"):
            raise ImageError(f"{name}: URL scheme {scheme}:// is not supported (only http:// and https://)")
        if not allow_urls:
            raise ImageError(f"{name}: image URLs are not enabled here")
        return _decode(_download(source, name, max_bytes, timeout), name, max_pixels)
    if isinstance(source, (str, Path)):
        if isinstance(source, str) and not source.strip():
            raise ImageError(f"{label or 'image'}: empty image source")
        name = str(source)
        if not allow_paths:
            raise ImageError(f"{name}: local image paths are not enabled here")
        return _decode(_read_file(Path(source).expanduser(), name, max_bytes), name, max_pixels)
    raise ImageError(
        f"{label or 'image'}: unsupported source type {type(source).__name__} "
        "(expected a path, bytes, a data URL, an http(s) URL or a PIL image)"
    )


def load_images(sources: Sequence[ImageSource], *, max_images: int = 8, **kwargs) -> List[Image.Image]:
    """load_image for each source, with the same keyword arguments (a source without
    a name of its own, such as bytes, is named "image N" in messages)."""
    sources = list(sources)
    if len(sources) > max_images:
        raise ImageError(f"{len(sources)} images, above the limit of {max_images}")
    return [load_image(source, label=f"image {i}", **kwargs) for i, source in enumerate(sources, 1)]
