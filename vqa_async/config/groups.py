"""`serve`'s settings by concern: one small frozen dataclass each. `Settings` (settings.py) is all of them at
once, so that code reads `settings.max_batch_size` as it always has, and a function that needs one concern can
take that group's type (a Settings is one). The order here is the order of `--help` and docs/settings.md.

A group's `check` names a bad value (types and Literal values are checked for every group by fields.check_types).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from vqa_async.config.fields import invalid, setting

Dtype = Literal["auto", "float16", "fp16", "bfloat16", "bf16", "float32", "fp32"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LOG_LEVELS: tuple[str, ...] = LogLevel.__args__  # type: ignore[attr-defined]


def _positive(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise invalid(name, getattr(obj, name), "must be positive")


def _at_least_1(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise invalid(name, getattr(obj, name), "must be at least 1")


def _not_negative(obj: object, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise invalid(name, getattr(obj, name), "must not be negative")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Server: where it listens, its connections, how it stops."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "TCP port")
    unix_socket: str | None = setting(None, "listen on this unix socket instead of TCP")
    tls_cert: str | None = setting(None, "PEM certificate (chain): serve HTTPS")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    max_connections: int = setting(1024, "open client connections of one serve process; more are answered 503 and "
                                          "closed")
    loop: Literal["uvloop", "asyncio"] = setting("uvloop", "event loop: uvloop or asyncio")
    shutdown_timeout_s: float = setting(30.0, "how long SIGTERM waits for queued work")
    drain_s: float = setting(0.0, "on SIGTERM, first fail /readyz and answer new requests with a retryable 503 for "
                                  "this long, so that a load balancer takes this process out before its socket closes")

    def check(self) -> None:
        if not 0 < self.port < 65536:
            raise invalid("port", self.port, "expected 1..65535")
        _at_least_1(self, "max_connections")
        _not_negative(self, "shutdown_timeout_s", "drain_s")
        if (self.tls_cert is None) != (self.tls_key is None):
            name = "tls_cert" if self.tls_cert is None else "tls_key"
            raise invalid(name, getattr(self, name), "--tls-cert and --tls-key go together")


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """Model: which one, on what, and how it answers."""

    model: str | None = setting(None, "serving directory (default: the shipped demo model)")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto", auto="cuda if torch sees a GPU, else cpu")
    dtype: Dtype = setting("auto", "float16, bfloat16, float32 or auto (fp16 on CUDA)")
    decoder: Literal["fast", "reference"] = setting(
        "fast", "fast (cached keys/values, same answers) or reference (ModelScope's own beam search)")
    torch_threads: int = setting(0, "intra-op threads of the model (0: torch's default)")
    image_cache_entries: int = setting(512, "image embeddings kept for follow-up questions")
    image_cache_mb: float = setting(256.0, "memory bound of that cache")

    def check(self) -> None:
        if not (self.device in ("cpu", "cuda") or self.device.startswith("cuda:")):
            raise invalid("device", self.device, "expected cpu, cuda, cuda:N or auto")
        _not_negative(self, "torch_threads", "image_cache_entries", "image_cache_mb")


@dataclass(frozen=True, kw_only=True)
class BatchingSettings:
    """Batching: how questions are gathered into one model call, and how long a request may wait."""

    max_batch_size: int = setting(0, "questions per model call (0: 16 on CPU, 64 on CUDA)",
                                  auto="16 on CPU, 64 on CUDA")
    max_wait_ms: float = setting(-1.0, "longest wait for more work when requests are on their way (-1: 5 ms on "
                                       "CPU, 2 ms on CUDA)", auto="5 ms on CPU, 2 ms on CUDA")
    return_window_ms: float = setting(
        -1.0, "after a batch is answered, how long (from that answer) to wait for its clients to come back with "
              "their next request, so that they go in one batch (-1: --max-wait-ms; 0: never wait for them)",
        auto="--max-wait-ms")
    max_queue: int = setting(256, "requests waiting for the model before 503")
    timeout_s: float = setting(30.0, "deadline of a request, from arrival (504 after)")

    def check(self) -> None:
        _at_least_1(self, "max_batch_size", "max_queue")
        _positive(self, "timeout_s")
        for name in ("max_wait_ms", "return_window_ms"):
            if getattr(self, name) > 1000:
                raise invalid(name, getattr(self, name), "more than a second of waiting is never what you want")


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """Images: decoding and resizing uploads."""

    max_pixels: int = setting(40_000_000, "largest image, in pixels (decompression bombs)")
    exact_preprocess: bool = setting(False, "decode every pixel of a JPEG, as ModelScope does (default: the "
                                            "smallest DCT scale >= the input)")
    gpu_decode: bool = setting(False, "on CUDA, decode JPEGs with nvJPEG and resize on the device (not yet measured "
                                      "on a GPU)")
    preprocess_threads: int = setting(0, "threads decoding and resizing images (0: one per core, at most 8)",
                                      auto="one per core, at most 8")
    max_preprocess_backlog: int = setting(
        0, "uploads accepted for decoding at once, running or waiting (0: 64 per preprocessing thread, at most "
           "max_queue); more is a fast 503, before any CPU is spent on them",
        auto="64 per preprocessing thread, at most --max-queue")
    inline_prepare_kb: float = setting(
        0.0, "uploads up to this size are decoded on the event loop, not handed to a preprocessing thread (0, the "
             "default: every upload in the pool; the bench's ablation compares the two)")

    def check(self) -> None:
        _at_least_1(self, "max_pixels", "preprocess_threads", "max_preprocess_backlog")
        _not_negative(self, "inline_prepare_kb")


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    """Request limits: what one request may hold, and how long its body may take."""

    max_body_mb: float = setting(10.0, "largest request body (413 above)")
    max_questions: int = setting(16, "questions per request")
    max_question_chars: int = setting(512, "longest question, in characters")
    max_form_parts: int = setting(64, "parts of a multipart upload (400 too_many_parts above; nothing past the "
                                      "bound is read)")
    body_timeout_s: float = setting(30.0, "the whole request body must arrive within this (408 request_timeout "
                                          "after)")

    def check(self) -> None:
        _at_least_1(self, "max_questions", "max_question_chars")
        _positive(self, "max_body_mb", "body_timeout_s")
        if self.max_form_parts <= self.max_questions:
            raise invalid("max_form_parts", self.max_form_parts, f"must be more than max_questions "
                          f"({self.max_questions}): the image and every question are parts")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


@dataclass(frozen=True, kw_only=True)
class MediaSettings:
    """Image URLs: which hosts a request may name an image on, and how long fetching it may take."""

    allowed_media_domains: str | None = setting(
        None, "comma-separated host names whose http(s) image URLs are fetched (image_url), each matched exactly: "
              "example.com does not allow cdn.example.com. Unset: image URLs are refused")
    allow_private_media: bool = setting(
        False, "image URLs may resolve to private and loopback addresses (an in-house store); link-local and "
               "cloud-metadata addresses stay refused")
    media_connect_timeout_s: float = setting(
        3.0, "an image URL's server must accept the connection within this (400 image_url_timeout after)")
    media_timeout_s: float = setting(
        10.0, "an image URL must be fetched whole, redirects included, within this (400 image_url_timeout)")

    def check(self) -> None:
        _positive(self, "media_connect_timeout_s", "media_timeout_s")
        try:
            self.media_domains  # noqa: B018 - parsed here so that a bad value is named at startup
        except ValueError as e:
            raise invalid("allowed_media_domains", self.allowed_media_domains, str(e)) from None

    @functools.cached_property
    def media_domains(self) -> frozenset[str]:
        """The hosts image URLs may name, as the URL parser spells them (lowercase, IDNA-encoded)."""
        return frozenset(media_host(d) for d in (self.allowed_media_domains or "").split(",") if d.strip())


@dataclass(frozen=True, kw_only=True)
class HealthSettings:
    """Health: when the probes say a process is stuck or sick."""

    stuck_timeout_s: float = setting(60.0, "a model call running longer than this makes /healthz and /readyz fail "
                                           "(a hung model thread)")
    sick_after_failures: int = setting(5, "requests failing in the model in a row before /readyz fails; a probe "
                                          "brings it back")

    def check(self) -> None:
        _positive(self, "stuck_timeout_s")
        _at_least_1(self, "sick_after_failures")


@dataclass(frozen=True, kw_only=True)
class TeamSettings:
    """A service for a team: keys, fairness between clients, the proxies in front."""

    api_keys: str | None = setting(
        None, "file of API keys, one per line: NAME:KEY or NAME:KEY:WEIGHT (# comments); re-read on SIGHUP. "
              "Without it, no key is asked for")
    metrics_need_key: bool = setting(False, "with --api-keys, /metrics asks for a key too")
    trusted_proxies: str = setting(
        "127.0.0.1/32,::1", "comma-separated networks whose X-Forwarded-For names the client (the cluster's "
                            "HAProxy is on loopback)")
    scheduling: Literal["fair", "fifo"] = setting(
        "fair", "fair (each batch filled round-robin across clients, by key name or address) or fifo")
    preempt_share: float = setting(
        0.5, "with fair scheduling: the most of the model's time that requests of light clients may take by being "
             "answered inside a running bulk batch, between its layers (0: never; they then ride in the next batch)")
    max_inflight_per_client: int = setting(
        0, "requests of one client being answered at once; more are 429 too_many_requests (0: no limit)")

    def check(self) -> None:
        _not_negative(self, "max_inflight_per_client")
        if not 0 <= self.preempt_share <= 1:
            raise invalid("preempt_share", self.preempt_share, "expected a fraction from 0 to 1")
        try:
            self.trusted_networks  # noqa: B018 - parsed here so that a bad value is named at startup
        except ValueError as e:
            raise invalid("trusted_proxies", self.trusted_proxies, str(e)) from None

    @functools.cached_property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in self.trusted_proxies.split(",")
                     if n.strip())


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    """Logging."""

    access_log: str = setting("-", "one JSON line per request: - (stdout), a file path (reopened on SIGHUP), or off")
    worker_name: str | None = setting(None, "this process's name in the access log (default: its pid)")
    log_level: LogLevel = setting("INFO", "DEBUG, INFO, WARNING, ERROR (any case)")

    def check(self) -> None:
        pass


GROUPS = (ServerSettings, ModelSettings, BatchingSettings, ImageSettings, LimitSettings, MediaSettings,
          HealthSettings, TeamSettings, LoggingSettings)


def media_host(entry: str) -> str:
    """One --allowed-media-domains entry: a host name or an IP address, nothing else (no scheme, port, path or
    wildcard: a name allows exactly that host)."""
    entry = entry.strip()
    bare = entry.removeprefix("[").removesuffix("]")
    try:
        if ":" in bare:  # only an IPv6 address has one; a port or a scheme is a mistake
            return str(ipaddress.IPv6Address(bare))
        host = URL.build(scheme="http", host=bare).raw_host
    except (ValueError, TypeError):
        host = None
    if not host or any(c in bare for c in "/@*?#[]"):
        raise ValueError(f"{entry!r} is not a host name or address (no scheme, port, path or wildcard)")
    return host.rstrip(".").lower()
