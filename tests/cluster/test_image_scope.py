"""Image ids scoped to who asked (vqa_async/core/image_ids.py): with API keys an image's id names it for that key's
client only. Another key's follow-up by that id gets 409 image_not_cached; the key's own gets 200 from the cache
(one vision pass); the ids hold across a cluster's workers, whose HAProxy still sends a follow-up to the worker
holding its image. Without keys, the id stays the SHA-256 of the bytes (tests/test_followup.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from cluster_support import start_cluster, stop_cluster

from vqa_async.app import init_app
from vqa_async.config import Settings
from vqa_async.core.image_ids import SECRET_ENV, image_id, scope_of
from vqa_async.http.app_keys import METRICS

ClientMaker = Callable[..., Awaitable[TestClient[Any, Any]]]
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"
QUESTION = "what color is the shape?"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "keys"
    p.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return p


@pytest.fixture
def make_client(aiohttp_client: Any, demo_dir: Path, keys_file: Path) -> ClientMaker:
    async def make(**overrides: Any) -> TestClient[Any, Any]:
        settings = Settings(model=str(demo_dir), device="cpu", api_keys=str(keys_file), **overrides)
        return await aiohttp_client(init_app(settings))

    return make


def metric(client: TestClient[Any, Any], name: str, labels: dict[str, str] | None = None) -> float:
    app = client.server.app
    assert app is not None
    return app[METRICS].registry.get_sample_value(name, labels or {}) or 0.0


async def ask(client: TestClient[Any, Any], key: str, image: bytes | None = None,
              image_id: str | None = None) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"question": QUESTION}
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    if image_id is not None:
        body["image_id"] = image_id
    r = await client.post("/v1/vqa", json=body, headers=auth(key))
    return r.status, await r.json()


async def test_another_keys_image_id_is_409_and_the_own_is_answered_from_the_cache(
        make_client: ClientMaker, easy_vqa_images: list[Path]) -> None:
    client = await make_client()
    image = easy_vqa_images[0].read_bytes()
    status, alice = await ask(client, ALICE, image)
    assert status == 200
    alice_id = alice["image_id"]
    assert alice_id != hashlib.sha256(image).hexdigest()  # no id tells which bytes it names

    hits = metric(client, "vqa_image_cache_hits_total")
    decodes = metric(client, "vqa_stage_seconds_total", {"stage": "decode"})
    status, again = await ask(client, ALICE, image_id=alice_id)
    assert status == 200 and again["answer"] == alice["answer"] and again["image_id"] == alice_id
    assert metric(client, "vqa_image_cache_hits_total") == hits + 1  # from the cache: no vision pass
    assert metric(client, "vqa_stage_seconds_total", {"stage": "decode"}) == decodes  # nothing decoded

    status, refused = await ask(client, BOB, image_id=alice_id)  # bob holds alice's id: it names nothing for him
    assert status == 409 and refused["error"]["code"] == "image_not_cached"

    misses = metric(client, "vqa_image_cache_misses_total")
    status, bob = await ask(client, BOB, image)  # the same bytes: bob's own id, his own vision pass
    assert status == 200 and bob["answer"] == alice["answer"]
    assert bob["image_id"] not in (alice_id, hashlib.sha256(image).hexdigest())
    assert metric(client, "vqa_image_cache_misses_total") == misses + 1
    assert (await ask(client, BOB, image_id=bob["image_id"]))[0] == 200
    assert (await ask(client, ALICE, image_id=bob["image_id"]))[0] == 409
    assert (await ask(client, ALICE, image_id=alice_id))[0] == 200  # bob's upload took nothing from alice


async def test_ids_derive_from_the_server_secret_and_the_key(make_client: ClientMaker, easy_vqa_images: list[Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    image = easy_vqa_images[1].read_bytes()
    monkeypatch.setenv(SECRET_ENV, "team-secret")
    ids = [(await ask(await make_client(), ALICE, image))[1]["image_id"] for _ in range(2)]
    # Two processes given the same secret (a cluster's workers) agree, and an operator can tell how.
    expected = image_id(image, scope_of(b"team-secret", hashlib.sha256(ALICE.encode()).digest()))
    assert ids == [expected, expected]
    monkeypatch.delenv(SECRET_ENV)
    assert (await ask(await make_client(), ALICE, image))[1]["image_id"] != expected  # a fresh secret: fresh ids


def _post(url: str, body: dict[str, Any], key: str, image_id: str | None = None) -> tuple[int, dict[str, Any], str]:
    headers = {"Content-Type": "application/json", **auth(key), **({"X-Image-Id": image_id} if image_id else {})}
    req = urllib.request.Request(url + "/v1/vqa", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers["X-Served-By"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers.get("X-Served-By", "")


@pytest.mark.slow
def test_through_the_cluster(tmp_path: Path, demo_dir: Path, keys_file: Path, easy_vqa_images: list[Path]) -> None:
    cl = start_cluster(tmp_path, demo_dir, "--api-keys", str(keys_file), workers=2)
    try:
        image = base64.b64encode(easy_vqa_images[2].read_bytes()).decode()
        with ThreadPoolExecutor(8) as pool:  # at once, so that both workers answer some
            uploads = list(pool.map(lambda _: _post(cl.url, {"image": image, "question": QUESTION}, ALICE), range(8)))
        assert {status for status, _, _ in uploads} == {200}
        assert len({by for _, _, by in uploads}) == 2, uploads  # both workers...
        assert len({body["image_id"] for _, body, _ in uploads}) == 1  # ...give alice the same id
        # Another picture, once: one worker holds it, and the stick table sends alice's follow-ups there.
        status, first, holder = _post(cl.url, {"image": base64.b64encode(easy_vqa_images[3].read_bytes()).decode(),
                                               "question": QUESTION}, ALICE)
        assert status == 200
        follow_ups = [_post(cl.url, {"question": QUESTION}, ALICE, first["image_id"]) for _ in range(6)]
        assert {(status, by) for status, _, by in follow_ups} == {(200, holder)}
        status, body, by = _post(cl.url, {"question": QUESTION}, BOB, first["image_id"])
        assert status == 409 and body["error"]["code"] == "image_not_cached" and by == holder
    finally:
        stop_cluster(cl)
