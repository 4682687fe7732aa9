"""Running it for a team, through the real app and model: keys, client identity, quotas, request IDs, traces,
Server-Timing, the access log, and TLS on a real `serve` process."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, make_mocked_request
from fakes import FaultyAnswerer

from vqa_async.config import Settings
from vqa_async.http.app_keys import METRICS, SERVICE
from vqa_async.http.auth import KeyRing, client_address
from vqa_async.http.tracing import RequestIdFilter

ClientMaker = Callable[..., Awaitable[TestClient[Any, Any]]]

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-fedcba9876543210"


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    p = tmp_path / "keys"
    p.write_text(f"# the team\nalice:{ALICE}\n\nbob {BOB} 3\n")
    return p


@pytest.fixture
def make_client(make_client: ClientMaker, tmp_path: Path) -> ClientMaker:
    """conftest's, with the access log in a file by default (the tests read it)."""
    async def make(**overrides: Any) -> TestClient[Any, Any]:
        overrides.setdefault("access_log", str(tmp_path / "access.log"))
        return await make_client(**overrides)

    return make


def form(image: bytes, *questions: str, **fields: str) -> FormData:
    f = FormData()
    f.add_field("image", image, filename="x.png", content_type="image/png")
    for q in questions:
        f.add_field("question", q)
    for k, v in fields.items():
        f.add_field(k, v)
    return f


def access_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_text().splitlines()]


# -- settings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, named", [({"scheduling": "lifo"}, "scheduling"), ({"tls_cert": "c.pem"}, "tls_key"),
                                        ({"tls_key": "k.pem"}, "tls_cert"), ({"trusted_proxies": "10.0.0/8"},
                                                                              "trusted_proxies"),
                                        ({"max_inflight_per_client": -1}, "max_inflight_per_client")])
def test_team_settings_are_validated_by_name(bad: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Settings(device="cpu", **bad)


def test_a_yes_no_setting_comes_as_a_value_so_the_cluster_can_pass_it_on() -> None:
    assert Settings.from_env({"VQA_METRICS_NEED_KEY": "true"}, device="cpu").metrics_need_key is True
    assert Settings.from_env({"VQA_METRICS_NEED_KEY": "0"}, device="cpu").metrics_need_key is False
    with pytest.raises(ValueError, match="VQA_METRICS_NEED_KEY"):
        Settings.from_env({"VQA_METRICS_NEED_KEY": "maybe"}, device="cpu")
    from vqa_async.cli import build_parser

    args = build_parser().parse_args(["serve", "--metrics-need-key", "False", "--access-log", "-"])
    assert args.metrics_need_key is False and args.access_log == "-"


# -- keys ------------------------------------------------------------------------------------------------------
def test_key_file_formats_weights_and_errors_that_never_show_a_key(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_text(f"# comment\n  \nalice:{ALICE}\nbob {BOB} 3\ncarol:c-key:2\n")
    ring = KeyRing(str(p))
    assert ring.names == ["alice", "bob", "carol"]
    assert ring.find(ALICE) == ring.find(ALICE) and ring.find(ALICE).name == "alice"  # type: ignore[union-attr]
    assert ring.find(BOB).weight == 3  # type: ignore[union-attr]
    assert ring.find("nope") is None and ring.find("") is None
    assert ALICE not in repr(ring.__dict__)  # hashes only
    for bad in (f"alice:{ALICE}:zero", "alice", f"alice:{ALICE}:1:2", f"ali/ce:{ALICE}", f"a:{ALICE}\nb:{ALICE}",
                "", "# only\n"):
        p.write_text(bad)
        with pytest.raises(ValueError) as e:
            KeyRing(str(p))
        assert ALICE not in str(e.value)


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"X-API-Key": "wrong"}, 401),
    ({"Authorization": f"Basic {ALICE}"}, 401),
    ({"Authorization": f"Bearer {ALICE}"}, 200),
    ({"X-API-Key": BOB}, 200),
])
async def test_api_needs_a_valid_key(make_client: ClientMaker, keys_file: Path, easy_vqa_images: list[Path],
                                     headers: dict[str, str], status: int, caplog: pytest.LogCaptureFixture,
                                     tmp_path: Path) -> None:
    client = await make_client(api_keys=str(keys_file))
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.DEBUG):
        r = await client.post("/v1/vqa", data=form(easy_vqa_images[0].read_bytes(), "what color is the shape?"),
                              headers=headers)
    assert r.status == status, await r.text()
    if status == 401:
        body = await r.json()
        assert body["error"]["code"] == "unauthorized"
        assert body["error"]["request_id"] == r.headers["X-Request-ID"]
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="vqa-async"'
    line = access_lines(tmp_path / "access.log")[-1]
    assert line["status"] == status
    expected = ("alice" if ALICE in str(headers) else "bob") if status == 200 else None
    assert line["client"] == expected
    if status == 200:  # per-client metrics, labelled by key name only
        app = client.server.app
        assert app is not None
        assert app[METRICS].registry.get_sample_value("vqa_client_requests_total",
                                                      {"client": expected, "status": "200"}) == 1
    logged = caplog.text + (tmp_path / "access.log").read_text()
    assert ALICE not in logged and BOB not in logged  # a key never reaches a log


