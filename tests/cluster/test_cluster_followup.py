"""Follow-up questions through a real `vqa-async cluster` (HAProxy + 2 workers on the demo model): a request that
names an image by `image_id` reaches the worker that answered about the image (HAProxy's stick table, fed by the
answers' X-Image-Id), however it names it, while new images keep least-connections balancing; a follow-up whose
worker died is still answered (409 image_not_cached, then the re-upload sticks to its new worker)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cluster_support import RunningCluster, start_cluster, stop_cluster

from vqa_async.cluster.haproxy import find_haproxy

pytestmark = pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")
QUESTIONS = ["what color is the shape?", "what is the shape?", "is there a circle?", "what shape is it?"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[RunningCluster]:
    cl = start_cluster(tmp_path_factory.mktemp("followup"), demo_dir, "--torch-threads", "1", workers=2)
    yield cl
    stop_cluster(cl)


def post(url: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
    """Status, headers (names lowercased: HAProxy sends them so) and the JSON body."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


def multipart(fields: list[tuple[str, bytes, str | None, str | None]]) -> tuple[bytes, str]:
    """(name, value, filename, part content type) parts as a browser (or requests, aiohttp) sends them."""
    boundary = "----vqa" + uuid.uuid4().hex
    out = []
    for name, value, filename, ctype in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        out.append(head.encode() + b"\r\n" + value + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def ask_image(base: str, image: bytes) -> tuple[str, str]:
    body, ctype = multipart([("image", image, "x.png", "image/png"), ("question", QUESTIONS[0].encode(), None, None)])
    status, headers, reply = post(base + "/v1/vqa", body, ctype)
    assert status == 200, reply
    assert reply["image_id"] == headers["x-image-id"]
    return reply["image_id"], headers["x-served-by"]


def follow_ups(base: str, image_id: str) -> list[tuple[str, int, dict[str, str], dict]]:  # type: ignore[type-arg]
    """The same image named each way a client may name it (what HAProxy must find in each)."""
    q = QUESTIONS[1]
    form, form_type = multipart([("question", q.encode(), None, None), ("image_id", image_id.encode(), None, None)])
    # aiohttp's text parts carry a Content-Type header of their own
    typed, typed_type = multipart([("image_id", image_id.encode(), None, "text/plain; charset=utf-8"),
                                   ("question", q.encode(), None, "text/plain; charset=utf-8")])
    asks = [
        ("form field", form, form_type, {}),
        ("form field with its own Content-Type", typed, typed_type, {}),
        ("JSON key", json.dumps({"question": q, "image_id": image_id}).encode(), "application/json", {}),
        ("header", json.dumps({"question": q}).encode(), "application/json", {"X-Image-Id": image_id}),
        ("urlencoded form", f"question={q.replace(' ', '+')}&image_id={image_id}".encode(),
         "application/x-www-form-urlencoded", {}),
    ]
    out = [(how, *post(base + "/v1/vqa", body, ctype, headers)) for how, body, ctype, headers in asks]
    query = post(f"{base}/v1/vqa?image_id={image_id}", json.dumps({"question": q}).encode(), "application/json")
    return [*out, ("query parameter", *query)]


def cache_counts(base: str) -> tuple[float, float]:
    """The summed image-encoder cache hits and misses of every worker (the front's /metrics)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()

    def total(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name} ([0-9.e+]+)$", text, re.M))

    return total("vqa_image_cache_hits_total"), total("vqa_image_cache_misses_total")


def until_both_workers_are_up(cluster: RunningCluster) -> None:
    """Whatever ran before (a worker killed in this module, in a random order): both workers answer their own
    /readyz and HAProxy has both in rotation. HAProxy alone is not enough: a killed worker's replacement takes
    its port at once but listens only seconds later, and until HAProxy's checks notice, it still says UP; the
    uploads sent meanwhile are refused there, retried on the other worker, and the refusals mark the new one
    down until it is ready (bench/RESULTS.md, "A replaced worker draws no concurrent uploads")."""
    end = time.monotonic() + 120

    def ready(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    while not (len(cluster.server_status()) == 2 and all(ready(w["port"]) for w in cluster.state()["workers"])
               and cluster.all_up()):
        assert time.monotonic() < end, cluster.server_status()
        time.sleep(0.2)


def test_follow_ups_reach_the_worker_that_holds_the_image(cluster: RunningCluster,
                                                          easy_vqa_images: list[Path]) -> None:
    base = cluster.url
    until_both_workers_are_up(cluster)
    images = [p.read_bytes() for p in easy_vqa_images[:6]]
    hits0, misses0 = cache_counts(base)
    with ThreadPoolExecutor(len(images)) as pool:  # at once, so that leastconn spreads them
        answered = list(pool.map(lambda img: ask_image(base, img), images))
    assert len({worker for _, worker in answered}) == 2, answered  # both workers hold images
    n = 0
    for image_id, worker in answered:
        for how, status, headers, reply in follow_ups(base, image_id):
            assert status == 200, (how, reply)
            assert headers["x-served-by"] == worker, f"{how}: answered by {headers['x-served-by']}, not {worker}"
            assert reply["image_id"] == image_id
            n += 1
    hits, misses = cache_counts(base)
    assert misses - misses0 == len(images)  # one vision pass per image, none for a follow-up
    assert hits - hits0 == n


def test_a_follow_up_whose_worker_died_is_answered_elsewhere(cluster: RunningCluster,
                                                             easy_vqa_images: list[Path]) -> None:
    until_both_workers_are_up(cluster)
    base = cluster.url
    image = easy_vqa_images[7].read_bytes()
    image_id, worker = ask_image(base, image)
    pid = next(w["pid"] for w in cluster.state()["workers"] if w["name"] == worker)
    os.kill(pid, signal.SIGKILL)
    body = json.dumps({"question": QUESTIONS[1], "image_id": image_id}).encode()
    end = time.monotonic() + 120
    while True:  # the stick entry names a dead worker: balanced to the other, which lacks the image
        status, headers, reply = post(base + "/v1/vqa", body, "application/json")
        if status == 409 or time.monotonic() > end:
            break
        time.sleep(0.2)  # until HAProxy has seen the death (a 503 meanwhile is retried by clients)
    assert status == 409 and reply["error"]["code"] == "image_not_cached", (status, reply)
    again, new_worker = ask_image(base, image)  # the client sends the image again: the entry moves
    assert again == image_id
    status, headers, reply = post(base + "/v1/vqa", body, "application/json")
    assert status == 200 and headers["x-served-by"] == new_worker, (status, headers, reply)
    stats = cluster.server_status()
    assert len(stats) == 2


def test_the_python_client_asks_follow_ups_by_id_on_the_worker_that_holds_the_image(
        cluster: RunningCluster) -> None:
    """vqa_async.client through the cluster's front: ask_many over new images (prepared ahead), then the same
    images again: sent by image_id (nothing uploaded), answered by the worker that holds each (no cache miss).
    Eight images no other test here sends (the session's easy_vqa_images are the first eight): with both workers
    holding some, a follow-up balanced without the stick table finds the other worker's cache empty."""
    import easy_vqa

    from vqa_async.client import Client, VqaError

    until_both_workers_are_up(cluster)
    known = easy_vqa.get_test_image_paths()
    paths = [Path(known[i]) for i in sorted(known)[10:18]]
    assert len(paths) == 8
    hits0, misses0 = cache_counts(cluster.url)
    with Client(cluster.url, concurrency=8) as vqa:
        first = dict(vqa.ask_many((p, QUESTIONS[0]) for p in paths))
        assert sorted(first) == list(range(len(paths)))
        assert not any(isinstance(a, VqaError) for a in first.values()), first
        again = dict(vqa.ask_many((p, QUESTIONS[1]) for p in paths))
    assert sorted(again) == list(range(len(paths)))
    for i, a in again.items():
        assert not isinstance(a, VqaError), a
        before = first[i]
        assert not isinstance(before, VqaError)
        assert len(a.answers) == 1 and a.answers[0] and before.answers[0]  # real questions, real answers
        assert a.upload_bytes == 0 and a.image_id == before.image_id  # a follow-up by id
    hits, misses = cache_counts(cluster.url)
    assert misses - misses0 == len(paths)  # one vision pass per image: every follow-up found its worker
    assert hits - hits0 == len(paths)
