"""The upload page in a real headless Chromium against the real app and the demo model: with JavaScript (fetch to
/v1/vqa, answer shown in place) and without (plain form post to /, answer rendered by the server)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from page_support import (
    QUESTION,
    By,
    WebDriverWait,
    api_answer,
    ask_with_js,
    csp_violations,
    ec,
    serve_app,
    wait_navigated,
    wait_outcome,
    webdriver,
)

from vqa_async.config import Settings
from vqa_async.http.page import EXAMPLES

SCREENSHOT_COPY = Path("/tmp/page_screenshot.png")


# -- the tests -------------------------------------------------------------------------------------------------------

def test_js_answers_in_place(server: str, browser: webdriver.Chrome, image: Path) -> None:
    expected = api_answer(server, image, QUESTION)
    browser.get(server + "/")
    browser.execute_script("window.__vqaMarker = 1;")
    preview = browser.find_element(By.ID, "preview")
    assert not preview.is_displayed()
    browser.find_element(By.ID, "image").send_keys(str(image))
    WebDriverWait(browser, 10, poll_frequency=0.1).until(lambda d: preview.is_displayed(),
                                                         "the preview did not appear")
    assert (preview.get_attribute("src") or "").startswith("blob:")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth;", preview) == 64
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    html = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.ID, "submit").click()

    out = wait_outcome(browser)
    assert out.get_attribute("id") == "answer", out.text
    assert out.get_attribute("textContent") == expected["answer"]
    timings = browser.find_element(By.ID, "timings").text
    assert "ms" in timings and "batch of" in timings
    # no navigation: the same document, the marker still set, the same URL
    assert not ec.staleness_of(html)(browser), "the page navigated: JavaScript did not intercept the submit"
    assert browser.execute_script("return window.__vqaMarker;") == 1
    assert browser.current_url == server + "/"
    # all of that under the Content-Security-Policy: no script or style of the page was refused
    assert csp_violations(browser) == []


def test_no_js_form_post_renders_answer(server: str, browser_nojs: webdriver.Chrome, image: Path) -> None:
    expected = api_answer(server, image, QUESTION)
    browser_nojs.get(server + "/")
    preview = browser_nojs.find_element(By.ID, "preview")
    browser_nojs.find_element(By.ID, "image").send_keys(str(image))
    time.sleep(0.3)  # give a (wrongly) running script the time to show the preview
    assert not preview.is_displayed(), "the page's script ran: JavaScript is not off"
    browser_nojs.find_element(By.ID, "question").send_keys(QUESTION)
    html = browser_nojs.find_element(By.TAG_NAME, "html")
    browser_nojs.find_element(By.ID, "submit").click()

    wait_navigated(browser_nojs, html)
    out = wait_outcome(browser_nojs)
    assert out.get_attribute("id") == "answer", out.text
    assert out.get_attribute("textContent") == expected["answer"]
    assert "ms" in browser_nojs.find_element(By.ID, "timings").text
    # the server-rendered page keeps the question, and the answer is in its HTML, not put there by a script
    assert browser_nojs.find_element(By.ID, "question").get_attribute("value") == QUESTION
    assert 'id="answer"' in browser_nojs.page_source
    assert browser_nojs.current_url == server + "/"
    assert csp_violations(browser_nojs) == []


def test_js_bad_file_shows_error(server: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a picture\n")
    out = ask_with_js(browser, server, bad, QUESTION)
    assert out.get_attribute("id") == "error"
    assert "invalid_image" in out.text
    assert not browser.find_elements(By.ID, "answer")


def test_screenshot_of_answered_page(server: str, browser: webdriver.Chrome, image: Path, tmp_path: Path) -> None:
    out = ask_with_js(browser, server, image, QUESTION)
    assert out.get_attribute("id") == "answer" and out.text
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000, len(data)
    with contextlib.suppress(OSError):  # a copy for people to look at; not part of the test
        shutil.copyfile(shot, SCREENSHOT_COPY)


# -- the demo's examples: what a newcomer tries first ----------------------------------------------------------------

EXAMPLES_SCREENSHOT = Path("/tmp/page_examples_screenshot.png")


def test_js_each_example_is_one_click_to_its_answer(server: str, browser: webdriver.Chrome, demo_dir: Path,
                                                   tmp_path: Path) -> None:
    facts = json.loads((demo_dir / EXAMPLES).read_text())
    browser.get(server + "/")
    browser.execute_script("window.__vqaMarker = 1;")
    assert browser.find_element(By.ID, "guide").is_displayed()
    assert browser.find_element(By.ID, "shapes").text == ", ".join(facts["shapes"])
    assert browser.find_element(By.ID, "colours").text == ", ".join(facts["colours"])
    buttons = browser.find_elements(By.CSS_SELECTOR, "button.example")
    assert [b.get_attribute("data-question") for b in buttons] == [ex["question"] for ex in facts["examples"]]
    for button, ex in zip(buttons, facts["examples"]):
        assert browser.execute_script("return arguments[0].querySelector('img').naturalWidth;", button) == 64
        browser.execute_script("const r = document.getElementById('result'); r.innerHTML = ''; r.hidden = true;")
        button.click()
        out = wait_outcome(browser)
        assert out.get_attribute("id") == "answer", out.text
        assert out.get_attribute("textContent") == ex["answer"], ex
        assert browser.find_element(By.ID, "question").get_attribute("value") == ex["question"]
        assert browser.find_element(By.ID, "preview").is_displayed()
    # answered in place, under the Content-Security-Policy
    assert browser.execute_script("return window.__vqaMarker;") == 1
    assert csp_violations(browser) == []
    shot = tmp_path / "examples.png"
    assert browser.save_screenshot(str(shot))
    with contextlib.suppress(OSError):  # a copy for people to look at; not part of the test
        shutil.copyfile(shot, EXAMPLES_SCREENSHOT)


def test_no_js_the_guide_and_examples_are_in_the_html(server: str, browser_nojs: webdriver.Chrome,
                                                       demo_dir: Path) -> None:
    facts = json.loads((demo_dir / EXAMPLES).read_text())
    browser_nojs.get(server + "/")
    guide = browser_nojs.find_element(By.ID, "guide")
    assert guide.is_displayed() and "Without JavaScript" in guide.text
    pictures = browser_nojs.find_elements(By.CSS_SELECTOR, "button.example img")
    assert len(pictures) == len(facts["examples"])
    assert all(browser_nojs.execute_script("return arguments[0].naturalWidth;", p) == 64 for p in pictures)
    assert csp_violations(browser_nojs) == []


# -- photos: shrunk in the browser ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_uploads() -> list[bytes]:
    return []


@pytest.fixture(scope="module")
def photo_server(tmp_path_factory: pytest.TempPathFactory, photo_uploads: list[bytes]) -> Iterator[str]:
    """The app on a model with mPLUG-large's 504 px input (the `photo504` replica, random weights)."""
    import torch

    from vqa_async.model.synth import synth

    d = tmp_path_factory.mktemp("photo504")
    synth("photo504", d, dtype=torch.float32, seed=0, progress=False)
    yield from serve_app(Settings(model=str(d), device="cpu"), photo_uploads)


