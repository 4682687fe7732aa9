"""Fetching an image named by URL, for `image_url` on /v1/vqa and in /v1/chat/completions. Off by default."""

from __future__ import annotations

from vqa_async.config import Settings
from vqa_async.http.parse import bad


async def fetch_image(url: str, settings: Settings) -> bytes:
    """The bytes at `url`, or a 400 ApiError with a stable `image_url_*` code saying why not."""
    raise bad("image_url_not_allowed", "image URLs are not accepted by this server")
