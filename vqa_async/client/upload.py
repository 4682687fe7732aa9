"""What the client sends for an image: a small one as it is, a photo shrunk the way the upload page shrinks it
(templates/page.js): upright (EXIF orientation applied), RGB (transparency on white), a JPEG whose longer side is
at most twice the model's input size. A retry after a worker dies needs the whole upload in HAProxy's buffer
(`vqa-async cluster --retry-body-kb`, 1 MiB by default); a 12 MP phone photo (3 MB) does not fit, its shrunk
copy (a few hundred KB) does, and the model sees the same pixels either way once the server resizes it.

Everything here is CPU work on the caller's thread (the async client runs it in a worker thread).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from vqa_async.client.errors import VqaError

# The model's input side when the server does not say (mPLUG large and base take 504 x 504 and 224 x 224).
DEFAULT_IMAGE_RES = 504
# An upload at most this big is sent as it is when its pixels are small enough; a bigger one is re-encoded. Under
# HAProxy's default 1 MiB retry buffer with room for the form's other fields and headers.
UPLOAD_BUDGET = 900 * 1024
# An in-memory image with at most this many pixels is sent losslessly as PNG (its raw RGB is 768 KiB, and PNG is
# never much bigger); a bigger one as JPEG, which keeps a photo of 2x the input size to a few hundred KB.
PNG_PIXELS = 512 * 512
JPEG_QUALITY = 90  # what the page uses (canvas.toBlob(..., 0.9))

# What load() reads; a caller may also hand a Prepared one (AsyncClient.prepare) wherever an image goes.
Loadable = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image]
ImageLike = Union[Loadable, "Prepared"]


@dataclass(frozen=True)
class Upload:
    data: bytes
    content_type: str
    filename: str
    shrunk: bool  # re-encoded here (False: the caller's bytes as they are)


@dataclass(frozen=True)
class Source:
    """An image as the caller gave it, read into memory, and a key that names its content."""

    content: bytes | Image.Image
    key: str


@dataclass(frozen=True)
class Prepared:
    """An image read and made ready to upload ahead of its request (AsyncClient.prepare). `upload` is None when
    the server was known to hold the image then: it is made only if the server has since forgotten it."""

    source: Source
    upload: Upload | None

    @property
    def key(self) -> str:
        return self.source.key


def is_url(image: object) -> TypeGuard[str]:
    return isinstance(image, str) and image.startswith(("http://", "https://"))


def load(image: Loadable) -> Source:
    """Read the caller's image (a path is read here); VqaError `image_unreadable` when a file cannot be read."""
    if isinstance(image, Image.Image):
        digest = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
        digest.update(image.tobytes())
        return Source(image, "pil:" + digest.hexdigest())
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
    elif isinstance(image, str | os.PathLike):
        try:
            data = Path(image).read_bytes()
        except OSError as e:
            raise VqaError(0, "image_unreadable", f"cannot read the image file {os.fspath(image)!r}: "
                           f"{e.strerror or e}") from e
    else:
        raise TypeError(f"an image is a path, bytes or a PIL image, not {type(image).__name__}")
    return Source(data, "sha256:" + hashlib.sha256(data).hexdigest())


def ready(image: ImageLike, max_side: int, known: Callable[[str], bool]) -> Prepared:
    """load() and prepare() in one call (one trip to a worker thread); no upload for an image `known` names."""
    if isinstance(image, Prepared):
        return image
    source = load(image)
    return Prepared(source, None if known(source.key) else prepare(source, max_side))


def prepare(source: Source, max_side: int) -> Upload:
    """The bytes to upload for `source`, whose longer side is at most `max_side` pixels (0: never shrink)."""
    content = source.content
    if isinstance(content, Image.Image):
        if (not max_side or max(content.size) <= max_side) and content.width * content.height <= PNG_PIXELS:
            out = io.BytesIO()
            content.save(out, format="PNG")
            return Upload(out.getvalue(), "image/png", "image.png", shrunk=False)
        return _jpeg(content, max_side)
    try:
        img = Image.open(io.BytesIO(content))
        fmt = img.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        # Not an image Pillow reads here: the server says what is wrong with it (or reads it itself).
        return Upload(content, "application/octet-stream", "image", shrunk=False)
    small = not max_side or max(img.size) <= max_side
    if small and len(content) <= UPLOAD_BUDGET:
        mime = Image.MIME.get(fmt or "", "application/octet-stream")
        return Upload(content, mime, "image." + (fmt or "bin").lower(), shrunk=False)
    try:
        return _jpeg(img, max_side)
    except (OSError, ValueError, Image.DecompressionBombError):  # a truncated or odd file: let the server judge
        return Upload(content, Image.MIME.get(fmt or "", "application/octet-stream"), "image", shrunk=False)


def _jpeg(img: Image.Image, max_side: int) -> Upload:
    if max_side:
        img.draft("RGB", (max_side, max_side))  # a JPEG decodes at 1/2, 1/4 or 1/8 scale when that is enough
    img = ImageOps.exif_transpose(img)  # upright, as the person who took it sees it
    img = _rgb(img)
    if max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=JPEG_QUALITY)
    return Upload(out.getvalue(), "image/jpeg", "image.jpg", shrunk=True)


def _rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency composited on white, as the page's canvas and the server do."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img if img.mode == "RGB" else img.convert("RGB")
