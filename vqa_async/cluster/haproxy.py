"""HAProxy: the configuration rendered from `haproxy/haproxy.cfg.j2`, the process, and its runtime API."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from vqa_async.cluster.backends import DnsBackends
from vqa_async.cluster.children import start_child
from vqa_async.cluster.options import RETRYABLE_BODY_BYTES
from vqa_async.http import tls_profile
from vqa_async.http.errors import error_body

log = logging.getLogger(__name__)

# haproxy/ at the repository's top level, shipped in the wheel as this package (pyproject.toml).
TEMPLATE_DIR = Path(str(resources.files("vqa_async.haproxy_templates")))
# HAProxy's own errors: (status, code, message, Retry-After seconds or None), in the API's JSON shape.
EDGE_ERRORS = [
    (400, "bad_request", "the request is malformed", None),
    (408, "request_timeout", "the request did not arrive in time", None),
    (413, "body_too_large", "the request body is larger than allowed", None),
    (429, "too_many_requests", "too many connections or requests from your address; retry shortly", 1),
    (502, "bad_gateway", "a worker answered with something that is not HTTP", None),
    (503, "overloaded", "no worker could take the request in time; retry shortly", 1),
    (504, "timeout", "no worker answered in time", None),
]
MAXREWRITE = 8192  # buffer room HAProxy keeps for rewriting headers
HEADERS_ROOM = 16384  # the request's own headers, beside the body
RATE_WINDOW_S = 10
# Follow-ups by image id stick to the worker that answered about the image (the template's stick table): how many
# images it remembers, and for how long after the last answer about each.
IMAGE_TABLE_SIZE = 100_000
IMAGE_TABLE_EXPIRE_S = 3600
IMAGE_ID_BODY_LIMIT = 65536  # bodies searched for an image_id: a follow-up's, not an upload's


@dataclass(frozen=True)
class TlsProfile:
    """What the front's TLS offers: vqa_async/http/tls_profile.py, shared with `serve --tls-cert`."""

    ciphers: str = tls_profile.CIPHERS
    ciphersuites: str = tls_profile.CIPHERSUITES
    min_version: str = tls_profile.MIN_VERSION


@dataclass(frozen=True)
class Server:
    name: str
    address: str  # host:port


def render(servers: list[Server], *, host: str, port: int, stats_host: str, stats_port: int, admin_socket: Path,
           max_body_bytes: int, server_maxconn: int, queue_timeout_s: float, server_timeout_s: float,
           client_timeout_s: float = 30.0, check_interval_ms: int = 500, maxconn: int = 4096,
           log: bool = False, retry_body_bytes: int = RETRYABLE_BODY_BYTES, hard_stop_after_s: float = 45.0,
           max_conn_per_source: int = 0, rate_limit_per_source: float = 0.0,
           tls_pem: Path | None = None, rate_limit: float = 0.0, remote_servers: Sequence[Server] = (),
           dns: DnsBackends | None = None, summed_metrics: bool = False) -> str:
    """`remote_servers` and `dns`: workers on other machines (vqa_async/cluster/backends.py); `summed_metrics`:
    the front's /metrics is the workers' sum (vqa_async/cluster/metrics_dir.py)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.get_template("haproxy.cfg.j2").render(
        servers=servers, host=host, port=port, stats_host=stats_host, stats_port=stats_port,
        admin_socket=admin_socket, max_body_bytes=max_body_bytes, server_maxconn=server_maxconn,
        queue_timeout_s=queue_timeout_s, server_timeout_s=server_timeout_s, client_timeout_s=client_timeout_s,
        check_interval_ms=check_interval_ms, maxconn=maxconn, maxrewrite=MAXREWRITE,
        bufsize=retry_body_bytes + MAXREWRITE + HEADERS_ROOM,
        log=log, remote_servers=remote_servers, dns=dns, summed_metrics=summed_metrics,
        hard_stop_after_ms=int(hard_stop_after_s * 1000), max_conn_per_source=max_conn_per_source,
        # The rate is counted over 10 s, so that a short burst of a well-behaved client is not refused.
        rate_window_s=RATE_WINDOW_S, max_requests_per_window=int(rate_limit_per_source * RATE_WINDOW_S),
        errors=[(status, edge_error_body(status, code, message), retry_after)
                for status, code, message, retry_after in EDGE_ERRORS],
        tls_pem=tls_pem, tls=TlsProfile(), image_table_size=IMAGE_TABLE_SIZE,
        image_table_expire_s=IMAGE_TABLE_EXPIRE_S, image_id_body_limit=IMAGE_ID_BODY_LIMIT,
        max_requests_per_client=max(1, round(rate_limit * RATE_WINDOW_S)) if rate_limit else 0)


# HAProxy answers these before its `http-request` rules ran (a malformed or too slow request): the request's id
# is then HAProxy's own unique-id, not the variable those rules set.
BEFORE_RULES = frozenset({400, 408})


def edge_error_body(status: int, code: str, message: str) -> str:
    """An `lf-string` (HAProxy log-format) body: the API's error shape with the request's id filled in."""
    rid = "%[unique-id]" if status in BEFORE_RULES else "%[var(txn.request_id)]"
    body = json.dumps(error_body(code, message.replace("%", "%%"), request_id="@RID@"), separators=(",", ":"))
    return body.replace("@RID@", rid)


def find_haproxy() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


def haproxy_binary() -> str:
    found = find_haproxy()
    if not found:
        raise FileNotFoundError("haproxy is not installed: apt-get install haproxy (the README's run command does)")
    return found


async def check_config(path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(haproxy_binary(), "-c", "-f", str(path),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"haproxy rejects {path}: {out.decode(errors='replace').strip()}")


async def start(path: Path) -> asyncio.subprocess.Process:
    """HAProxy in the foreground (-db), so that it is our child and dies with us (even by SIGKILL)."""
    await check_config(path)
    return await start_child(haproxy_binary(), "-db", "-f", str(path))


class RuntimeApi:
    """HAProxy's runtime API on its admin socket: one command per connection."""

    def __init__(self, socket_path: Path, backend: str = "workers") -> None:
        self.socket_path = socket_path
        self.backend = backend

    async def command(self, cmd: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(cmd.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode()
        finally:
            writer.close()
            await writer.wait_closed()

    async def set_state(self, server: str, state: str) -> None:
        """state: ready | drain | maint."""
        out = await self.command(f"set server {self.backend}/{server} state {state}")
        if out.strip():
            raise RuntimeError(f"haproxy refused 'set server {server} state {state}': {out.strip()}")

    async def stats(self) -> dict[str, dict[str, Any]]:
        """`show stat` rows of the backend's servers, by server name."""
        text = await self.command("show stat")
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r for r in rows if r.get("pxname") == self.backend and r["svname"] != "BACKEND"}
