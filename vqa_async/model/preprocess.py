"""Image and question preprocessing, identical to ModelScope's `MPlugPreprocessor` for ordinary RGB images.

Differences, on purpose: EXIF orientation is applied (a phone photo is upright, as the user saw it), and an
image with transparency is composited on white instead of having its alpha channel dropped (which turns
transparent pixels into whatever colour they happen to store, often black).

Uploads are photos: a 12 MP JPEG decoded whole and resized by Pillow costs far more CPU than the model input it
ends as (figures: bench/RESULTS.md, "Figures moved out of the code"). `UploadPixels` (the server's path) decodes a
JPEG at the smallest DCT scale (1/2, 1/4, 1/8: libjpeg's own IDCT scaling, through Pillow's `draft`) that still
leaves both sides at least the model's input size, then applies the same bicubic filter (Pillow's: a = -0.5,
support widened by the scale) with torch's uint8 kernel, which computes it several times faster than Pillow and
rounds differently in a few values in a thousand (by 1-2 levels). The answers stay ModelScope's on all but a
sliver of photos (`tests/test_photo_fidelity.py` measures the share); `exact=True` (`--exact-preprocess`) decodes
every pixel and resizes with Pillow, as ModelScope does, bit for bit.

HEIC/HEIF and AVIF have no reduced decode (libheif and libavif decode every pixel; a HEIC's embedded thumbnail
is a separate, smaller encode, too small for the model's input on an iPhone's photos), so they are decoded whole;
torch's resize still applies.

Everything here is CPU work meant for a worker thread, never the event loop.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pillow_heif
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer
from torchvision import transforms
from transformers import BertTokenizerFast

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
T = TypeVar("T")
QUESTION_MAX_TOKENS = 25  # MPlugPreprocessor's tokenizer_max_length
# HEIF (an iPhone's HEIC) through pillow-heif, registered below; AVIF through Pillow's own plugin (Pillow 11.3+).
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO", "HEIF", "AVIF"})
FORMAT_NAMES = "JPEG, PNG, GIF, BMP, WEBP, TIFF, HEIC/HEIF or AVIF"
# Opening a HEIF file reads its boxes, not its pixels: the size (after its rotation) is known before decoding,
# as for every other format here. Thumbnails, depth and auxiliary images are not read: only the image is used.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


class ImageError(ValueError):
    """An upload that is not a usable image. `code` is the stable error code the API returns."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Refuses an image by its header's size, before any decoding (decompression bombs)."""
    w, h = size
    if w * h > max_pixels:
        raise ImageError("image_too_large", f"the image has {w}x{h} pixels, more than the {max_pixels} allowed")


