"""Images in prompts: where each goes among the ids, and what takes its place.

The chat template writes one image token (``<|image|>``) where an image goes;
here that place becomes the image's span, ``<|image>``, one image token per
soft token, ``<image|>`` (as transformers' processor expands it), and the
vision tower's output for the image is what the encoder reads at those
tokens.
"""

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .images import ImageError, ImageProcessor, ProcessedImage, load_images
from .model import Model

MAX_IMAGES = 8  # per prompt, by default


@dataclass
class PromptImage:
    processed: ProcessedImage
    digest: str  # of the decoded pixels: the same picture, whatever file it came in

    @property
    def soft_tokens(self) -> int:
        return self.processed.soft_tokens


def image_reader(model: Model) -> ImageProcessor:
    """The model's image processor, or a ValueError when it reads text only."""
    processor = getattr(model, "image_processor", None)
    if model.args.vision is None or processor is None:
        raise ValueError(f"{model.path or 'the model'} has no vision tower: it reads text only, not images")
    return processor


def prepare_images(model: Model, sources: Sequence[Any], max_images: int = MAX_IMAGES, **load) -> List[PromptImage]:
    """Load and preprocess ``sources`` (paths, URLs, data URLs, bytes or PIL
    images; ``load`` as ``images.load_image`` takes it)."""
    processor = image_reader(model)
    ready = [s for s in sources if isinstance(s, PromptImage)]
    if ready:
        if len(ready) != len(sources):
            raise ValueError("images are either all prepared (PromptImage) or all sources")
        return list(ready)
    images = load_images(sources, max_images=max_images, **load)
    out = []
    for i, image in enumerate(images, 1):
        try:
            processed = processor.preprocess(image)
        except ImageError:
            raise
        except ValueError as e:  # too small or too thin to resize to the patch grid
            raise ImageError(f"image {i} ({image.width}x{image.height}): {e}") from None
        digest = hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
        out.append(PromptImage(processed, digest))
    return out


def image_runs(ids: Sequence[int], image_token_id: int) -> List[Tuple[int, int]]:
    """[start, end) of each run of image tokens in ``ids``."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == image_token_id and start is None:
            start = i
        elif t != image_token_id and start is not None:
            runs.append((start, i))
            start = None
    return runs


def place_images(model: Model, ids: List[int], images: List[PromptImage], what: str = "prompt") -> List[int]:
    """``ids`` with each image's place (one image token, or a span already of
    its size) made the image's span: begin, its soft tokens, end."""
    args = model.args
    if args.image_token_id is None:
        if images:
            image_reader(model)  # names the problem
        return ids
    runs = image_runs(ids, args.image_token_id)
    if len(runs) != len(images):
        raise ValueError(
            f"{what} has {len(runs)} image place(s) for {len(images)} image(s): write one image token "
            f"(id {args.image_token_id}, <|image|>) where each image goes (chat templates write them "
            "for a message's image parts)"
        )
    out, done = [], 0
    for (start, end), image in zip(runs, images):
        out += ids[done:start]
        n = end - start
        if n == image.soft_tokens:
            out += ids[start:end]
        elif n == 1:
            begin = [] if out[-1:] == [args.boi_token_id] or args.boi_token_id is None else [args.boi_token_id]
            after = ids[end : end + 1]
            close = [] if after == [args.eoi_token_id] or args.eoi_token_id is None else [args.eoi_token_id]
            out += begin + [args.image_token_id] * image.soft_tokens + close
        else:
            raise ValueError(
                f"{what}: an image's place holds {n} image tokens; the image takes {image.soft_tokens} "
                "(or write one, to be expanded)"
            )
        done = end
    return out + ids[done:]


def image_features(model: Model, images: List[PromptImage]) -> Optional[mx.array]:
    """The images' soft tokens in the text model's space [sum of soft tokens, hidden]."""
    if not images:
        return None
    features = []
    for image in images:
        p = image.processed
        grid = (int(p.position_ids[:, 1].max()) + 1, int(p.position_ids[:, 0].max()) + 1)
        f = model.encode_image(mx.array(p.pixel_values), mx.array(p.position_ids), grid)
        mx.eval(f)
        features.append(f)
    return mx.concatenate(features, axis=0)


def rows_of_images(images, rows: int, batched: bool) -> List[List[Any]]:
    """``images`` as stream_generate takes them -> one list of sources per prompt row.

    For one prompt: a source or a list of sources. For a batch: a list with
    one list (or None) per prompt."""
    if images is None:
        return [[] for _ in range(rows)]
    if not batched:
        return [list(images) if isinstance(images, (list, tuple)) else [images]]
    if not isinstance(images, (list, tuple)) or len(images) != rows:
        raise ValueError(f"images must list one list of images per prompt ({rows} prompts)")
    out = []
    for r, row in enumerate(images):
        if row is None:
            row = []
        if not isinstance(row, (list, tuple)):
            raise ValueError(f"images[{r}] must be a list of images (got {type(row).__name__})")
        out.append(list(row))
    return out


def split_message_images(messages: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[List[Any]]]:
    """Messages as the chat template takes them (each image part as
    ``{"type": "image"}``) and each message's image sources.

    Image parts may be ``{"type": "image", "image" | "url" | "path": source}``
    (transformers' form) or ``{"type": "image_url", "image_url": {"url": ...}}``
    (OpenAI's)."""
    out, sources = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        found = []
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image", "image_url"):
                    found.append(_image_source(part, f"messages[{i}].content[{j}]"))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            message = dict(message, content=parts)
        out.append(message)
        sources.append(found)
    return out, sources


def _image_source(part: Dict[str, Any], where: str):
    if part["type"] == "image_url":
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, dict) else value
    else:
        value = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where} is an image part without an image")
    return value
