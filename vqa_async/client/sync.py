"""Client: the AsyncClient for code without an event loop. It runs one loop in a thread of its own, so requests
share connections, and many images go out concurrently (ask_many) though the caller's code is plain."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from vqa_async.client.aio import AsyncClient, Job
from vqa_async.client.answers import Answer, Response
from vqa_async.client.errors import VqaError
from vqa_async.client.upload import ImageLike, Prepared

T = TypeVar("T")
_END = object()


class Client:
    """The same arguments, methods and behaviour as AsyncClient, without `await`. Close it (or use `with`)."""

    def __init__(self, url: str, **options: Any) -> None:
        self._async = AsyncClient(url, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vqa-async-client", daemon=True)
        self._thread.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C in the caller's thread: the request does not go on without it
            future.cancel()
            raise

    def ask(self, image: ImageLike | None = None, question: str | None = None, *,
            questions: Sequence[str] | None = None, image_id: str | None = None) -> Answer:
        return self._run(self._async.ask(image, question, questions=questions, image_id=image_id))

    def prepare(self, image: ImageLike) -> Prepared:
        return self._run(self._async.prepare(image))

    def chat_completions(self, body: dict[str, Any]) -> Response:
        return self._run(self._async.chat_completions(body))

    def ask_many(self, jobs: Iterable[Job]) -> Iterator[tuple[int, Answer | VqaError]]:
        """As AsyncClient.ask_many: (index, Answer or VqaError) as they are answered, `concurrency` at a time."""
        results: queue.Queue[object] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in self._async.ask_many(jobs):
                    results.put(item)
            finally:
                results.put(_END)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := results.get()) is not _END:
                yield item  # type: ignore[misc]
            future.result()  # an unexpected error in the loop is raised here
        finally:
            future.cancel()