async def test_probes_page_and_description_stay_open_metrics_by_setting(make_client: ClientMaker,
                                                                        keys_file: Path) -> None:
    client = await make_client(api_keys=str(keys_file))
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert (await client.get(path)).status == 200, path
    page = await (await client.get("/")).text()
    assert 'name="api_key"' in page and 'type="password"' in page
    closed = await make_client(api_keys=str(keys_file), metrics_need_key=True)
    assert (await closed.get("/metrics")).status == 401
    assert (await closed.get("/metrics", headers={"X-API-Key": ALICE})).status == 200
    assert (await closed.get("/healthz")).status == 200
    plain = await make_client()
    assert 'name="api_key"' not in await (await plain.get("/")).text()


async def test_the_pages_form_sends_its_key_as_a_field(make_client: ClientMaker, keys_file: Path,
                                                       easy_vqa_images: list[Path]) -> None:
    client = await make_client(api_keys=str(keys_file))
    img = easy_vqa_images[0].read_bytes()
    r = await client.post("/", data=form(img, "what color is the shape?"))
    assert r.status == 401 and "unauthorized" in await r.text()
    r = await client.post("/", data=form(img, "what color is the shape?", api_key="wrong"))
    assert r.status == 401
    r = await client.post("/", data=form(img, "what color is the shape?", api_key=ALICE))
    assert r.status == 200 and 'id="answer"' in await r.text()


async def test_sighup_reloads_the_keys_and_a_broken_file_keeps_the_old_ones(make_client: ClientMaker,
                                                                           keys_file: Path) -> None:
    client = await make_client(api_keys=str(keys_file), metrics_need_key=True)

    async def status(key: str) -> int:
        return (await client.get("/metrics", headers={"X-API-Key": key})).status

    async def hup() -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.2)  # the loop runs the handler

    assert await status(ALICE) == 200
    keys_file.write_text("alice:rotated-alice-key\n")
    await hup()
    assert await status(ALICE) == 401 and await status("rotated-alice-key") == 200
    keys_file.write_text("alice\n")  # broken: the rotated key stays in force
    await hup()
    assert await status("rotated-alice-key") == 200