@pytest.fixture(scope="module")
def photo_set() -> dict[str, Path]:
    from bench.lib.photos import build

    return {p.path.name: p.path for p in build()}


def _received(uploads: list[bytes], before: int) -> bytes:
    assert len(uploads) == before + 1, f"{len(uploads) - before} uploads reached the service"
    return uploads[-1]


def test_js_shrinks_a_12mp_photo_upright(photo_server: str, browser: webdriver.Chrome, photo_uploads: list[bytes],
                                          photo_set: dict[str, Path]) -> None:
    from PIL import Image, ImageOps

    original = photo_set["chelsea-12mp-exif6.jpg"]  # stored 3024x4032 on its side, EXIF orientation 6
    browser.get(photo_server + "/")
    assert browser.find_element(By.ID, "ask").get_attribute("data-image-res") == "504"
    before = len(photo_uploads)
    out = ask_with_js(browser, photo_server, original, "what is in the picture?")
    assert out.get_attribute("id") == "answer", out.text
    sent = _received(photo_uploads, before)
    print(f"\n12 MP photo: {original.stat().st_size} bytes chosen, {len(sent)} bytes received")
    assert len(sent) < 500_000, f"{len(sent)} bytes left the browser for a {original.stat().st_size}-byte photo"
    img = Image.open(io.BytesIO(sent))
    assert img.format == "JPEG" and img.size == (1008, 756), img.size  # upright: landscape, 2 x 504 long side
    assert ImageOps.exif_transpose(img).size == img.size  # no orientation left for the server to apply
    upright = ImageOps.exif_transpose(Image.open(original)).convert("RGB").resize(img.size)
    sideways = Image.open(original).convert("RGB").resize(img.size)  # the wrong way: as stored
    got = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert np.abs(got - np.asarray(upright, dtype=np.float32)).mean() < 8
    assert np.abs(got - np.asarray(sideways, dtype=np.float32)).mean() > 20
    assert csp_violations(browser) == []  # the canvas, blob: preview and fetch all within the policy


