"""TLS follows Mozilla's intermediate profile at both places vqa-async terminates it: `serve --tls-cert` (its
SSLContext) and the cluster's HAProxy (the rendered configuration, run by a real HAProxy). Probed with `openssl
s_client`: static-RSA key exchange and CBC suites are refused, ECDHE with AES-GCM is accepted, TLS 1.1 is refused,
TLS 1.3 is accepted, and no TLS 1.2 session ticket is issued."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lib.certs import self_signed_cert
from vqa_async.cluster.haproxy import Server, find_haproxy, render
from vqa_async.cluster.supervisor import free_port, free_port_pair
from vqa_async.cluster.tls import write_pem
from vqa_async.config import Settings
from vqa_async.http.server import tls_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

REFUSED = ["AES256-SHA", "AES128-SHA256", "AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"]
ACCEPTED = ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"]


def handshake(port: int, *args: str) -> tuple[bool, str]:
    """Whether `openssl s_client` completes a handshake with these options, and its output."""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                          *args], input="", capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    return out.returncode == 0 and "Cipher is (NONE)" not in text, text


def wait_listening(port: int) -> None:
    end = time.monotonic() + 15
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def serve_port(cert: tuple[Path, Path]) -> Iterator[int]:
    """A TLS listener with `serve --tls-cert`'s own SSLContext (the handshake is all that is probed)."""
    ctx = tls_context(Settings(tls_cert=str(cert[0]), tls_key=str(cert[1])))
    assert ctx is not None
    port = free_port()
    loop = asyncio.new_event_loop()

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(reply, "127.0.0.1", port, ssl=ctx))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    wait_listening(port)
    yield port
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()


@pytest.fixture(scope="module")
def haproxy_port(cert: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The cluster's front as `vqa-async cluster --tls-cert` renders it, run by a real HAProxy (no worker needed
    for a handshake)."""
    haproxy = find_haproxy()
    if haproxy is None:
        pytest.skip("needs Debian's haproxy")
    tmp = tmp_path_factory.mktemp("front")
    port = free_port_pair()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(render([Server("w0", f"127.0.0.1:{free_port()}")], host="127.0.0.1", port=port,
                          stats_host="127.0.0.1", stats_port=port + 1, admin_socket=tmp / "admin.sock",
                          max_body_bytes=1 << 20, server_maxconn=4, queue_timeout_s=1, server_timeout_s=5,
                          tls_pem=write_pem(str(cert[0]), str(cert[1]), tmp)))
    proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("where", ["serve", "haproxy"])
def test_intermediate_profile(where: str, request: pytest.FixtureRequest) -> None:
    port: int = request.getfixturevalue(f"{where}_port")
    for cipher in REFUSED:
        ok, text = handshake(port, "-tls1_2", "-cipher", cipher)
        assert not ok, f"{where} accepted {cipher} on TLS 1.2:\n{text[-1500:]}"
    for cipher in ACCEPTED:
        ok, text = handshake(port, "-tls1_2", "-cipher", cipher)
        assert ok and f"Cipher is {cipher}" in text, f"{where} refused {cipher}:\n{text[-1500:]}"
        assert "TLS session ticket" not in text, f"{where} issued a TLS 1.2 session ticket"
    ok, text = handshake(port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert not ok, f"{where} accepted TLS 1.1"
    ok, text = handshake(port, "-tls1_3")
    assert ok and "TLSv1.3" in text, text[-1500:]
    if where == "haproxy":  # the DHE suites, with RFC 7919's 2048-bit group (Python's ssl has no DH group)
        ok, text = handshake(port, "-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256")
        assert ok and "DHE-RSA-AES128-GCM-SHA256" in text, text[-1500:]
        assert "Server Temp Key: DH, 2048 bits" in text, text[-1500:]
