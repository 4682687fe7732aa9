"""The client's Lookahead: a job's next images prepared ahead, a chunk per trip to a worker thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from vqa_async.client import VqaError
from vqa_async.client.lookahead import Lookahead
from vqa_async.client.upload import ImageLike


class FakePreparer:
    """Prepares an image by upper-casing its name; "missing" cannot be read; a URL and None pass as they are
    (as AsyncClient.prepare_now)."""

    concurrency = 4

    def __init__(self) -> None:
        self.chunks: list[list[ImageLike | None]] = []
        self.threads: set[str] = set()

    async def upload_side(self) -> int:
        return 128

    def prepare_now(self, images: list[ImageLike | None], max_side: int) -> list[ImageLike | None | Exception]:
        self.chunks.append(images)
        self.threads.add(threading.current_thread().name)
        return [VqaError(0, "image_unreadable", "no such file") if image == "missing" else
                image if image is None or str(image).startswith("https://") else str(image).upper()
                for image in images]


async def test_images_are_prepared_a_chunk_per_thread_trip_ahead_of_being_taken() -> None:
    fake = FakePreparer()
    items = [f"img{i}" for i in range(10)]
    ahead = Lookahead(fake, iter(items), lambda item: item)
    first = ahead.take()
    assert first is not None and first[0] == "img0"
    assert len(ahead) == 7  # two chunks of four taken from the iterator, one handed out
    assert await first[1] == "IMG0"
    got = [first[0]]
    while (nxt := ahead.take()) is not None:
        got.append(nxt[0])
        assert await nxt[1] == nxt[0].upper()
    assert got == items
    assert [len(c) for c in fake.chunks] == [4, 4, 2]  # three trips for ten images, not ten
    assert threading.current_thread().name not in fake.threads  # off the event loop


async def test_an_unreadable_image_fails_its_own_item_alone() -> None:
    fake = FakePreparer()
    items = ["a", "missing", "https://example.com/x.jpg", None]
    ahead = Lookahead(fake, iter(items), lambda item: item)
    results = []
    while (nxt := ahead.take()) is not None:
        try:
            results.append(await nxt[1])
        except VqaError as e:
            results.append(e.code)
    assert results == ["A", "image_unreadable", "https://example.com/x.jpg", None]
    assert fake.chunks == [items]


async def test_cancel_stops_what_was_not_handed_out() -> None:
    gate = threading.Event()

    class Slow(FakePreparer):
        def prepare_now(self, images: list[ImageLike | None], max_side: int) -> list[ImageLike | None | Exception]:
            gate.wait(5)
            return super().prepare_now(images, max_side)

    ahead = Lookahead(Slow(), iter(range(8)), lambda item: f"img{item}")
    taken = ahead.take()
    assert taken is not None
    await ahead.cancel()
    gate.set()
    assert taken[1].cancelled()
    with pytest.raises(asyncio.CancelledError):
        await taken[1]


async def test_a_failure_of_the_whole_chunk_reaches_each_of_its_requests() -> None:
    class Broken(FakePreparer):
        def prepare_now(self, images: list[ImageLike | None], max_side: int) -> list[ImageLike | None | Exception]:
            raise RuntimeError("a bug")

    ahead = Lookahead(Broken(), iter(range(3)), lambda item: f"img{item}")
    while (nxt := ahead.take()) is not None:
        with pytest.raises(RuntimeError, match="a bug"):
            await nxt[1]
