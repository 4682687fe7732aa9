"""Preprocessing equals ModelScope's MPlugPreprocessor on ordinary images, and handles the ones it gets wrong."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqa_async.model.loader import LoadedModel
from vqa_async.model.preprocess import (
    QUESTION_MAX_TOKENS,
    ImageError,
    QuestionTokenizer,
    UploadPixels,
    decode_image,
    fast_pixels,
    image_pixels,
    image_transform,
    normalize_pixels,
)


@pytest.fixture(scope="module")
def mplug_preprocessor(demo_dir: Path):  # type: ignore[no-untyped-def]
    from vqa_async.testing.pipeline_support import install_stand_ins

    install_stand_ins()
    from modelscope.preprocessors.multi_modal import MPlugPreprocessor

    return MPlugPreprocessor(str(demo_dir))


def _png(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(64, 64), (97, 41), (300, 200)])
@pytest.mark.parametrize("question", ["What color is the shape?", "IS THERE A RED CIRCLE", "a " * 40])
def test_equal_to_mplug_preprocessor(mplug_preprocessor, demo: LoadedModel, size: tuple[int, int],  # type: ignore[no-untyped-def]
                                     question: str) -> None:
    g = torch.Generator().manual_seed(size[0])
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    ref = mplug_preprocessor({"image": img, "text": question})
    ours_px = image_transform(demo.image_res)(decode_image(_png(img), max_pixels=10**8))
    ours_q = demo.tokenizer.encode([question])
    assert torch.equal(ours_px, ref["image"][0])
    # The server's split: uint8 per request, normalized per batch where the model is.
    split = normalize_pixels(image_pixels(demo.image_res)(decode_image(_png(img), max_pixels=10**8))[None])[0]
    assert torch.equal(split, ref["image"][0])
    assert torch.equal(ours_q.input_ids, ref["question"].input_ids)
    assert torch.equal(ours_q.attention_mask, ref["question"].attention_mask)


def test_rgba_is_composited_on_white() -> None:
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    rgb = decode_image(_png(img), max_pixels=10**6)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "CMYK", "I;16"])
def test_other_modes_become_rgb(mode: str) -> None:
    img = Image.new("RGB", (10, 10), (10, 200, 30)).convert(mode) if mode != "I;16" else Image.new("I;16", (10, 10))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "LA" else "PNG")
    assert decode_image(_png(img, fmt), max_pixels=10**6).mode == "RGB"


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = decode_image(_png(img, "JPEG", exif=exif), max_pixels=10**6)
    assert rotated.size == (20, 40)


@pytest.mark.parametrize("data, code", [
    (b"", "empty_image"),
    (b"hello, this is not an image", "invalid_image"),
    (_png(Image.new("RGB", (64, 64)))[:60], "invalid_image"),
])
def test_bad_bytes_are_image_errors(data: bytes, code: str) -> None:
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=10**6)
    assert e.value.code == code


def test_too_many_pixels_is_refused_before_decoding() -> None:
    data = _png(Image.new("L", (4000, 4000)))
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=10**6)
    assert e.value.code == "image_too_large"


def test_unsupported_format() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "ICO")
    with pytest.raises(ImageError) as e:
        decode_image(buf.getvalue(), max_pixels=10**6)
    assert e.value.code == "unsupported_image_format"


def test_tokenizer_is_safe_from_many_threads(demo_dir: Path) -> None:
    tok = QuestionTokenizer(str(demo_dir))
    questions = [f"what color is shape number {i}?" for i in range(64)]
    expected = tok.encode(questions).input_ids
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                results.append(tok.encode(questions).input_ids)
        except BaseException as e:  # noqa: BLE001 - the test reports whatever went wrong
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 160 and all(torch.equal(r, expected) for r in results)


TRICKY_QUESTIONS = ["Was ist DAS?", "café naïve résumé", "what's the 2nd   shape?\t", "日本語の質問", "emoji 🐈 cat?",
                    "zero\u200bwidth", "x" * 300, "ÀÉÎõü", "don't-stop: now!!", "\x00\x07ctrl", "ﬁne ligature",
                    "über straße", "İstanbul", "中文 mixed english", "\u0301combining", "  padded  ", ""]


@pytest.mark.parametrize("vocab", ["demo", "bert-sized"])
def test_fast_tokenizer_gives_modelscopes_ids(vocab: str, demo_dir: Path, tmp_path: Path) -> None:
    # ModelScope tokenizes with the Python BertTokenizer; the server uses the Rust one built from the same
    # vocab.txt. Same ids on every easy-VQA question and on accents, CJK, emoji and control characters, and
    # the same text when an answer's ids are decoded.
    import easy_vqa
    from transformers import BertTokenizer

    from vqa_async.model.presets import EASY_VQA_WORDS, bert_like_vocab

    if vocab == "demo":
        vocab_dir = demo_dir
    else:
        extra = ["café", "naive", "##é", "日", "本", "語", "中", "文", "über", "stra", "##ße", "istanbul", "fine"]
        (tmp_path / "vocab.txt").write_text("\n".join(bert_like_vocab(30522, EASY_VQA_WORDS + extra)) + "\n")
        vocab_dir = tmp_path
    questions = list(dict.fromkeys(easy_vqa.get_train_questions()[0] + easy_vqa.get_test_questions()[0]))
    questions += TRICKY_QUESTIONS
    slow = BertTokenizer.from_pretrained(str(vocab_dir))
    expected = slow([q.lower() for q in questions], padding="max_length", truncation=True,
                    max_length=QUESTION_MAX_TOKENS, return_tensors="pt")
    fast = QuestionTokenizer(str(vocab_dir))
    got = fast.encode(questions)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert torch.equal(got.attention_mask, expected.attention_mask)
    for ids in expected.input_ids[:: max(1, len(questions) // 50)]:
        assert fast.decode(ids) == slow.decode(ids, skip_special_tokens=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalizing_on_the_gpu_gives_the_cpus_values() -> None:
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(normalize_pixels(pixels.cuda()).cpu(), normalize_pixels(pixels))


def test_callers_of_the_tokenizer_cannot_change_how_questions_are_encoded(demo_dir: Path) -> None:
    # The demo's trainer pads answers to 4 tokens through `.tokenizer`; questions must stay at 25.
    tok = QuestionTokenizer(str(demo_dir))
    tok.tokenizer(["red"], padding="max_length", truncation=True, max_length=4)
    assert tok.encode(["what is the shape in the image?"]).input_ids.shape == (1, QUESTION_MAX_TOKENS)
    assert tok.encode([]).input_ids.shape == (0, QUESTION_MAX_TOKENS)


# -- the fast upload path ----------------------------------------------------------------------------------------------

def _photo_jpeg(size: tuple[int, int], mode: str = "RGB", **kw: object) -> bytes:
    g = torch.Generator().manual_seed(size[0])
    arr = (torch.rand(size[1] // 8, size[0] // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB").resize(size, Image.Resampling.BILINEAR)  # smooth, like a photo
    return _png(img.convert(mode), "JPEG", quality=90, **kw)


@pytest.mark.parametrize("size, expect", [((4032, 3024), (1008, 756)), ((1632, 1224), (816, 612)),
                                          ((640, 480), (640, 480)), ((1000, 504), (1000, 504))])
def test_jpeg_is_decoded_at_the_smallest_scale_that_covers_the_input(size: tuple[int, int],
                                                                     expect: tuple[int, int]) -> None:
    img = decode_image(_photo_jpeg(size), max_pixels=10**8, min_size=504)
    assert img.size == expect and img.mode == "RGB"
    assert decode_image(_photo_jpeg(size), max_pixels=10**8).size == size  # exact: every pixel


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_greyscale_and_cmyk_jpegs_are_reduced_and_become_rgb(mode: str) -> None:
    data = _photo_jpeg((2016, 1512), mode)
    fast = decode_image(data, max_pixels=10**8, min_size=504)
    assert fast.mode == "RGB" and fast.size == (1008, 756)
    exact = decode_image(data, max_pixels=10**8).resize(fast.size, Image.Resampling.BICUBIC)
    diff = (torch.from_numpy(np.asarray(fast, dtype=np.float32)) - torch.from_numpy(np.asarray(exact, np.float32)))
    assert diff.abs().mean() < 2, mode  # the same picture (a wrong CMYK inversion would differ by ~100)


def test_exif_orientation_is_applied_after_the_reduced_decode() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _photo_jpeg((4032, 3024), exif=exif)
    img = decode_image(data, max_pixels=10**8, min_size=504)
    assert img.size == (756, 1008)  # upright (portrait), and both sides still >= 504
    up = UploadPixels(504, 10**8)
    px = up.pixels(up.decode(data))
    exact = UploadPixels(504, 10**8, exact=True)
    assert px.shape == (3, 504, 504)
    # the same upright picture (measured 1.6 on this busy test image; sideways would differ by ~50)
    assert (px.int() - exact.pixels(exact.decode(data)).int()).abs().float().mean() < 5


def test_the_pixel_limit_applies_before_the_reduced_decode() -> None:
    with pytest.raises(ImageError) as e:
        decode_image(_photo_jpeg((4032, 3024)), max_pixels=10**6, min_size=504)
    assert e.value.code == "image_too_large"


def test_exact_upload_path_is_the_old_path_bit_for_bit() -> None:
    data = _photo_jpeg((1632, 1224))
    up = UploadPixels(504, 10**8, exact=True)
    assert torch.equal(up.pixels(up.decode(data)), image_pixels(504)(decode_image(data, max_pixels=10**8)))


def test_fast_resize_is_pillows_bicubic_within_rounding() -> None:
    img = decode_image(_photo_jpeg((1008, 756)), max_pixels=10**8)
    a, b = image_pixels(504)(img).int(), fast_pixels(504)(img).int()
    assert (a - b).abs().max() <= 2 and (a - b).abs().float().mean() < 0.05


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, False), (["--exact-preprocess"], {}, True), (["--exact-preprocess", "false"], {}, False),
    ([], {"VQA_EXACT_PREPROCESS": "1"}, True), (["--exact-preprocess", "False"], {"VQA_EXACT_PREPROCESS": "1"}, False),
])
def test_exact_preprocess_setting(argv: list[str], env: dict[str, str], expected: bool) -> None:
    import argparse

    from vqa_async.config import Settings, add_arguments, settings_from_args

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    settings = settings_from_args(ap.parse_args(argv), env=env)
    assert settings.exact_preprocess is expected and settings.gpu_decode is False
    with pytest.raises(ValueError, match="exact_preprocess"):
        Settings(exact_preprocess="yes")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_is_upright_close_and_falls_back() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _photo_jpeg((4032, 3024), exif=exif)
    gpu = UploadPixels(504, 10**8, device=torch.device("cuda"))
    small = UploadPixels(504, 10**6, device=torch.device("cuda"))
    cpu = UploadPixels(504, 10**8, exact=True)
    px = gpu.pixels(gpu.decode(data))
    assert px.device.type == "cuda" and px.dtype == torch.uint8 and px.shape == (3, 504, 504)
    assert (px.cpu().int() - cpu.pixels(cpu.decode(data)).int()).abs().float().mean() < 5
    png = _png(Image.new("RGBA", (600, 600), (255, 0, 0, 0)))  # nvJPEG cannot: the CPU path, on the device
    assert gpu.pixels(gpu.decode(png)).device.type == "cuda"
    with pytest.raises(ImageError) as e:
        small.decode(_photo_jpeg((4032, 3024)))  # the pixel limit holds before nvJPEG sees the data
    assert e.value.code == "image_too_large"
