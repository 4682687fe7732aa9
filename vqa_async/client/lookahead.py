"""Lookahead: the images of a job's next requests, prepared before the requests go (ask_many, `vqa-async
batch`)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from vqa_async.client.upload import ImageLike

T = TypeVar("T")


class Preparer(Protocol):
    """What Lookahead needs of the client (AsyncClient)."""

    concurrency: int

    async def upload_side(self) -> int: ...

    def prepare_now(self, images: list[ImageLike | None], max_side: int) -> list[ImageLike | None | Exception]: ...


class Lookahead(Generic[T]):
    """Items of an iterator, each with its image prepared (AsyncClient.prepare) before it is taken: between
    `depth` (by default the client's concurrency) and twice that many items ahead, prepared `depth` at a time
    in one worker thread. One trip to a thread per image would wake the event loop in the middle of each burst
    of answers and spread the next requests out; the server would then batch them in smaller groups (measured:
    bench/RESULTS.md, "Bulk jobs"). `image_of(item)` is the item's image (None: it has none; a URL is left as
    it is)."""

    def __init__(self, client: Preparer, items: Iterator[T], image_of: Callable[[T], ImageLike | None],
                 depth: int | None = None) -> None:
        self._client = client
        self._items = items
        self._image_of = image_of
        self._depth = depth or client.concurrency
        self._ahead: deque[tuple[T, asyncio.Future[ImageLike | None]]] = deque()
        self._chunks: dict[asyncio.Task[None], list[asyncio.Future[ImageLike | None]]] = {}  # being prepared

    def take(self) -> tuple[T, asyncio.Future[ImageLike | None]] | None:
        """The next item and its image to await (VqaError `image_unreadable` if it could not be read), or None
        at the end."""
        if len(self._ahead) <= self._depth:
            self._fill()
        return self._ahead.popleft() if self._ahead else None

    def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        while len(self._ahead) < 2 * self._depth:
            chunk = list(itertools.islice(self._items, self._depth))
            if not chunk:
                return
            soon = [loop.create_future() for _ in chunk]
            self._ahead.extend(zip(chunk, soon, strict=True))
            task = asyncio.ensure_future(self._prepare([self._image_of(item) for item in chunk], soon))
            self._chunks[task] = soon
            task.add_done_callback(self._chunks.pop)

    async def _prepare(self, images: list[ImageLike | None], soon: list[asyncio.Future[ImageLike | None]]) -> None:
        try:
            ready = await asyncio.to_thread(self._client.prepare_now, images, await self._client.upload_side())
        except asyncio.CancelledError:
            for future in soon:
                future.cancel()
            raise
        except Exception as e:  # a bug: the requests waiting for these images get it (nobody awaits this task)
            for future in soon:
                if not future.done():
                    future.set_exception(e)
            return
        for future, result in zip(soon, ready, strict=True):
            if future.done():  # cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def __len__(self) -> int:
        """Items taken from the iterator and not yet handed out."""
        return len(self._ahead)

    async def cancel(self) -> None:
        """Stops preparing: what was not handed out, and what was but is not ready, is cancelled."""
        waiting = [soon for _, soon in self._ahead] + [soon for chunk in self._chunks.values() for soon in chunk]
        for soon in waiting:
            soon.cancel()
        tasks = list(self._chunks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *waiting, return_exceptions=True)
