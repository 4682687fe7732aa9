"""The cluster's front door, through a real HAProxy and a worker on the demo model: TLS (HTTP/2 and 1.1),
request IDs end to end, X-Forwarded-For set by HAProxy alone, the per-client rate limit and the JSON log."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_support import RunningCluster, stop_cluster

from bench.lib.certs import self_signed_cert
from bench.lib.loadgen import easy_vqa_requests, encode_forms
from vqa_async.cli import build_parser, cluster_options
from vqa_async.cluster.haproxy import find_haproxy
from vqa_async.testing.launch import start_cluster

pytestmark = pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")

RATE = 2  # --rate-limit: requests/s per client, over 10 s


@dataclass
class Front:
    cluster: RunningCluster
    cert: Path
    access_log: Path  # the worker's
    haproxy_log: Path  # the cluster's stderr: its own log lines and HAProxy's JSON ones

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
                source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        conn = http.client.HTTPSConnection("127.0.0.1", self.cluster.port, context=ctx, timeout=30,
                                           source_address=(source, 0))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def vqa(self, headers: dict[str, str] | None = None, source: str = "127.0.0.1") -> tuple[int, dict[str, str]]:
        form = encode_forms(easy_vqa_requests(1))[0]
        status, hdrs, _ = self.request("POST", "/v1/vqa", {"Content-Type": form.content_type, **(headers or {})},
                                       form.body, source)
        return status, hdrs

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["curl", "-sS", "--max-time", "30", "--cacert", str(self.cert), *args],
                              capture_output=True, text=True, timeout=60)

    def worker_lines(self, request_id: str) -> list[dict]:  # type: ignore[type-arg]
        return lines_with(self.access_log, request_id)

    def haproxy_lines(self, request_id: str) -> list[dict]:  # type: ignore[type-arg]
        return lines_with(self.haproxy_log, request_id)


def json_lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    text = path.read_text(errors="replace") if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def lines_with(path: Path, request_id: str, wait_s: float = 5.0) -> list[dict]:  # type: ignore[type-arg]
    end = time.monotonic() + wait_s  # a log line is written as the answer leaves: give it a moment
    while True:
        found = [rec for rec in json_lines(path) if rec.get("request_id") == request_id]
        if found or time.monotonic() > end:
            return found
        time.sleep(0.1)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("front")
    cert, key = self_signed_cert(tmp)
    access, errlog = tmp / "access.jsonl", tmp / "stderr.log"
    # Ready when HAProxy sees its worker up: nothing through the front before the tests (its rate limit counts).
    cl = start_cluster(demo_dir, "--haproxy-log", "--rate-limit", str(RATE), tls=(cert, key), access_log=access,
                       log=errlog, workers=1, home=tmp, probe=False, timeout=240)
    f = Front(cl, cert, access, errlog)
    yield f
    stop_cluster(cl)


def test_tls_at_the_front_http2_and_http11_and_no_plain_http(front: Front) -> None:
    url = f"https://127.0.0.1:{front.cluster.port}"
    h2 = front.curl("--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", url + "/readyz")
    assert h2.stdout == "2 200", h2
    h1 = front.curl("--http1.1", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", url + "/readyz")
    assert h1.stdout == "1.1 200", h1
    image, question = easy_vqa_requests(1)[0]
    (front.access_log.parent / "img.png").write_bytes(image)
    answer = front.curl("--http2", "-F", f"image=@{front.access_log.parent / 'img.png'}", "-F",
                        f"question={question}", url + "/v1/vqa")
    assert answer.returncode == 0 and json.loads(answer.stdout)["answer"], answer
    plain = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
                            f"http://127.0.0.1:{front.cluster.port}/readyz"], capture_output=True, text=True)
    assert (plain.returncode, plain.stdout) == (52, "000"), plain  # closed unanswered (curl 52: empty reply)
    pem = front.cluster.runtime_dir / "tls.pem"  # HAProxy's cert+key file: the key's secrecy kept
    assert pem.stat().st_mode & 0o777 == 0o600
    # The failed handshake is logged as JSON too.
    assert any(rec.get("error") for rec in json_lines(front.haproxy_log)), front.haproxy_log.read_text()[-2000:]


def test_tls_files_are_checked_at_startup(tmp_path: Path) -> None:
    """Before any worker starts (cluster_options is the CLI's first step; `main` turns the error into exit 2)."""
    cert, key = self_signed_cert(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = self_signed_cert(tmp_path / "other")

    def options(*flags: str) -> None:
        cluster_options(build_parser().parse_args(["cluster", *flags]))

    with pytest.raises(ValueError, match="--tls-cert .*nope.pem: no such file"):
        options("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key))
    with pytest.raises(ValueError, match="matching private key"):
        options("--tls-cert", str(cert), "--tls-key", str(other_key))
    with pytest.raises(ValueError, match="go together"):
        options("--tls-cert", str(cert))
    options("--tls-cert", str(cert), "--tls-key", str(key))


def test_request_ids_from_the_front_reach_the_worker_and_the_answer(front: Front) -> None:
    status, hdrs = front.vqa()
    assert status == 200
    rid = hdrs["x-request-id"]
    assert rid and front.worker_lines(rid), (rid, front.access_log.read_text()[-1000:])
    [line] = front.haproxy_lines(rid)  # HAProxy's JSON log: the same id, the same keys as the worker's
    assert {"time", "request_id", "client", "method", "route", "status", "latency_ms", "upload_bytes",
            "worker"} <= set(line)
    assert (line["route"], line["status"], line["worker"], line["client"]) == ("/v1/vqa", 200, "w0", "127.0.0.1")
    assert [w["worker"] for w in front.worker_lines(rid)] == ["w0"]  # both logs name the worker alike
    status, hdrs = front.vqa({"X-Request-ID": "client-chosen.42"})  # a sane one is kept end to end
    assert status == 200 and hdrs["x-request-id"] == "client-chosen.42"
    assert front.worker_lines("client-chosen.42") and front.haproxy_lines("client-chosen.42")
    status, hdrs = front.vqa({"X-Request-ID": "not sane, {}"})  # replaced, not passed on
    assert status == 200 and hdrs["x-request-id"] != "not sane, {}" and front.worker_lines(hdrs["x-request-id"])


def test_the_worker_sees_the_real_client_not_a_forged_forwarded_for(front: Front) -> None:
    # From 127.0.0.2: an address of the client's own (HAProxy itself connects from 127.0.0.1, the trusted proxy).
    status, hdrs = front.vqa({"X-Forwarded-For": "203.0.113.9", "X-Request-ID": "forged-xff"}, source="127.0.0.2")
    assert status == 200
    [line] = front.worker_lines("forged-xff")
    assert line["client"] == "127.0.0.2", line
    # From 127.0.0.1, itself a trusted address: an appended X-Forwarded-For would let the forged entry win.
    status, _ = front.vqa({"X-Forwarded-For": "203.0.113.9", "X-Request-ID": "forged-xff-2"})
    assert status == 200
    [line] = front.worker_lines("forged-xff-2")
    assert line["client"] == "127.0.0.1", line


def test_rate_limit_per_client_answers_429_json_and_spares_the_others(front: Front) -> None:
    statuses = []
    for i in range(RATE * 10 + 10):  # more than the 10 s window allows one client (one API key)
        status, hdrs, body = front.request("GET", "/healthz", {"X-API-Key": "flooding-key", "X-Request-ID": f"f{i}"})
        statuses.append(status)
        if status == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {200}, statuses
    err = json.loads(body)["error"]
    assert err["code"] == "too_many_requests" and hdrs["retry-after"] == "1", (err, hdrs)
    assert err["request_id"] == hdrs["x-request-id"] == f"f{len(statuses) - 1}"
    # HAProxy's own answer is hardened like a worker's.
    assert hdrs["x-content-type-options"] == "nosniff" and hdrs["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in hdrs["content-security-policy"]
    status, hdrs, _ = front.request("GET", "/")  # the page keeps its own policy (it loads /static/page.js)
    assert status == 200 and "script-src 'self'" in hdrs["content-security-policy"]
    # The same address with another key, and Bearer, and no key at all, are other clients: unaffected.
    assert front.request("GET", "/healthz", {"X-API-Key": "calm-key"})[0] == 200
    assert front.request("GET", "/healthz", {"Authorization": "Bearer calm-key-2"})[0] == 200
    assert front.vqa()[0] == 200
    # The key is never logged: neither in HAProxy's log nor anywhere in the cluster's stderr.
    assert "flooding-key" not in front.haproxy_log.read_text()
    [refused] = front.haproxy_lines(f"f{len(statuses) - 1}")
    assert (refused["status"], refused["worker"]) == (429, "<NOSRV>")


def test_every_haproxy_log_line_is_json(front: Front) -> None:
    front.vqa()
    end = time.monotonic() + 10  # HAProxy writes its line once the request is done: it may come a moment later
    while not (lines := [ln for ln in front.haproxy_log.read_text().splitlines() if ln.startswith("{")]):
        assert time.monotonic() < end, front.haproxy_log.read_text()[-2000:]
        time.sleep(0.1)
    assert all(isinstance(json.loads(ln), dict) for ln in lines)
