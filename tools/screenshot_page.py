"""The manual's picture of the upload page (docs/img/upload-page.png), taken, not drawn.

    .venv/bin/python tools/screenshot_page.py [--out docs/img/upload-page.png] [--question "..."]

Starts a real `vqa-async serve` on the shipped demo model on a free loopback port, opens its page in headless
Chromium (Debian's /usr/bin/chromium and chromedriver, through selenium, as tests/page_support.py drives it),
chooses an easy-VQA picture, asks about it, waits until the answer is shown and saves the window. The server is
stopped whatever happens. Run it again when the page changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
READY_TIMEOUT_S = 120
ANSWER_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vqa-async serve exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"vqa-async serve was not ready within {READY_TIMEOUT_S} s")


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def screenshot(base: str, image: Path, question: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="vqa-screenshot-chrome-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--window-size=900,640", "--force-device-scale-factor=1",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(ANSWER_TIMEOUT_S)
        driver.get(base + "/")
        driver.find_element(By.ID, "image").send_keys(str(image))
        driver.find_element(By.ID, "question").send_keys(question)
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, ANSWER_TIMEOUT_S, poll_frequency=0.1).until(
            lambda d: any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, "#answer, #error")),
            "neither #answer nor #error appeared")
        if driver.find_elements(By.CSS_SELECTOR, "#error"):
            raise SystemExit("the page showed an error: " + driver.find_element(By.ID, "error").text)
        # The whole page, answer and timings included: the window grows to the document's height (plus what the
        # browser's own frame takes of the window, which headless Chromium counts too).
        height = driver.execute_script("return document.documentElement.scrollHeight + window.outerHeight"
                                       " - window.innerHeight")
        driver.set_window_size(900, int(height) + 16)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(out)):
            raise SystemExit(f"Chromium could not write {out}")
        print(f"wrote {out}: answer {driver.find_element(By.ID, 'answer').text!r}")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "upload-page.png")
    p.add_argument("--question", default="what is the color of the rectangle?")
    p.add_argument("--image", type=Path, default=None, help="default: easy-VQA's test image 1, a yellow rectangle")
    args = p.parse_args(argv)
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        print(f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver", file=sys.stderr)
        return 2
    if args.image is None:
        import easy_vqa

        args.image = Path(easy_vqa.get_test_image_paths()[1])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQA_")}  # the demo model, every default
    server = subprocess.Popen([sys.executable, "-m", "vqa_async.cli", "--log-level", "WARNING", "serve",
                               "--port", str(port), "--access-log", "off"], cwd=ROOT, env=env)
    try:
        wait_ready(base, server)
        screenshot(base, args.image.resolve(), args.question, args.out)
    finally:
        stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