# -- who a client is -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("peer, xff, expected", [
    ("127.0.0.1", "203.0.113.7", "203.0.113.7"),  # from the cluster's HAProxy on loopback
    ("127.0.0.1", "198.51.100.1, 203.0.113.7", "203.0.113.7"),  # the last hop HAProxy saw, not a forged first
    ("127.0.0.1", "203.0.113.7, 127.0.0.1", "203.0.113.7"),  # trusted hops are skipped
    ("127.0.0.1", "garbage", "127.0.0.1"),
    ("127.0.0.1", None, "127.0.0.1"),
    ("192.0.2.5", "203.0.113.7", "192.0.2.5"),  # anyone else cannot choose their name
])
def test_client_address_trusts_x_forwarded_for_only_from_a_trusted_proxy(peer: str, xff: str | None,
                                                                          expected: str) -> None:
    headers = {"X-Forwarded-For": xff} if xff else {}
    transport = type("T", (), {"get_extra_info": lambda self, name, default=None: (peer, 1234)
                               if name == "peername" else default})()
    req = make_mocked_request("GET", "/", headers=headers, transport=transport)
    assert client_address(req, Settings(device="cpu").trusted_networks) == expected


async def test_quota_past_max_inflight_per_client_is_429_and_others_are_served(
        make_client: ClientMaker, keys_file: Path, easy_vqa_images: list[Path]) -> None:
    client = await make_client(api_keys=str(keys_file), max_inflight_per_client=1)
    app = client.server.app
    assert app is not None
    ex = app[SERVICE].runner.adapter
    faulty = FaultyAnswerer(ex.answerer)  # type: ignore[arg-type]
    ex.answerer = faulty  # type: ignore[assignment]
    faulty.gate = threading.Event()  # the model thread holds alice's first request
    img = easy_vqa_images[0].read_bytes()

    def ask(key: str) -> Any:
        return client.post("/v1/vqa", data=form(img, "what color is the shape?"), headers={"X-API-Key": key})

    first = asyncio.create_task(ask(ALICE))
    for _ in range(200):
        await asyncio.sleep(0.02)
        if faulty.batches:
            break
    second = await ask(ALICE)
    assert second.status == 429
    assert second.headers["Retry-After"] == "1"
    assert (await second.json())["error"]["code"] == "too_many_requests"
    bob = asyncio.create_task(ask(BOB))  # another client is not limited by alice
    await asyncio.sleep(0.1)
    faulty.gate.set()
    assert (await first).status == 200 and (await bob).status == 200
    assert (await ask(ALICE)).status == 200  # the slot is free again


