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


def image_places(ids: Sequence[int], image: int, begin: Optional[int], end: Optional[int]) -> List[Tuple[int, int]]:
    """[start, stop) of each image's place among ``ids``: a span of image
    tokens between ``begin`` and ``end`` (an expanded image), else one image
    token (the chat template's marker; markers side by side are images side
    by side)."""
    places, i = [], 0
    while i < len(ids):
        if ids[i] == begin and i + 1 < len(ids) and ids[i + 1] == image:
            j = i + 1
            while j < len(ids) and ids[j] == image:
                j += 1
            if j < len(ids) and ids[j] == end:
                places.append((i + 1, j))
                i = j + 1
                continue
        if ids[i] == image:
            places.append((i, i + 1))
        i += 1
    return places


def place_images(model: Model, ids: List[int], images: List[PromptImage], what: str = "prompt") -> List[int]:
    """``ids`` with each image's place (one image token, or a span already of
    its size) made the image's span: begin, its soft tokens, end."""
    args = model.args
    if images:
        image_reader(model)  # a text-only model: says so
    elif args.vision is None or args.image_token_id is None:
        return ids  # a text-only model reads the image token as any other
    begin, end = args.boi_token_id, args.eoi_token_id
    places = image_places(ids, args.image_token_id, begin, end)
    if len(places) != len(images):
        raise ValueError(
            f"{what} has {len(places)} image place(s) for {len(images)} image(s): write one image token "
            f"(id {args.image_token_id}, <|image|>) where each image goes (chat templates write them "
            "for a message's image parts)"
        )
    out, done = [], 0
    for (start, stop), image in zip(places, images):
        out += ids[done:start]
        n = stop - start
        if n == image.soft_tokens:
            out += ids[start:stop]
        elif n == 1:
            wrapped = start > 0 and ids[start - 1] == begin and ids[stop : stop + 1] == [end]
            span = [args.image_token_id] * image.soft_tokens
            out += span if wrapped or begin is None or end is None else [begin, *span, end]
        else:
            raise ValueError(
                f"{what}: an image's place holds {n} image tokens; the image takes {image.soft_tokens} "
                "(or write one, to be expanded)"
            )
        done = stop
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