def test_js_sends_a_small_photo_as_it_is(photo_server: str, browser: webdriver.Chrome, photo_uploads: list[bytes],
                                         photo_set: dict[str, Path]) -> None:
    original = photo_set["coffee-0.3mp.jpg"]  # 640x480: under 2 x 504, nothing to gain
    before = len(photo_uploads)
    out = ask_with_js(browser, photo_server, original, "what color is it?")
    assert out.get_attribute("id") == "answer", out.text
    assert _received(photo_uploads, before) == original.read_bytes()


def test_no_js_posts_the_original_photo(photo_server: str, browser_nojs: webdriver.Chrome,
                                        photo_uploads: list[bytes], photo_set: dict[str, Path]) -> None:
    original = photo_set["chelsea-12mp-exif6.jpg"]
    before = len(photo_uploads)
    browser_nojs.get(photo_server + "/")
    browser_nojs.find_element(By.ID, "image").send_keys(str(original))
    browser_nojs.find_element(By.ID, "question").send_keys("what is in the picture?")
    html = browser_nojs.find_element(By.TAG_NAME, "html")
    browser_nojs.find_element(By.ID, "submit").click()
    wait_navigated(browser_nojs, html)
    assert wait_outcome(browser_nojs).get_attribute("id") == "answer"
    assert _received(photo_uploads, before) == original.read_bytes()


# -- follow-up questions: the picture named by its image_id, not sent again ------------------------------------------

RECORD_SENT = """
window.__sent = [];
window.__realFetch = window.__realFetch || window.fetch;
window.fetch = (url, opts) => {
  window.__sent.push([...opts.body.entries()].map(([k, v]) => [k, typeof v === "string" ? v.length : v.size]));
  return window.__realFetch(url, opts);
};
"""


def _ask_again(driver: webdriver.Chrome, question: str) -> list[list[list[object]]]:
    """Another question about the picture already chosen; the form fields each request carried (name, size),
    sorted by name."""
    driver.execute_script(RECORD_SENT)
    field = driver.find_element(By.ID, "question")
    field.clear()
    field.send_keys(question)
    driver.find_element(By.ID, "submit").click()
    out = wait_outcome(driver)
    assert out.get_attribute("id") == "answer", out.text
    return [sorted(fields) for fields in driver.execute_script("return window.__sent;")]


def test_js_follow_up_sends_no_image_and_sends_it_again_on_409(photo_server: str, browser: webdriver.Chrome,
                                                               photo_uploads: list[bytes],
                                                               photo_set: dict[str, Path]) -> None:
    original = photo_set["coffee-0.3mp.jpg"]  # small: sent as it is, so its image_id is its bytes' sha256
    image_id = hashlib.sha256(original.read_bytes()).hexdigest()
    before = len(photo_uploads)
    out = ask_with_js(browser, photo_server, original, "what color is it?")
    assert out.get_attribute("id") == "answer", out.text
    form = browser.find_element(By.ID, "ask")
    assert form.get_attribute("data-image-id") == image_id

    sent = _ask_again(browser, "what is it?")
    assert sent == [[["image_id", 64], ["question", len("what is it?")]]], sent  # no image bytes left the browser
    assert photo_uploads[before + 1:] == [None]  # the service was asked by id alone

    # The server no longer holds it (here: an id it never saw): 409 image_not_cached, and the page sends the image.
    browser.execute_script("arguments[0].dataset.imageId = arguments[1];", form, "ab" * 32)
    sent = _ask_again(browser, "is it round?")
    assert [[name for name, _ in fields] for fields in sent] == [["image_id", "question"], ["image", "question"]]
    assert sent[1][0][1] == original.stat().st_size
    assert photo_uploads[before + 2:] == [None, original.read_bytes()]
    assert form.get_attribute("data-image-id") == image_id
    assert csp_violations(browser) == []
