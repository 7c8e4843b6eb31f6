"""Verify, normalise and store one downloaded image.

:func:`normalise_image` turns raw bytes into an RGB JPEG or raises :class:`ImageRejected`:

1. ``Image.open`` + ``verify()`` (structure check), then a fresh ``open`` + ``load()``
   (full decode; truncated files fail here, since ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
   left False);
2. width * height above ``max_pixels`` is rejected before decoding (decompression bomb);
   Pillow's own ``DecompressionBombError`` is caught too;
3. EXIF orientation applied; modes 1/L/P/CMYK/YCbCr/RGB are converted to RGB, modes with
   alpha (LA/La/PA/RGBA/RGBa, P with transparency) composited on white, 16-bit greyscale
   (I;16*, and I as Pillow may open it) reduced to 8 bits (``v >> 8``, clipped to 255);
   other modes (F, ...) are rejected;
4. the longer side is shrunk to ``max_side`` (Lanczos; never enlarged) and the result
   saved as JPEG at ``jpeg_quality``.

Any exception raised on the way (a decoder's own bug on a malformed file of a rarer format
included) becomes :class:`ImageRejected`; no reason quotes the file's bytes.

:func:`store_image` writes the JPEG under its SHA-256 digest (see :mod:`pipeline.media`),
atomically, and returns the digest.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.atomic import atomic_path
from pipeline.errors import ConfigError
from pipeline.media import image_path

RGB_CONVERTIBLE = frozenset({"1", "L", "P", "CMYK", "YCbCr", "RGB"})
WITH_ALPHA = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
HIGH_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
BYTES_LITERAL = re.compile(r"""\bb(['"]).*?(?<!\\)\1""")  # a repr'd bytes value inside a decoder's message


@dataclass(frozen=True)
class ImageConfig:
    """The ``crawl.image`` section of params.yaml."""

    max_side: int = 512
    jpeg_quality: int = 90
    max_pixels: int = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.max_side < 1 or self.max_pixels < 1:
            raise ConfigError("crawl.image.max_side and crawl.image.max_pixels must be >= 1")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"crawl.image.jpeg_quality must be in 1..95, got {self.jpeg_quality}")


class ImageRejected(Exception):
    """The bytes are not an image we keep; the message says why."""


def _open(data: bytes, config: ImageConfig) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > config.max_pixels:
        raise ImageRejected(f"{width}x{height} pixels exceed max_pixels {config.max_pixels} (decompression bomb guard)")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in HIGH_BIT_GREY:
        image = Image.fromarray(np.clip(np.asarray(image).astype(np.int64) >> 8, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in WITH_ALPHA:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in RGB_CONVERTIBLE:
        return image.convert("RGB")
    raise ImageRejected(f"unsupported image mode {image.mode!r}")


def normalise_image(data: bytes, config: ImageConfig) -> bytes:
    """RGB JPEG bytes of the image in ``data``, longer side at most ``config.max_side``."""
    try:
        with _open(data, config) as probe:
            probe.verify()
        with _open(data, config) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
        rgb.thumbnail((config.max_side, config.max_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=config.jpeg_quality)
        return out.getvalue()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(f"not an image ({len(data)} bytes in no format Pillow reads)") from None
    except Image.DecompressionBombError as error:
        raise ImageRejected(f"decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow's decode errors
        raise ImageRejected(f"corrupt or truncated image: {_message(error)}") from None
    except Exception as error:  # a decoder's own failure on a malformed file (NotImplementedError, ...)
        raise ImageRejected(f"decoder error: {_message(error)}") from None


def _message(error: Exception) -> str:
    """``Type: message`` of a decoder's exception, bytes it quotes from the file elided."""
    return f"{type(error).__name__}: {BYTES_LITERAL.sub('<bytes>', str(error))[:300]}"


def store_image(jpeg: bytes, store: Path) -> str:
    """Write ``jpeg`` into the content-addressed ``store`` (if absent); return its digest."""
    digest = hashlib.sha256(jpeg).hexdigest()
    target = image_path(store, digest)
    if not target.is_file():
        with atomic_path(target) as tmp:
            tmp.write_bytes(jpeg)
    return digest
