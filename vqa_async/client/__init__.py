"""A Python client for vqa-async: `Client` (plain code) and `AsyncClient` (asyncio).

    from vqa_async.client import Client

    with Client("http://127.0.0.1:8080", api_key="...") as vqa:
        a = vqa.ask("photo.jpg", "what is in the picture?")
        print(a.answer, a.image_id)
        more = vqa.ask("photo.jpg", questions=["what color is it?", "is it outside?"])  # sent by its image_id

It imports no torch: it needs aiohttp, Pillow and orjson only.
"""

from vqa_async.client.aio import AsyncClient
from vqa_async.client.answers import Answer, Response
from vqa_async.client.errors import VqaError
from vqa_async.client.sync import Client
from vqa_async.client.upload import ImageLike, Prepared

__all__ = ["Answer", "AsyncClient", "Client", "ImageLike", "Prepared", "Response", "VqaError"]
