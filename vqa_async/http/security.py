"""What a browser is told about our responses, and which form posts the page takes.

Every response carries a Content-Security-Policy that allows only our own script and style files (no inline
script, style or event handler runs, so markup that slipped through escaping stays inert), forbids framing
(clickjacking) and posting our forms elsewhere; `nosniff` so a JSON error is never read as HTML or script; and
`Referrer-Policy: no-referrer` so no URL of ours leaves in a Referer header.

`POST /` (the page's form, which renders HTML in the user's browser) refuses cross-site posts: another site's
page must not make a visitor's browser submit questions here and show them attacker-chosen content on our
origin, nor spend the visitor's network position (an intranet server) or the key a password manager filled in.
Fetch Metadata decides when the browser sends it (`Sec-Fetch-Site: cross-site` is refused; `same-origin`,
`same-site` and `none`, a typed URL, pass); an older browser without it is judged by `Origin` against `Host`.
A request with neither (curl, scripts) is not a browser's cross-site post and passes.

The API routes (`POST /v1/vqa`, `POST /vqa`) are not checked: their clients are programs, which send no such
headers. With keys on, the key must come in a header, which a cross-site form cannot set (and a cross-site
`fetch` with `Authorization` needs a CORS preflight this server never grants), so a forged post is a 401. Without
keys the API is open to whoever reaches the port anyway, and no other origin can read its JSON (no CORS headers).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from vqa_async.http.errors import ApiError, refuse

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",  # the preview is a blob: URL of the chosen file
    "connect-src 'self'",  # page.js posts to /v1/vqa
    "form-action 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
])
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate CSP 2
}

SAME_SITE = frozenset({"same-origin", "same-site", "none"})
DEFAULT_PORTS = {"http": 80, "https": 443}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An `on_response_prepare` hook: every response, errors and static files included."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)


def refuse_cross_site(request: web.Request) -> None:
    """Raise 403 `cross_site` for a form post another site's page made this browser send."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        if site.strip().lower() not in SAME_SITE:
            raise cross_site(f"Sec-Fetch-Site: {site.strip()[:32]}")
        return
    origin = request.headers.get("Origin")
    if origin is not None and not _same_origin(origin, request.headers.get("Host", "")):
        raise cross_site("its Origin is not this server")


def cross_site(why: str) -> ApiError:
    return refuse("cross_site", f"this form was posted from another site ({why}); open this page "
                    "and ask from here")


def _same_origin(origin: str, host: str) -> bool:
    """Whether `Origin` (scheme://host[:port], or "null") names the server the request was sent to."""
    try:
        o = urlsplit(origin.strip())
        o_port = o.port or DEFAULT_PORTS.get(o.scheme)
        h = urlsplit("//" + host.strip())
        h_port = h.port or DEFAULT_PORTS.get(o.scheme)
    except ValueError:  # a port that is not a number
        return False
    if o.scheme not in DEFAULT_PORTS or not o.hostname or not h.hostname:
        return False  # "null" (a sandboxed or file: page) or garbage is not us
    return o.hostname == h.hostname and o_port == h_port
