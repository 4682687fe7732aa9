"""The page's test harness: the real app served from a thread, real headless Chromium (JavaScript on or off, its
console collected), and what the page shows. Shared by test_page.py and test_page_security.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web

from vqa_async.app import init_app
from vqa_async.config import Settings
from vqa_async.http.app_keys import SERVICE

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)
try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:  # pragma: no cover - selenium is a test dependency
    pytest.skip(f"selenium is not importable: {e}", allow_module_level=True)

QUESTION = "what color is the shape?"
ANSWER_TIMEOUT_S = 60


# -- the server ------------------------------------------------------------------------------------------------------

def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def serve_app(settings: Settings, uploads: list[bytes] | None = None) -> Iterator[str]:
    """The real app on a free loopback port, served from its own event loop in a background thread. `uploads`
    collects every image the service is asked about, as it arrived (an in-process observation hook)."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        app = init_app(settings)
        if uploads is not None:
            service = app[SERVICE]
            ask = service.ask

            async def recording_ask(image: bytes, questions: list[str], *args: Any, **kwargs: Any) -> Any:
                uploads.append(image)
                return await ask(image, questions, *args, **kwargs)

            service.ask = recording_ask  # type: ignore[method-assign]
        runner = web.AppRunner(app, handler_cancellation=True)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)  # the OS picks a free port: no race with other tests
            await site.start()
            box["port"] = runner.addresses[0][1]
            box["stop"] = stop = asyncio.Event()
            box["loop"] = asyncio.get_running_loop()
            started.set()
            await stop.wait()
        finally:
            await runner.cleanup()

    def main() -> None:
        try:
            asyncio.run(serve())  # closes the loop, its async generators and its default executor
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e
        finally:
            started.set()

    thread = threading.Thread(target=main, name="page-test-server", daemon=True)
    thread.start()

    def stop() -> None:
        if "stop" in box and thread.is_alive():
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server thread did not stop"

    try:
        started.wait(timeout=600)
        if "error" in box:
            raise RuntimeError("the app did not start") from box["error"]
        if "port" not in box:
            raise RuntimeError("the app did not start within 600 s")
        base = f"http://127.0.0.1:{box['port']}"
        deadline = time.monotonic() + 300
        while True:
            try:
                status, _ = http_get(base + "/readyz")
            except OSError:
                status = 0
            if status == 200:
                break
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"{base}/readyz never answered 200 (last: {status})")
            time.sleep(0.2)
        yield base
    finally:
        stop()


def api_answer(base: str, image: Path, question: str) -> dict[str, Any]:
    """What POST /v1/vqa answers for this image and question (multipart, as the page sends it)."""
    boundary = "----vqa" + uuid.uuid4().hex
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="image"; filename="{image.name}"\r\n'.encode(),
        b"Content-Type: image/png\r\n\r\n", image.read_bytes(), b"\r\n",
        f"--{boundary}\r\n".encode(),
        b'Content-Disposition: form-data; name="question"\r\n\r\n', question.encode(), b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ])
    req = urllib.request.Request(base + "/v1/vqa", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=ANSWER_TIMEOUT_S) as resp:
        assert resp.status == 200
        out: dict[str, Any] = json.loads(resp.read())
    assert isinstance(out["answer"], str) and out["answer"]
    return out


# -- the browser -----------------------------------------------------------------------------------------------------

def chrome(js: bool) -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="vqa-page-chrome-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1000,900", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    if not js:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: CSP violations are reported there
    driver = None
    try:
        driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
        driver.set_page_load_timeout(ANSWER_TIMEOUT_S)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_navigated(driver: webdriver.Chrome, html: WebElement) -> None:
    """Until the page that `html` belongs to is gone (a form post navigated). Mid-navigation Chromium may answer a
    question about the old element with an inspector error ("Node with given id does not belong to the
    document") instead of a stale-element error: that is the same news, so keep polling."""
    WebDriverWait(driver, ANSWER_TIMEOUT_S, poll_frequency=0.1, ignored_exceptions=(WebDriverException,)).until(
        ec.staleness_of(html), "the form post did not navigate")


def wait_outcome(driver: webdriver.Chrome) -> WebElement:
    """The #answer or #error element, once one is shown."""
    def found(d: webdriver.Chrome) -> WebElement | bool:
        els = d.find_elements(By.CSS_SELECTOR, "#answer, #error")
        return els[0] if els and els[0].is_displayed() else False

    return cast(WebElement, WebDriverWait(driver, ANSWER_TIMEOUT_S, poll_frequency=0.1).until(
        found, "neither #answer nor #error appeared"))


def ask_with_js(driver: webdriver.Chrome, base: str, upload: Path, question: str) -> WebElement:
    driver.get(base + "/")
    driver.execute_script("window.__vqaMarker = 1;")  # survives only if the page is not replaced
    driver.find_element(By.ID, "image").send_keys(str(upload))
    driver.find_element(By.ID, "question").send_keys(question)
    html = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, "submit").click()
    out = wait_outcome(driver)
    assert not ec.staleness_of(html)(driver), "the page navigated: JavaScript did not intercept the submit"
    assert driver.execute_script("return window.__vqaMarker;") == 1
    assert driver.current_url == base + "/"
    return out


def csp_violations(driver: webdriver.Chrome) -> list[str]:
    """The Content-Security-Policy refusals Chromium logged to the console since the last call."""
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
