"""Settings: one typed object, validated when built. Command-line flags override `VQA_*` environment variables,
which override the defaults; some defaults depend on the device."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import ipaddress
import os
from dataclasses import dataclass, field, fields
from typing import Any

from yarl import URL

ENV_PREFIX = "VQA_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _default_device() -> str:
    from vqa_async.devices import default_device  # without torch: the cluster's supervisor resolves `auto` too

    return default_device()


# Variables of ours that are not settings (the test faults' file and demo model, the bench's photo set, the key
# `vqa-async batch` sends): allowed beside the settings' own. Any other VQA_* is a mistake, refused at start (a
# misspelled VQA_API_KEYS must not start a server without authentication).
OTHER_ENV = frozenset({"VQA_TEST_FAULT_FILE", "VQA_TEST_DEMO_DIR", "VQA_PHOTOS_DIR", "VQA_CLIENT_API_KEY"})


@dataclass(frozen=True)
class Settings:
    model: str | None = field(default=None, metadata={"help": "serving directory (default: the shipped demo model)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    unix_socket: str | None = field(default=None, metadata={"help": "listen on this unix socket instead of TCP"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="auto", metadata={"help": "float16, bfloat16, float32 or auto (fp16 on CUDA)"})
    max_batch_size: int = field(default=0, metadata={"help": "questions per model call (0: 16 on CPU, 64 on CUDA)"})
    max_wait_ms: float = field(default=-1.0, metadata={
        "help": "longest wait for more work when requests are on their way (-1: 5 ms on CPU, 2 ms on CUDA)"})
    return_window_ms: float = field(default=-1.0, metadata={
        "help": "after a batch is answered, how long (from that answer) to wait for its clients to come back with "
                "their next request, so that they go in one batch (-1: --max-wait-ms; 0: never wait for them)"})
    max_queue: int = field(default=256, metadata={"help": "requests waiting for the model before 503"})
    timeout_s: float = field(default=30.0, metadata={"help": "deadline of a request, from arrival (504 after)"})
    max_body_mb: float = field(default=10.0, metadata={"help": "largest request body (413 above)"})
    max_pixels: int = field(default=40_000_000, metadata={"help": "largest image, in pixels (decompression bombs)"})
    max_questions: int = field(default=16, metadata={"help": "questions per request"})
    max_question_chars: int = field(default=512, metadata={"help": "longest question, in characters"})
    allowed_media_domains: str | None = field(default=None, metadata={
        "help": "comma-separated host names whose http(s) image URLs are fetched (image_url), each matched "
                "exactly: example.com does not allow cdn.example.com. Unset: image URLs are refused"})
    allow_private_media: bool = field(default=False, metadata={
        "help": "image URLs may resolve to private and loopback addresses (an in-house store); link-local and "
                "cloud-metadata addresses stay refused"})
    media_connect_timeout_s: float = field(default=3.0, metadata={
        "help": "an image URL's server must accept the connection within this (400 image_url_timeout after)"})
    media_timeout_s: float = field(default=10.0, metadata={
        "help": "an image URL must be fetched whole, redirects included, within this (400 image_url_timeout)"})
    max_form_parts: int = field(default=64, metadata={
        "help": "parts of a multipart upload (400 too_many_parts above; nothing past the bound is read)"})
    body_timeout_s: float = field(default=30.0, metadata={
        "help": "the whole request body must arrive within this (408 request_timeout after)"})
    max_connections: int = field(default=1024, metadata={
        "help": "open client connections of one serve process; more are answered 503 and closed"})
    stuck_timeout_s: float = field(default=60.0, metadata={
        "help": "a model call running longer than this makes /healthz and /readyz fail (a hung model thread)"})
    sick_after_failures: int = field(default=5, metadata={
        "help": "requests failing in the model in a row before /readyz fails; a probe brings it back"})
    decoder: str = field(default="fast", metadata={
        "help": "fast (cached keys/values, same answers) or reference (ModelScope's own beam search)"})
    image_cache_entries: int = field(default=512, metadata={"help": "image embeddings kept for follow-up questions"})
    image_cache_mb: float = field(default=256.0, metadata={"help": "memory bound of that cache"})
    exact_preprocess: bool = field(default=False, metadata={
        "help": "decode every pixel of a JPEG, as ModelScope does (default: the smallest DCT scale >= the input)"})
    gpu_decode: bool = field(default=False, metadata={
        "help": "on CUDA, decode JPEGs with nvJPEG and resize on the device (not yet measured on a GPU)"})
    preprocess_threads: int = field(default=0, metadata={
        "help": "threads decoding and resizing images (0: one per core, at most 8)"})
    inline_prepare_kb: float = field(default=0.0, metadata={
        "help": "uploads up to this size are decoded on the event loop, not handed to a preprocessing thread "
                "(0, the default: every upload in the pool; the bench's ablation compares the two)"})
    max_preprocess_backlog: int = field(default=0, metadata={
        "help": "uploads accepted for decoding at once, running or waiting (0: 64 per preprocessing thread, at "
                "most max_queue); more is a fast 503, before any CPU is spent on them"})
    torch_threads: int = field(default=0, metadata={"help": "intra-op threads of the model (0: torch's default)"})
    shutdown_timeout_s: float = field(default=30.0, metadata={"help": "how long SIGTERM waits for queued work"})
    drain_s: float = field(default=0.0, metadata={
        "help": "on SIGTERM, first fail /readyz and answer new requests with a retryable 503 for this long, so "
                "that a load balancer takes this process out before its socket closes"})
    loop: str = field(default="uvloop", metadata={"help": "event loop: uvloop or asyncio"})
    # -- a service for a team ---------------------------------------------------------------------------------
    api_keys: str | None = field(default=None, metadata={
        "help": "file of API keys, one per line: NAME:KEY or NAME:KEY:WEIGHT (# comments); re-read on SIGHUP. "
                "Without it, no key is asked for"})
    metrics_need_key: bool = field(default=False, metadata={"help": "with --api-keys, /metrics asks for a key too"})
    trusted_proxies: str = field(default="127.0.0.1/32,::1", metadata={
        "help": "comma-separated networks whose X-Forwarded-For names the client (the cluster's HAProxy is on "
                "loopback)"})
    scheduling: str = field(default="fair", metadata={
        "help": "fair (each batch filled round-robin across clients, by key name or address) or fifo"})
    preempt_share: float = field(default=0.5, metadata={
        "help": "with fair scheduling: the most of the model's time that requests of light clients may take by "
                "being answered inside a running bulk batch, between its layers (0: never; they then ride in the "
                "next batch)"})
    max_inflight_per_client: int = field(default=0, metadata={
        "help": "requests of one client being answered at once; more are 429 too_many_requests (0: no limit)"})
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate (chain): serve HTTPS"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    access_log: str = field(default="-", metadata={
        "help": "one JSON line per request: - (stdout), a file path (reopened on SIGHUP), or off"})
    worker_name: str | None = field(default=None, metadata={"help": "this process's name in the access log "
                                                                       "(default: its pid)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid setting {name}={getattr(self, name)!r}: {why}")

        if self.device == "auto":
            object.__setattr__(self, "device", _default_device())
        on_cuda = self.device.startswith("cuda")
        if self.max_batch_size == 0:
            object.__setattr__(self, "max_batch_size", 64 if on_cuda else 16)
        if self.max_wait_ms < 0:
            object.__setattr__(self, "max_wait_ms", 2.0 if on_cuda else 5.0)
        if self.return_window_ms < 0:
            object.__setattr__(self, "return_window_ms", self.max_wait_ms)
        if self.preprocess_threads == 0:
            object.__setattr__(self, "preprocess_threads", min(8, os.cpu_count() or 1))
        if self.max_preprocess_backlog == 0:
            object.__setattr__(self, "max_preprocess_backlog", min(self.max_queue, 64 * self.preprocess_threads))
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise bad("device", "expected cpu, cuda, cuda:N or auto")
        if self.dtype not in ("auto", "float16", "fp16", "bfloat16", "bf16", "float32", "fp32"):
            raise bad("dtype", "expected float16, bfloat16, float32 or auto")
        object.__setattr__(self, "log_level", self.log_level.upper())
        if self.log_level not in LOG_LEVELS:
            raise bad("log_level", "expected " + ", ".join(LOG_LEVELS))
        if self.loop not in ("uvloop", "asyncio"):
            raise bad("loop", "expected uvloop or asyncio")
        for name in ("exact_preprocess", "gpu_decode", "metrics_need_key", "allow_private_media"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "expected true or false")
        if self.decoder not in ("reference", "fast"):
            raise bad("decoder", "expected reference or fast")
        if not 0 < self.port < 65536:
            raise bad("port", "expected 1..65535")
        for name in ("max_batch_size", "max_queue", "max_pixels", "max_questions", "max_question_chars",
                     "preprocess_threads", "max_preprocess_backlog", "max_connections", "sick_after_failures"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.max_form_parts <= self.max_questions:
            raise bad("max_form_parts", f"must be more than max_questions ({self.max_questions}): the image and "
                      "every question are parts")
        for name in ("timeout_s", "max_body_mb", "body_timeout_s", "stuck_timeout_s", "media_connect_timeout_s",
                     "media_timeout_s"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        for name in ("image_cache_entries", "image_cache_mb", "torch_threads", "shutdown_timeout_s", "drain_s",
                     "max_inflight_per_client", "inline_prepare_kb"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if self.scheduling not in ("fair", "fifo"):
            raise bad("scheduling", "expected fair or fifo")
        if not 0 <= self.preempt_share <= 1:
            raise bad("preempt_share", "expected a fraction from 0 to 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise bad("tls_cert" if self.tls_cert is None else "tls_key", "--tls-cert and --tls-key go together")
        try:
            self.trusted_networks  # noqa: B018 - parsed here so that a bad value is named at startup
        except ValueError as e:
            raise bad("trusted_proxies", str(e)) from None
        try:
            self.media_domains  # noqa: B018 - parsed here so that a bad value is named at startup
        except ValueError as e:
            raise bad("allowed_media_domains", str(e)) from None
        if self.max_wait_ms > 1000:
            raise bad("max_wait_ms", "more than a second of waiting is never what you want")
        if self.return_window_ms > 1000:
            raise bad("return_window_ms", "more than a second of waiting is never what you want")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in self.trusted_proxies.split(",")
                     if n.strip())

    @functools.cached_property
    def media_domains(self) -> frozenset[str]:
        """The hosts image URLs may name, as the URL parser spells them (lowercase, IDNA-encoded)."""
        return frozenset(_media_host(d) for d in (self.allowed_media_domains or "").split(",") if d.strip())

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        check_env(env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                values[f.name] = _coerce(f, env[key])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def check_env(env: dict[str, str]) -> None:
    """Refuses a VQA_* variable that names no setting, with the closest setting's variable."""
    known = sorted(ENV_PREFIX + f.name.upper() for f in fields(Settings))
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key not in known and key not in OTHER_ENV:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"unknown environment variable {key}: {hint}Every {ENV_PREFIX}* variable names a "
                             "setting (--help lists them); unset it or correct its name")


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as its VQA_* variable (empty for None): how the cluster hands a worker, or its warm spare,
    its settings; `Settings.from_env` reads them back unchanged."""
    def text(value: Any) -> str:
        return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return {ENV_PREFIX + f.name.upper(): text(getattr(settings, f.name)) for f in fields(Settings)}


def _media_host(entry: str) -> str:
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


def parse_bool(raw: str) -> bool:
    """`true`/`false` and friends, for a VQA_* variable or a boolean flag given a value (`--exact-preprocess no`)."""
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, not {raw!r}")


def _coerce(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type)
    try:
        if kind.startswith("bool"):
            return parse_bool(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        what = "true or false" if kind.startswith("bool") else "a number"
        raise ValueError(f"invalid setting {ENV_PREFIX}{f.name.upper()}={raw!r}: expected {what}") from None
    return raw or None if "None" in kind else raw


def add_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per setting (`--max-batch-size`), defaulting to None so that the environment can fill in."""
    for f in fields(Settings):
        if f.name in exclude:
            continue
        kind = str(f.type)
        typ: Any = int if kind.startswith("int") else float if kind.startswith("float") else str
        env = ENV_PREFIX + f.name.upper()
        if kind == "bool":  # `--exact-preprocess` alone, or with a value (`--exact-preprocess false`)
            parser.add_argument("--" + f.name.replace("_", "-"), type=parse_bool, nargs="?", const=True, default=None,
                                help=f"{f.metadata.get('help', '')} [env {env}, default {f.default}]")
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), type=typ, default=None,
                            help=f"{f.metadata.get('help', '')} [env {env}, default {f.default}]")


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    names = {f.name for f in fields(Settings)}
    return Settings.from_env(env, **{k: v for k, v in vars(args).items() if k in names})
