"""A chat request's images: where they may come from, read on the HTTP thread.

An ``image_url`` part names its image by URL. Which sources a server takes is
its operator's choice (``ImagePolicy``, from the command line):

- ``data:image/...;base64,...`` always: the image is in the request;
- ``http(s)://`` only with ``allow_urls``: the server would fetch whatever a
  request names, addresses on its own network included;
- ``file://`` and bare paths only with ``allow_files``: a request must not read
  the server's files unless the operator says so.

``read_images`` decodes and preprocesses them (``image_prompts.prepare_images``)
before the request is queued, so that every problem with an image is a 400
naming its part, and the worker only encodes.
"""

import re
import urllib.parse
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from ..image_prompts import MAX_IMAGES, PromptImage, image_reader, prepare_images
from ..images import ImageError, load_image
from .fields import APIError

MAX_IMAGE_BYTES = 20 * 2**20  # as images.load_image, and OpenAI's per-image limit
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass
class ImagePolicy:
    """Which image sources requests may name, and how many and how large."""

    allow_urls: bool = False
    allow_files: bool = False
    max_images: int = MAX_IMAGES  # per request
    max_bytes: int = MAX_IMAGE_BYTES  # per image, encoded (a data URL's decoded bytes)


def request_bytes_for(policy: ImagePolicy) -> int:
    """The body size a request carrying ``max_images`` data URLs of ``max_bytes``
    each needs: base64 takes 4 characters per 3 bytes; 1 MiB is left for the rest."""
    per_image = -(-policy.max_bytes // 3) * 4 + 64  # the "data:image/...;base64," and the part around it
    return policy.max_images * per_image + 2**20


def image_error(message: str, param: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param=param, code=code)


def _source(url: str, where: str, policy: ImagePolicy):
    """What ``load_image`` reads for ``url``, once the policy allows it."""
    if url[:5].lower() == "data:":
        return url
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else None
    if scheme in ("http", "https"):
        if not policy.allow_urls:
            raise image_error(
                f"'{where}': image URLs are not enabled on this server (it takes data: URLs; "
                "start it with --allow-image-urls to fetch http(s) URLs)",
                where,
                "image_source_disabled",
            )
        return url
    if scheme not in (None, "file"):
        raise image_error(
            f"'{where}': URL scheme {scheme}:// is not supported (data:, http(s):// or file://)", where, "invalid_image"
        )
    if not policy.allow_files:
        raise image_error(
            f"'{where}': local image files are not enabled on this server (it takes data: URLs; "
            "start it with --allow-image-files to read paths and file:// URLs)",
            where,
            "image_source_disabled",
        )
    if scheme is None:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise image_error(f"'{where}': a file:// URL names a file on this machine (not {parts.netloc!r})", where)
    return urllib.parse.unquote(parts.path)


def read_images(model, model_id: str, parts: Sequence[Tuple[str, str]], policy: ImagePolicy) -> List[PromptImage]:
    """The request's images, in order, ready for the model; ``parts``: each
    image part's field (``messages[0].content[1].image_url.url``) and URL.
    Any problem is a 400 (``APIError``) naming the part."""
    if not parts:
        return []
    try:
        image_reader(model)
    except ValueError:
        raise image_error(
            f"'{parts[0][0]}': the model {model_id!r} reads text only (its checkpoint has no vision tower); "
            "send text parts only",
            parts[0][0],
            "images_not_supported",
        ) from None
    if len(parts) > policy.max_images:
        raise image_error(
            f"'{parts[policy.max_images][0]}': the request has {len(parts)} images, more than this server's "
            f"limit of {policy.max_images} (--max-images)",
            parts[policy.max_images][0],
            "too_many_images",
        )
    # Every source is checked against the policy before any is read.
    sources = [(where, _source(url, where, policy)) for where, url in parts]
    images = []
    for where, source in sources:
        try:
            # Decoded with the server's limits; prepare_images takes the decoded image as it is.
            image = load_image(
                source, allow_paths=policy.allow_files, allow_urls=policy.allow_urls, max_bytes=policy.max_bytes
            )
            images += prepare_images(model, [image], max_images=1)
        except ImageError as e:
            raise image_error(f"'{where}': {e}", where) from None
    return images