def decode_image(data: bytes, max_pixels: int, min_size: int | None = None) -> Image.Image:
    """Bytes to an upright RGB image, or an ImageError naming what is wrong.

    `min_size`: a JPEG may be decoded at a reduced DCT scale that keeps both sides >= min_size (before EXIF
    rotation; the target is square, so after it too). None decodes every pixel."""
    if not data:
        raise ImageError("empty_image", "the image file is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) before it refuses; we refuse on our own, smaller limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise ImageError("unsupported_image_format",
                                 f"image format {img.format} is not supported; send {FORMAT_NAMES}")
            check_pixels(img.size, max_pixels)
            if min_size and img.format in ("JPEG", "MPO"):
                # The mode argument changes nothing for RGB, CMYK or greyscale JPEGs (only "L"/"YCbCr" would):
                # `to_rgb` converts afterwards, on the smaller image.
                img.draft("RGB", (min_size, min_size))
            # Some of ModelScope's modules set this process-wide flag on import, which makes Pillow pad a
            # truncated upload with grey instead of refusing it. A server must refuse it.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", f"the image has too many pixels: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError("invalid_image", "the file is not an image that can be read") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError("invalid_image", f"the image data is damaged or truncated: {e}") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def image_transform(image_res: int) -> transforms.Compose:
    """ModelScope's image transform: bicubic resize, to [0, 1], CLIP's normalization; (3, R, R) float32."""
    return transforms.Compose([
        transforms.Resize((image_res, image_res), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ])


def image_pixels(image_res: int) -> Callable[[Image.Image], torch.Tensor]:
    """The server's half of `image_transform`, per request: the bicubic resize, to a (3, R, R) uint8 tensor.

    The other half, `normalize_pixels`, runs once per batch where the model is (on the GPU, if there is one):
    a quarter of the bytes cross to the device, and a handful of tensor operations per request leave the
    request path. The two halves give exactly `image_transform`'s values (`tests/test_preprocess.py`).
    """
    resize = transforms.Resize((image_res, image_res), interpolation=transforms.InterpolationMode.BICUBIC)

    def pixels(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(resize(img), dtype=np.uint8)).permute(2, 0, 1)

    return pixels


def fast_pixels(image_res: int) -> Callable[[Image.Image], torch.Tensor]:
    """`image_pixels` computed by torch's uint8 antialiased bicubic kernel instead of Pillow's: the same filter,
    a fraction of the CPU, values within 2 levels (`tests/test_preprocess.py` pins the bound). It runs on the
    calling thread only (the kernel does not fan out to torch's intra-op threads)."""
    from torchvision.transforms.v2 import functional as F

    size = [image_res, image_res]

    def pixels(img: Image.Image) -> torch.Tensor:
        hwc = torch.from_numpy(np.array(img, dtype=np.uint8))
        return F.resize(hwc.permute(2, 0, 1), size, interpolation=transforms.InterpolationMode.BICUBIC,
                        antialias=True)

    return pixels


class UploadPixels:
    """The server's path from upload bytes to a (3, R, R) uint8 tensor, in two timed steps: `decode` (bytes to
    an upright RGB image) and `pixels` (the bicubic resize). Thread-safe: it holds no per-call state.

    `exact`: decode every pixel and resize with Pillow (ModelScope's preprocessing, bit for bit) instead of the
    reduced DCT scale and torch's resize (`fast_pixels`).
    `device`: a CUDA device to decode JPEGs on with nvJPEG (`torchvision.io.decode_jpeg`) and resize there;
    anything nvJPEG refuses (PNG, CMYK, a corrupt file) takes the CPU path, and every tensor ends on that device
    so that a batch stacks. Off by default: its resize is torch's antialiased bicubic, not Pillow's, so its
    answers are measured apart (`bench/gpu.sh`).
    """

    def __init__(self, image_res: int, max_pixels: int, exact: bool = False,
                 device: torch.device | None = None) -> None:
        self.image_res = image_res
        self.max_pixels = max_pixels
        self.exact = exact
        self.device = device if device is not None and device.type == "cuda" else None
        self._resize = image_pixels(image_res) if exact else fast_pixels(image_res)

    def decode(self, data: bytes) -> Image.Image | torch.Tensor:
        if self.device is not None and data[:2] == b"\xff\xd8":
            on_device = self._decode_on_device(data)
            if on_device is not None:
                return on_device
        return decode_image(data, self.max_pixels, min_size=None if self.exact else self.image_res)

    def pixels(self, decoded: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(decoded, torch.Tensor):
            return decoded
        out = self._resize(decoded)
        return out if self.device is None else out.to(self.device)

    def _decode_on_device(self, data: bytes) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only: refuse bombs before decoding
                check_pixels(probe.size, self.max_pixels)
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except ImageError:
            raise
        except Exception:  # noqa: BLE001 - nvJPEG refuses what it cannot do; the CPU path decides
            return None
        assert isinstance(img, torch.Tensor)
        r = self.image_res
        out = F.resize(img.float(), [r, r], interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)
        return out.round_().clamp_(0, 255).to(torch.uint8)


_MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
_255 = torch.tensor(255.0)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) uint8 from `image_pixels` -> float32, as ToTensor + Normalize compute it (same operations,
    same order), on the tensor's device. The divisor 255 is a tensor on that device: CUDA turns division by a
    Python number into multiplication by its reciprocal, which is off by one bit in about 40% of the values."""
    device = pixels.device
    return pixels.float().div(_255.to(device)).sub_(_MEAN.to(device)).div_(_STD.to(device))


@dataclass(frozen=True)
class EncodedQuestions:
    input_ids: torch.Tensor  # (N, 25) long
    attention_mask: torch.Tensor  # (N, 25) long


class QuestionTokenizer:
    """ModelScope's tokenization (BERT WordPiece on the model's vocab.txt, lowercased, padded to 25 tokens).

    ModelScope uses the Python `BertTokenizer`; this is the Rust `BertTokenizerFast` built from the same
    vocab.txt, which gives the same ids (`tests/test_preprocess.py` pins it on every easy-VQA question and on
    accents, CJK, emoji and control characters) at a fraction of the CPU: tokenizing a question and decoding an
    answer are per-request costs on a server's hot path.

    Encoding goes straight to the Rust tokenizer, set once to truncate and pad to 25 tokens as ModelScope's call
    does; the `transformers` wrapper around it costs more than the tokenization itself.

    Each thread has its own copies: handlers tokenize from a thread pool, and a fast tokenizer's padding and
    truncation state is neither safe to share between threads ("Already borrowed") nor to share with callers of
    `.tokenizer`, whose own padding/truncation arguments would reset it (the demo's trainer pads answers to 4).
    """

    def __init__(self, vocab_dir: str, max_tokens: int = QUESTION_MAX_TOKENS) -> None:
        self.max_tokens = max_tokens
        # Built from vocab.txt once (the conversion takes about a second for BERT's 30,522 words; a copy for each
        # further thread takes milliseconds). Fails at load time, not at the first request.
        self._template = BertTokenizerFast.from_pretrained(vocab_dir)
        encoder = Tokenizer.from_str(self._template.backend_tokenizer.to_str())
        encoder.enable_truncation(max_tokens)
        encoder.enable_padding(length=max_tokens, pad_id=self._template.pad_token_id,
                               pad_token=self._template.pad_token)
        self._encoder_json = encoder.to_str()
        self._local = threading.local()
        self._local.tokenizer, self._local.encoder = self._template, encoder

    def _own(self, name: str, make: Callable[[], T]) -> T:
        """This thread's copy of `name`, made on its first use."""
        obj: T | None = getattr(self._local, name, None)
        if obj is None:
            obj = make()
            setattr(self._local, name, obj)
        return obj

    @property
    def tokenizer(self) -> BertTokenizerFast:
        """This thread's `transformers` tokenizer (decoding, and whatever else a caller needs)."""
        return self._own("tokenizer", lambda: copy.deepcopy(self._template))

    def _encoder(self) -> Tokenizer:
        return self._own("encoder", lambda: Tokenizer.from_str(self._encoder_json))

    def encode(self, questions: list[str]) -> EncodedQuestions:
        if not questions:
            empty = torch.empty((0, self.max_tokens), dtype=torch.long)
            return EncodedQuestions(empty, empty.clone())
        encodings = self._encoder().encode_batch([q.lower() for q in questions])
        return EncodedQuestions(torch.tensor([e.ids for e in encodings], dtype=torch.long),
                                torch.tensor([e.attention_mask for e in encodings], dtype=torch.long))

    def decode(self, ids: torch.Tensor) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
