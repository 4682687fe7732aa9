"""`vqa-async batch INPUT.jsonl OUTPUT.jsonl --url URL`: a file of requests answered by a running server.

INPUT holds one JSON object a line, in either of two forms (they may be mixed):

- OpenAI's Batch API: `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`; the body
  goes as it is to the server's /v1/chat/completions.
- plain: `{"custom_id", "image", "question"}` (or `"questions": [...]`); `image` is a path (relative to INPUT's
  folder) or an http(s) URL, which the server fetches when it allows that host (`--allowed-media-domains`).

Each answer is appended to OUTPUT and flushed as it arrives, in OpenAI's Batch output shape:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null | {"code", "message"}}`.
A later run with the same OUTPUT skips every custom_id it already answered (a line whose `error` is null), so an
interrupted job resumes where it stopped and no line is answered twice. Ctrl-C stops sending; the requests in
flight are answered and written (a second Ctrl-C drops them, to be asked again by the next run). Exit status:
0 every line answered, 1 some failed (their errors are in OUTPUT; a rerun asks them again), 2 a bad INPUT,
130 interrupted.

This is a client: it imports no torch (`vqa_async.client` does the sending, with its retries and photo
shrinking). It was `vqa_async.batch_job`, which still imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import uvloop
from tqdm import tqdm

from vqa_async.client import AsyncClient, ImageLike, VqaError
from vqa_async.client.lookahead import Lookahead

CHAT_URL = "/v1/chat/completions"


class BatchInputError(ValueError):
    """INPUT cannot be run as it is (nothing was sent)."""


@dataclass(frozen=True)
class Line:
    custom_id: str
    chat_body: dict[str, Any] | None = None  # the OpenAI form
    image: str | None = None  # the plain form: a path (already resolved against INPUT's folder) or a URL
    questions: tuple[str, ...] = ()
    plural: bool = False


@dataclass
class Summary:
    answered: int = 0
    failed: int = 0
    skipped: int = 0
    dropped: int = 0  # in flight at a second Ctrl-C, or never sent after the first
    elapsed_s: float = 0.0
    interrupted: bool = False
    failures: dict[str, int] = field(default_factory=dict)  # error code -> lines

    @property
    def rate(self) -> float:
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def text(self) -> str:
        codes = ", ".join(f"{code} {n}" for code, n in sorted(self.failures.items()))
        return (f"answered {self.answered}, failed {self.failed}{f' ({codes})' if codes else ''}, skipped "
                f"{self.skipped} (already in OUTPUT)" + (f", not sent {self.dropped} (interrupted)"
                                                         if self.interrupted else "")
                + f"; {self.elapsed_s:.1f} s, {self.rate:.2f} answers/s")


def read_input(path: Path) -> list[Line]:
    """Every line of INPUT, checked before anything is sent; BatchInputError names the first bad line."""
    lines: list[Line] = []
    seen: dict[str, int] = {}
    try:
        raw = path.read_bytes().splitlines()
    except OSError as e:
        raise BatchInputError(f"cannot read {path}: {e.strerror or e}") from e
    for n, text in enumerate(raw, 1):
        if not text.strip():
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise BatchInputError(f"{path}:{n}: not JSON: {e}") from e
        line = _line(obj, path.parent, f"{path}:{n}")
        if line.custom_id in seen:
            raise BatchInputError(f"{path}:{n}: custom_id {line.custom_id!r} is also on line {seen[line.custom_id]}; "
                                  "each line needs its own")
        seen[line.custom_id] = n
        lines.append(line)
    return lines


def _line(obj: Any, base: Path, where: str) -> Line:
    if not isinstance(obj, dict):
        raise BatchInputError(f"{where}: a line is a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise BatchInputError(f"{where}: 'custom_id' must be a non-empty string")
    if "body" in obj:
        if obj.get("url") != CHAT_URL:
            raise BatchInputError(f"{where}: 'url' must be {CHAT_URL!r}, not {obj.get('url')!r}")
        if obj.get("method", "POST") != "POST":
            raise BatchInputError(f"{where}: 'method' must be 'POST'")
        if not isinstance(obj["body"], dict):
            raise BatchInputError(f"{where}: 'body' must be a JSON object")
        return Line(cid, chat_body=obj["body"])
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise BatchInputError(f"{where}: give 'image' (a path or an http(s) URL) and 'question', or OpenAI's "
                              "'method', 'url' and 'body'")
    if "questions" in obj:
        qs = obj["questions"]
        if not isinstance(qs, list) or not qs or not all(isinstance(q, str) for q in qs):
            raise BatchInputError(f"{where}: 'questions' must be a non-empty list of strings")
        questions, plural = tuple(qs), True
    else:
        if not isinstance(obj.get("question"), str):
            raise BatchInputError(f"{where}: 'question' must be a string")
        questions, plural = (obj["question"],), False
    if not image.startswith(("http://", "https://")):
        image = str(base / image)  # an absolute path stays as it is
    return Line(cid, image=image, questions=questions, plural=plural)


def answered_ids(output: Path) -> set[str]:
    """custom_ids OUTPUT already holds an answer for (a line with `error` null). A line cut short by a kill is
    not one."""
    done: set[str] = set()
    try:
        raw = output.read_bytes()
    except FileNotFoundError:
        return done
    for text in raw.splitlines():
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("error") is None and isinstance(obj.get("custom_id"), str):
            done.add(obj["custom_id"])
    return done


async def answer_line(client: AsyncClient, line: Line, image: Awaitable[ImageLike | None]) -> dict[str, Any]:
    """One OUTPUT record for `line`, whose image (the plain form's) was prepared ahead (`Lookahead`)."""
    record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
                              "response": None, "error": None}
    if line.chat_body is not None:
        try:
            resp = await client.chat_completions(line.chat_body)
        except VqaError as e:
            record["error"] = {"code": e.code, "message": e.message}
            return record
        record["response"] = {"status_code": resp.status, "request_id": resp.request_id, "body": resp.body}
        if resp.status != 200:
            err = resp.body.get("error") if isinstance(resp.body, dict) else None
            err = err if isinstance(err, dict) else {}
            record["error"] = {"code": str(err.get("code") or f"http_{resp.status}"),
                               "message": str(err.get("message") or resp.body)}
        return record
    try:
        ready = await image
        if line.plural:
            answer = await client.ask(ready, questions=list(line.questions))
        else:
            answer = await client.ask(ready, line.questions[0])
    except VqaError as e:
        if e.status:
            record["response"] = {"status_code": e.status, "request_id": e.request_id, "body": e.body}
        record["error"] = {"code": e.code, "message": e.message}
        return record
    record["response"] = {"status_code": 200, "request_id": answer.request_id, "body": answer.body}
    return record