# -- request ids, traces, timings, the access log ----------------------------------------------------------------
async def test_request_ids_traceparent_server_timing_and_the_access_log(
        make_client: ClientMaker, easy_vqa_images: list[Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(worker_name="w7")
    img = easy_vqa_images[0].read_bytes()
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = await client.post("/v1/vqa", data=form(img, "what color is the shape?", "what shape is it?"),
                          headers={"X-Request-ID": "report-42", "traceparent": tp})
    assert r.status == 200
    assert r.headers["X-Request-ID"] == "report-42" and r.headers["traceparent"] == tp
    timing = r.headers["Server-Timing"]
    assert all(f"{k};dur=" in timing for k in ("queue", "preprocess", "compute", "total"))

    r = await client.get("/nowhere", headers={"X-Request-ID": "bad id\u00e9 with spaces", "traceparent": "junk"})
    rid = r.headers["X-Request-ID"]
    assert r.status == 404 and rid != "bad id\u00e9 with spaces" and len(rid) == 32
    assert "traceparent" not in r.headers
    assert (await r.json())["error"]["request_id"] == rid
    assert "Server-Timing" in r.headers

    r = await client.put("/v1/vqa")
    assert r.status == 405 and "POST" in r.headers["Allow"]

    r = await client.post("/vqa", data=b"x", headers={"Content-Type": "text/plain"})
    assert r.status == 415 and (await r.json())["request_id"] == r.headers["X-Request-ID"]

    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        r = await client.post("/v1/vqa", data=form(img, "what color is the shape?"),
                              headers={"X-Request-ID": "logged-1", "Authorization": "Bearer not-configured"})
    assert r.status == 200  # without --api-keys a key is not asked for
    ours = [rec for rec in caplog.records if rec.name.startswith("vqa_async.http")]
    assert all(rec.request_id == "logged-1" for rec in ours)  # type: ignore[attr-defined]

    assert (await client.get("/healthz")).status == 200  # a passing probe is not logged
    lines = access_lines(tmp_path / "access.log")
    first = lines[0]
    assert first["request_id"] == "report-42" and first["traceparent"] == tp
    assert first["client"] == "127.0.0.1" and first["route"] == "/v1/vqa" and first["status"] == 200
    assert first["questions"] == 2 and first["batch_size"] >= 2 and first["upload_bytes"] > len(img)
    assert first["worker"] == "w7"
    for k in ("time", "latency_ms", "queue_ms", "preprocess_ms", "compute_ms"):
        assert first[k] is not None, k
    assert [ln["status"] for ln in lines] == [200, 404, 405, 415, 200]
    assert lines[1]["route"] == "unmatched" and lines[1]["error"] == "not_found"


async def test_access_log_off_writes_nothing(make_client: ClientMaker, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    client = await make_client(access_log="off")
    assert (await client.get("/healthz")).status == 200
    assert not (tmp_path / "access.log").exists()
    assert capsys.readouterr().out == ""


# -- TLS on serve ----------------------------------------------------------------------------------------------
def test_serve_over_tls_answers_with_its_ca_and_refuses_plain_http(tmp_path: Path, demo_dir: Path,
                                                                   easy_vqa_images: list[Path]) -> None:
    from bench.lib.certs import self_signed_cert
    from vqa_async.testing.launch import start_serve

    cert, key = self_signed_cert(tmp_path)
    srv = start_serve(demo_dir, tls=(cert, key), home=tmp_path)  # ready: its /readyz answered over TLS
    port, proc, url = srv.port, srv.proc, srv.url
    assert url == f"https://127.0.0.1:{port}"
    try:
        ctx = ssl.create_default_context(cafile=str(cert))

        async def scenario() -> tuple[int, int]:
            async with aiohttp.ClientSession() as s:
                for _ in range(600):
                    try:
                        async with s.get(url + "/readyz", ssl=ctx) as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    assert proc.poll() is None, "serve exited"
                    await asyncio.sleep(0.2)
                async with s.post(url + "/v1/vqa", ssl=ctx, data=form(easy_vqa_images[0].read_bytes(),
                                                                       "what color is the shape?")) as r:
                    answered = r.status
                try:
                    async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                        plain: int | None = r.status
                except aiohttp.ClientConnectionError:  # closed without an HTTP answer
                    plain = None
                return answered, plain

        answered, plain = asyncio.run(scenario())
        assert answered == 200
        assert plain is None  # plain HTTP to the TLS port gets no HTTP answer at all, not even an error
        curl = subprocess.run(["curl", "-sS", "-v", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(cert),
                               url + "/readyz"], capture_output=True, text=True, timeout=30)
        assert curl.stdout == "200", curl.stderr
        assert re.search(r"ALPN.*accepted.*http/1\.1", curl.stderr), curl.stderr  # curl offers h2 too
        insecure = subprocess.run(["curl", "-sS", "-o", "/dev/null", url + "/readyz"], capture_output=True,
                                  timeout=30)
        assert insecure.returncode != 0  # an unknown CA is refused by a checking client
    finally:
        srv.stop()


# -- the fairness bench, tiny ----------------------------------------------------------------------------------
def test_fairness_bench_runs_tiny_and_reports_its_contracted_keys() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "fairness", "--seconds", "1", "--repeats", "1",
                          "--big-concurrency", "4", "--settings", "fair,fifo"], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = orjson.loads(out.stdout.strip().splitlines()[-1])
    assert [r["setting"] for r in rows] == ["fair", "fifo"]
    for result in rows:
        assert set(result) >= {"small_p95_alone_ms", "small_p95_shared_ms", "big_answers_per_s_alone",
                               "big_answers_per_s_shared", "ratio", "big_share", "repeats", "failures"}
        assert result["big_answers_per_s_alone"] > 0 and result["failures"] == 0
