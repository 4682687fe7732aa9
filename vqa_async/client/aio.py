"""AsyncClient: questions about images to a vqa-async server (`serve` or the cluster's front) over aiohttp."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

import vqa_async.client.upload as upload
from vqa_async import __version__
from vqa_async.client.answers import Answer, Response
from vqa_async.client.errors import VqaError
from vqa_async.client.lookahead import Lookahead
from vqa_async.client.upload import ImageLike, Prepared

# Answers that say "not now" rather than "no": the server's full queue or loading model (503), a client over its
# quota or rate (429), and a front whose worker vanished (502). Each comes with Retry-After from our servers.
RETRY_STATUSES = frozenset({429, 502, 503})
# Ids remembered for follow-up questions (a key and an id each: a few hundred KB at most).
REMEMBERED_IDS = 4096

Questions = str | Sequence[str]
# One request of ask_many: the image (None with image_id) and its question or questions.
Job = tuple[ImageLike | None, Questions]


class AsyncClient:
    """Ask questions about images; at most `concurrency` requests in flight, however many tasks call it.

    Each request is retried (at most `retries` more times) when the server answers 503, 429 or 502, waiting what
    its `Retry-After` says, and when the connection fails (refused, reset, closed before the answer), with
    exponential back-off and jitter. The API is idempotent: asking again is always safe.

    An image the server has answered is named by its `image_id` afterwards: asking about the same image again
    sends the id instead of the bytes, and sends the image only when the server answers 409 `image_not_cached`.
    Photos are shrunk before upload (vqa_async/client/upload.py) to twice the model's input size, which the
    server's /readyz names (`max_side` overrides it; 0 sends every image as it is).
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 connect_timeout_s: float = 10.0, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 20.0, max_retry_after_s: float = 60.0, concurrency: int = 8,
                 max_side: int | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries}")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.concurrency = concurrency
        self.max_side = max_side
        self._limit = asyncio.Semaphore(concurrency)
        self._side_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._ids: OrderedDict[str, str] = OrderedDict()  # an image's content key -> the server's image_id

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on first use, inside the loop that uses it
            headers = {"User-Agent": f"vqa-async-client/{__version__}"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout,
                                                  connector=aiohttp.TCPConnector(limit=self.concurrency))
        return self._session

    # -- asking --------------------------------------------------------------------------------------------------
    async def ask(self, image: ImageLike | None = None, question: str | None = None, *,
                  questions: Sequence[str] | None = None, image_id: str | None = None) -> Answer:
        """The answer to `question`, or the answers to `questions`, about `image`: a path, bytes, a PIL image, or
        an http(s) URL the server fetches (when it allows that host). `image_id` (an earlier Answer's) asks
        without sending the image; with `image` too, the image is sent only if the server no longer holds it."""
        qs = _questions(question, questions)
        if image is None and image_id is None:
            raise ValueError("ask about an image: give image, image_id, or both")
        async with self._limit:
            t0 = time.monotonic()
            rid = uuid.uuid4().hex  # one id for every attempt: the server's logs tie them together
            prepared: Prepared | None = None
            key: str | None = None
            if upload.is_url(image):
                key = f"url:{image}"
            elif image is not None:
                prepared = await self.prepare(image)
                key = prepared.key
            known = image_id or (self._ids.get(key) if key else None)
            attempts = 0
            if known:
                resp = await self._post("/v1/vqa", await _form(qs, image_id=known), rid)
                attempts = resp.attempts
                if not (image is not None and resp.status == 409 and _code(resp.body) == "image_not_cached"):
                    return self._answer(resp, key, t0, attempts, 0)
                self._ids.pop(key or "", None)
            sent = 0
            if prepared is None:  # a URL
                resp = await self._post("/v1/vqa", _json_body({"image_url": str(image), **_asked(qs)}), rid)
            else:
                up = prepared.upload
                if up is None:  # the server had the image when it was prepared, and no longer has
                    up = await asyncio.to_thread(upload.prepare, prepared.source, await self.upload_side())
                sent = len(up.data)
                resp = await self._post("/v1/vqa", await _form(qs, image=up), rid)
            return self._answer(resp, key, t0, attempts + resp.attempts, sent)

    async def prepare(self, image: ImageLike) -> Prepared:
        """`image` read, named and made ready to upload (shrunk if it is a photo), for `ask` to take as its image.
        A job that prepares its next images while the current ones are being answered (ask_many and `vqa-async
        batch` do) sends each request the moment a slot frees: the server sees requests arrive together and
        answers them in full batches. An image the server holds already (by an earlier answer) is not
        re-encoded. Not for a URL, which the server fetches itself."""
        if isinstance(image, Prepared):
            return image
        if upload.is_url(image):
            raise ValueError("an http(s) URL is fetched by the server: ask with the URL as it is")
        return await asyncio.to_thread(upload.ready, image, await self.upload_side(), self._ids.__contains__)

    def prepare_now(self, images: list[ImageLike | None], max_side: int) -> list[ImageLike | None | Exception]:
        """`prepare` for several images, here and now (in a worker thread: see Lookahead); a URL or None as it
        is, and the error (VqaError `image_unreadable`, TypeError) in place of an image that could not be
        read."""
        out: list[ImageLike | None | Exception] = []
        for image in images:
            if image is None or upload.is_url(image):
                out.append(image)
                continue
            try:
                out.append(upload.ready(image, max_side, self._ids.__contains__))
            except Exception as e:  # noqa: BLE001 - handed to the request that asks about this image
                out.append(e)
        return out

    async def ask_many(self, jobs: Iterable[Job]) -> AsyncIterator[tuple[int, Answer | VqaError]]:
        """(index, Answer or VqaError) for each (image, question or questions) of `jobs`, as they are answered.
        `jobs` is read lazily: at most `concurrency` of them are asked at a time, and the images of as many more
        are prepared meanwhile (see `prepare`), so it may be endless."""
        ahead = Lookahead(self, enumerate(jobs), lambda job: job[1][0])
        pending: dict[asyncio.Task[Answer], int] = {}

        def fill() -> None:
            while len(pending) < self.concurrency and (nxt := ahead.take()) is not None:
                (i, (_, q)), image = nxt
                pending[asyncio.ensure_future(self._ask_soon(image, q))] = i

        try:
            fill()
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    exc = task.exception()
                    if isinstance(exc, VqaError):
                        yield i, exc
                    elif exc is not None:
                        raise exc
                    else:
                        yield i, task.result()
                fill()
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, ahead.cancel(), return_exceptions=True)

    async def _ask_soon(self, image: Awaitable[ImageLike | None], q: Questions) -> Answer:
        ready = await image
        return await self.ask(ready, q) if isinstance(q, str) else await self.ask(ready, questions=q)

    async def chat_completions(self, body: dict[str, Any]) -> Response:
        """POST `body` as it is to /v1/chat/completions (OpenAI's shape), with the same retries; the HTTP answer
        as it came, errors included (a connection that never came raises VqaError)."""
        async with self._limit:
            return await self._post("/v1/chat/completions", _json_body(body), uuid.uuid4().hex)

    # -- plumbing ------------------------------------------------------------------------------------------------
    async def _post(self, path: str, body: Body, rid: str) -> Response:
        """One POST of `body`, encoded once before (the same bytes go again on a retry), retried as the class
        says."""
        headers = {"X-Request-ID": rid, "Content-Type": body.content_type}
        for attempt in range(1, self.retries + 2):
            last = attempt > self.retries
            try:
                async with self._http().post(self.url + path, data=body.data, headers=headers) as r:
                    raw = await r.read()
                    resp = Response(r.status, r.headers.get("X-Request-ID"), _json(raw), attempt, dict(r.headers))
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                # A read that timed out is slow work, not a missing server: asking again would only add load.
                if isinstance(e, TimeoutError) and not isinstance(e, aiohttp.ConnectionTimeoutError):
                    raise _timeout(self.timeout, rid) from e
                if last:
                    raise VqaError(0, "connection_failed", f"no answer from {self.url} after {attempt} attempts: "
                                   f"{e}", request_id=rid) from e
                await asyncio.sleep(self._delay(attempt, None))
                continue
            except TimeoutError as e:
                raise _timeout(self.timeout, rid) from e
            if resp.status not in RETRY_STATUSES or last:
                return resp
            await asyncio.sleep(self._delay(attempt, _retry_after(resp.headers.get("Retry-After"))))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _delay(self, attempt: int, retry_after_s: float | None) -> float:
        """The wait before attempt `attempt + 1`: what Retry-After says (plus a little jitter, so that clients
        told the same time do not come back together), else exponential back-off with jitter."""
        if retry_after_s is not None:
            return min(retry_after_s, self.max_retry_after_s) + random.uniform(0, self.backoff_s)
        cap = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)

    async def upload_side(self) -> int:
        """Twice the model's input size, as /readyz names it; the default model size's when it does not."""
        if self.max_side is not None:
            return self.max_side
        async with self._side_lock:
            if self.max_side is not None:
                return self.max_side
            try:
                async with self._http().get(self.url + "/readyz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    body = _json(await r.read())
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                return 2 * upload.DEFAULT_IMAGE_RES  # not up yet: ask again next time
            if status != 200:
                return 2 * upload.DEFAULT_IMAGE_RES
            res = body.get("image_res") if isinstance(body, dict) else None
            self.max_side = 2 * (res if isinstance(res, int) and res > 0 else upload.DEFAULT_IMAGE_RES)
            return self.max_side

    def _answer(self, resp: Response, key: str | None, t0: float, attempts: int, sent: int) -> Answer:
        body = resp.body
        if resp.status != 200:
            raise _error(resp)
        if not isinstance(body, dict) or not ("answers" in body or "answer" in body):
            raise VqaError(resp.status, "invalid_response", f"not an answer: {str(body)[:200]}",
                           request_id=resp.request_id, body=body)
        answers = tuple(body["answers"]) if "answers" in body else (body["answer"],)
        image_id = body.get("image_id") or resp.headers.get("X-Image-Id")
        if image_id and key:
            self._ids[key] = image_id
            self._ids.move_to_end(key)
            while len(self._ids) > REMEMBERED_IDS:
                self._ids.popitem(last=False)
        return Answer(answers=answers, image_id=image_id, model=body.get("model"), queue_ms=body.get("queue_ms"),
                      compute_ms=body.get("compute_ms"), batch_size=body.get("batch_size"),
                      latency_ms=round((time.monotonic() - t0) * 1000, 2), attempts=attempts, upload_bytes=sent,
                      request_id=resp.request_id, body=body)


def _questions(question: str | None, questions: Sequence[str] | None) -> list[str]:
    if (question is None) == (questions is None):
        raise ValueError("give question or questions, not both or neither")
    if questions is not None:
        if isinstance(questions, str):
            raise TypeError("questions is a list of strings; for one question use question=")
        return list(questions)
    assert question is not None
    return [question]


@dataclass(frozen=True)
class Body:
    """A request body, encoded once: an upload is not re-encoded for each retry, and sending it is one write."""

    data: bytes
    content_type: str


async def _form(qs: list[str], *, image: upload.Upload | None = None, image_id: str | None = None) -> Body:
    """/v1/vqa's multipart form (aiohttp's FormData, encoded to bytes)."""
    form = aiohttp.FormData()
    if image is not None:
        form.add_field("image", image.data, filename=image.filename, content_type=image.content_type)
    if image_id is not None:
        form.add_field("image_id", image_id)
    for q in qs:
        form.add_field("question", q)
    writer = form()
    return Body(await writer.as_bytes(), writer.content_type)


def _json_body(obj: dict[str, Any]) -> Body:
    return Body(orjson.dumps(obj), "application/json")


def _asked(qs: list[str]) -> dict[str, Any]:
    return {"questions": qs} if len(qs) > 1 else {"question": qs[0]}


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def _code(body: Any) -> str | None:
    err = body.get("error") if isinstance(body, dict) else None
    return err.get("code") if isinstance(err, dict) else None


def _error(resp: Response) -> VqaError:
    body = resp.body
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        code, message = err["code"], str(err.get("message", ""))
    else:
        code, message = f"http_{resp.status}", str(body)[:200]
    return VqaError(resp.status, code, message, request_id=resp.request_id,
                    retry_after_s=_retry_after(resp.headers.get("Retry-After")), body=body)


def _timeout(timeout: aiohttp.ClientTimeout, rid: str) -> VqaError:
    return VqaError(0, "client_timeout", f"no answer within the client's timeout ({timeout.total or 0:g} s)",
                    request_id=rid)


def _retry_after(value: str | None) -> float | None:
    """Retry-After's seconds: a number, or an HTTP date (RFC 9110 allows both)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