class Writer:
    """Appends records to OUTPUT, each flushed as soon as it is written."""

    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()
        if self._file.tell() > 0:
            with open(path, "rb") as f:  # a run killed mid-line left no newline: start a fresh line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write(b"\n")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


async def run(lines: list[Line], output: Path, client: AsyncClient, concurrency: int,
              progress: bool = True) -> Summary:
    """Answer `lines` not yet answered in `output`: `concurrency` senders, each asking its next line the moment
    its last one is answered, with the next lines' images read and prepared meanwhile (`Lookahead`), so that
    the server sees the requests arrive together and batches them as it does the bench's. SIGINT: stop sending
    and finish what is in flight; a second SIGINT drops that too."""
    done = answered_ids(output)
    todo = [line for line in lines if line.custom_id not in done]
    summary = Summary(skipped=len(lines) - len(todo))
    stopping = asyncio.Event()
    asking = 0  # requests in flight
    writer = Writer(output)
    bar = tqdm(total=len(todo), unit="req", desc="answered", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    ahead = Lookahead(client, iter(todo), lambda line: line.image, depth=concurrency)

    def written(record: dict[str, Any]) -> None:
        writer.write(record)
        if record["error"] is None:
            summary.answered += 1
        else:
            summary.failed += 1
            code = record["error"]["code"]
            summary.failures[code] = summary.failures.get(code, 0) + 1
            bar.set_postfix(failed=summary.failed, refresh=False)
        bar.update(1)

    async def sender() -> None:
        nonlocal asking
        while not stopping.is_set() and (nxt := ahead.take()) is not None:
            asking += 1
            try:
                record = await answer_line(client, *nxt)
            finally:
                asking -= 1
            written(record)

    senders: list[asyncio.Task[None]] = []

    def interrupt() -> None:
        if stopping.is_set():
            for task in senders:
                task.cancel()
            return
        stopping.set()
        tqdm.write(f"interrupted: waiting for {asking} requests in flight (Ctrl-C again to drop them)",
                   file=sys.stderr)

    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
        senders += [asyncio.create_task(sender()) for _ in range(concurrency)]
        finished, _ = await asyncio.wait(senders, return_when=asyncio.FIRST_EXCEPTION)
        for task in finished:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error  # a bug, not a line's failure (those are in OUTPUT): the other senders stop too
    finally:
        for task in senders:  # only when something unexpected ended one
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        loop.remove_signal_handler(signal.SIGINT)
        summary.elapsed_s = time.monotonic() - t0
        summary.interrupted = stopping.is_set()
        summary.dropped = len(todo) - summary.answered - summary.failed
        writer.close()
        bar.close()
        await ahead.cancel()
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="JSONL: OpenAI Batch lines (custom_id, method, url, body) or plain ones "
                                 "(custom_id, image: a path or an http(s) URL, question)")
    p.add_argument("output", help="JSONL answers, appended as they come; an existing one is resumed")
    p.add_argument("--url", required=True, help="the server: `vqa-async serve` or the cluster's front")
    p.add_argument("--api-key", default=os.environ.get("VQA_CLIENT_API_KEY"),
                   help="sent as Authorization: Bearer [env VQA_CLIENT_API_KEY]")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per request, each attempt (default 120)")
    p.add_argument("--retries", type=int, default=5,
                   help="more attempts on 503/429/502 and failed connections (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        print("vqa-async batch: error: --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        lines = read_input(Path(args.input))
    except BatchInputError as e:
        print(f"vqa-async batch: error: {e}", file=sys.stderr)
        return 2

    async def go() -> Summary:
        async with AsyncClient(args.url, api_key=args.api_key, concurrency=args.concurrency,
                               timeout_s=args.timeout_s, retries=args.retries) as client:
            return await run(lines, Path(args.output), client, args.concurrency, progress=not args.no_progress)

    summary = uvloop.run(go())  # the servers' loop: less of a shared CPU for the client
    print(summary.text())
    if summary.interrupted:
        return 130
    return 1 if summary.failed else 0
