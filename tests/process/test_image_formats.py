"""The formats phones and browsers produce: HEIC/HEIF (an iPhone's default) and AVIF are answered like the PNG of the
same picture, upright, and under the same pixel cap, checked before any pixel is decoded."""

from __future__ import annotations

import io
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image
from PIL.AvifImagePlugin import AvifImageFile
from pillow_heif.as_plugin import HeifImageFile

from vqa_async.model.preprocess import ImageError, decode_image
from vqa_async.testing.launch import start_serve

MAX_PIXELS = 100_000
QUESTIONS = ["what color is the shape?", "what shape is this?"]
FORMATS = ["HEIF", "AVIF"]


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, quality=95, **kw)
    return buf.getvalue()


def asymmetric() -> Image.Image:
    """64x32: blue on the left quarter, red elsewhere; any rotation or mirror shows."""
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 16, 32))
    return img


@pytest.mark.parametrize("fmt", FORMATS)
def test_exif_orientation_is_applied(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = decode_image(encode(asymmetric(), fmt, exif=exif.tobytes()), max_pixels=10**6, min_size=64)
    expected = asymmetric().transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise: blue on top
    assert img.size == expected.size == (32, 64)
    for xy in ((16, 4), (16, 40)):
        assert all(abs(a - b) < 16 for a, b in zip(img.getpixel(xy), expected.getpixel(xy))), xy  # type: ignore


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_pixel_cap_applies_before_decoding(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (400, 400), (0, 128, 0)), fmt)
    decoded: list[str] = []
    plugin = HeifImageFile if fmt == "HEIF" else AvifImageFile
    real = plugin.load

    def load(self: Image.Image) -> object:
        decoded.append(fmt)
        return real(self)  # type: ignore[arg-type]

    monkeypatch.setattr(plugin, "load", load)
    assert decode_image(data, max_pixels=10**6).size == (400, 400) and decoded  # the spy sees a decode
    decoded.clear()
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert e.value.code == "image_too_large" and decoded == []


# -- through a real `vqa-async serve` ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve(demo_dir: Path) -> Iterator[str]:
    srv = start_serve(demo_dir, "--max-pixels", str(MAX_PIXELS), env={"VQA_DEVICE": "cpu"})
    try:
        yield srv.url
    finally:
        srv.stop()


async def _answers(s: aiohttp.ClientSession, url: str, data: bytes, name: str,
                   path: str = "/v1/vqa") -> tuple[int, dict[str, object]]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="application/octet-stream")
    for q in QUESTIONS:
        form.add_field("question", q)
    async with s.post(url + path, data=form) as r:
        return r.status, await r.json()


async def test_heic_and_avif_get_the_pngs_answers(serve: str, easy_vqa_images: list[Path]) -> None:
    async with aiohttp.ClientSession() as s:
        for path in easy_vqa_images[:3]:
            png = path.read_bytes()
            status, expected = await _answers(s, serve, png, "a.png")
            assert status == 200
            img = Image.open(io.BytesIO(png)).convert("RGB")
            for fmt, name in (("HEIF", "a.heic"), ("AVIF", "a.avif")):
                status, got = await _answers(s, serve, encode(img, fmt), name)
                assert status == 200, got
                assert got["answers"] == expected["answers"], (path.name, fmt)
        # the tutorial's route takes them too
        status, legacy = await _answers(s, serve, encode(img, "HEIF"), "a.heic", "/vqa")
        assert status == 200 and legacy["status"] == "success"


async def test_an_over_the_cap_heic_is_refused_413(serve: str) -> None:
    data = encode(Image.new("RGB", (400, 400), (0, 128, 0)), "HEIF")  # 160,000 pixels; the server allows 100,000
    async with aiohttp.ClientSession() as s:
        status, body = await _answers(s, serve, data, "big.heic")
    assert (status, body["error"]["code"]) == (413, "image_too_large")  # type: ignore[index]


def test_the_page_offers_heic_and_avif(serve: str) -> None:
    with urllib.request.urlopen(serve + "/", timeout=10) as r:
        page = r.read().decode()
    assert ".heic" in page and "image/avif" in page and "HEIC or AVIF" in page
