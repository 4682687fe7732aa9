"""A reproducible set of phone-like photos, built from the photographs scikit-image ships (no download).

    python -m bench photos [DIR]      # writes the set (default: photos_dir()) and prints one line per file

Four photographs (astronaut, chelsea, coffee, rocket) center-cropped to 4:3 and resized with Pillow's LANCZOS to
~0.3 MP (640x480), ~2 MP (1632x1224) and 12 MP (4032x3024), with a little seeded sensor noise (a smooth upscale
compresses, and decodes, unlike a photo), saved as quality-90 JPEGs with 4:2:0 chroma subsampling, as phone
cameras write them; plus scikit-image's logo as a 1024x1024 PNG with transparency, and a 12 MP JPEG stored on its
side with EXIF orientation 6 (a phone held upright), which must reach the model upright.

The bytes depend only on scikit-image's images, numpy's seeded generator and Pillow's encoder: the set is
rebuilt when a file is missing, never downloaded.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = 1
SOURCES = ("astronaut", "chelsea", "coffee", "rocket")
SIZES = {"0.3mp": (640, 480), "2mp": (1632, 1224), "12mp": (4032, 3024)}
ROTATED = "chelsea-12mp-exif6.jpg"  # stored sideways, EXIF orientation 6
TRANSPARENT = "logo-rgba.png"
NOISE_SIGMA = 5.0  # grey levels of sensor-like noise: 12 MP files of 2.3-2.5 MB
QUESTIONS = ["what is in the picture?", "what color is it?", "is there a person?", "how many are there?"]


@dataclass(frozen=True)
class Photo:
    path: Path
    width: int  # as stored in the file (the rotated one is displayed height x width)
    height: int

    @property
    def mp(self) -> float:
        return self.width * self.height / 1e6


def photos_dir() -> Path:
    """$VQA_PHOTOS_DIR (a set built elsewhere: `bench/gpu.sh --prepare` carries one to a host without
    scikit-image), or a versioned folder in the temporary directory."""
    return Path(os.environ.get("VQA_PHOTOS_DIR") or Path(tempfile.gettempdir()) / f"vqa-async-photos-v{VERSION}")


def _source(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def _crop_43(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w * 3 > h * 4:  # too wide
        nw = h * 4 // 3
        return img.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
    nh = w * 3 // 4
    return img.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))


def _photo(name: str, size: tuple[int, int], seed: int) -> Image.Image:
    img = _crop_43(_source(name)).resize(size, Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, NOISE_SIGMA, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + noise, 0, 255).round().astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, subsampling="4:2:0", **kw)
    return buf.getvalue()


def build(dst: Path | None = None) -> list[Photo]:
    """The set in `dst` (built there if a file is missing), sorted by name."""
    dst = dst or photos_dir()
    dst.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, tuple[int, int]] = {}
    seed = 0
    for name in SOURCES:
        for label, size in SIZES.items():
            seed += 1
            path = dst / f"{name}-{label}.jpg"
            wanted[path.name] = size
            if not path.exists():
                _write(path, _jpeg(_photo(name, size, seed)))
    rot = dst / ROTATED
    wanted[rot.name] = (3024, 4032)
    if not rot.exists():
        exif = Image.Exif()
        exif[0x0112] = 6  # the viewer rotates 90° clockwise
        upright = _photo("chelsea", SIZES["12mp"], 99)
        _write(rot, _jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif))  # stored 90° counter-clockwise
    png = dst / TRANSPARENT
    wanted[png.name] = (1024, 1024)
    if not png.exists():
        buf = io.BytesIO()
        _source("logo").resize((1024, 1024), Image.Resampling.LANCZOS).save(buf, "PNG")
        _write(png, buf.getvalue())
    return [Photo(dst / n, *wanted[n]) for n in sorted(wanted)]


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")  # a concurrent builder never sees half a file
    tmp.write_bytes(data)
    tmp.replace(path)


def upright(photo: Photo) -> tuple[int, int]:
    """(width, height) as the photo is meant to be seen."""
    return (photo.height, photo.width) if photo.path.name == ROTATED else (photo.width, photo.height)


def photo_requests(n: int, photos: list[Photo] | None = None) -> list[tuple[bytes, str]]:
    """n (image bytes, question) pairs cycling over the set. Every request's bytes are distinct (a few bytes after
    the image's end marker, which decoders ignore): users upload different photos, so neither the server's
    embedding cache (keyed by the upload's sha256) nor its per-batch dedup of identical images may help it here,
    and every system decodes every upload."""
    photos = photos or build()
    blobs = [p.path.read_bytes() for p in photos]
    return [(blobs[i % len(blobs)] + f"\0vqa-bench-{i}".encode(), QUESTIONS[(i // len(blobs)) % len(QUESTIONS)])
            for i in range(n)]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    dst = Path(argv[0]) if argv else None
    for p in build(dst):
        print(f"{p.path}  {p.width}x{p.height}  {p.mp:.1f} MP  {p.path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
