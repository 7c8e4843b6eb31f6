"""Image verification, normalisation (16-bit greyscale included; decoder bugs rejected, not
raised) and the content-addressed store."""
from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fake_services import decoder_bug_images
from pipeline.crawl.images import ImageConfig, ImageRejected, normalise_image, store_image
from pipeline.media import image_path

CONFIG = ImageConfig(max_side=64, jpeg_quality=90, max_pixels=1_000_000)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("mode, fmt", [
    ("RGB", "JPEG"), ("L", "PNG"), ("1", "PNG"), ("P", "GIF"), ("LA", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
    ("RGB", "WEBP"), ("RGB", "BMP"), ("I;16", "PNG"), ("I;16", "TIFF"),
])
def test_modes_become_rgb_jpeg_within_max_side(mode, fmt):
    source = Image.new(mode, (200, 50))
    jpeg = normalise_image(encode(source, fmt), CONFIG)
    with Image.open(io.BytesIO(jpeg)) as result:
        assert (result.format, result.mode, result.size) == ("JPEG", "RGB", (64, 16))


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    with Image.open(io.BytesIO(normalise_image(encode(rgba, "PNG"), CONFIG))) as result:
        assert all(channel > 245 for channel in result.getpixel((5, 5)))


def test_small_images_are_not_enlarged():
    with Image.open(io.BytesIO(normalise_image(encode(Image.new("RGB", (20, 10)), "PNG"), CONFIG))) as result:
        assert result.size == (20, 10)


def test_16_bit_greyscale_keeps_its_top_8_bits():
    levels = np.repeat(np.array([0, 0x8000, 0xFFFF], dtype=np.uint16), 16)[None, :].repeat(16, axis=0)
    png = encode(Image.fromarray(levels), "PNG")
    with Image.open(io.BytesIO(png)) as source:
        assert source.mode == "I;16"
    with Image.open(io.BytesIO(normalise_image(png, CONFIG))) as result:
        grey = [result.getpixel((x, 8))[0] for x in (8, 24, 40)]
    assert all(abs(actual - expected) <= 3 for actual, expected in zip(grey, [0, 128, 255])), grey


@pytest.mark.parametrize("error, data", decoder_bug_images().items())
def test_a_decoder_bug_on_a_malformed_file_is_a_rejection(error, data):
    with pytest.raises(ImageRejected, match=f"decoder error: {error}"):
        normalise_image(data, CONFIG)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_rejections_never_quote_the_file():
    with pytest.raises(ImageRejected) as error:
        normalise_image(b"TOPSECRET: not an image at all", CONFIG)
    assert "TOPSECRET" not in str(error.value)
    png = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG")
    start = png.index(b"IDAT") - 4
    end = start + 12 + struct.unpack(">I", png[start:start + 4])[0]
    data = png[start + 8:end - 4]
    split = png[:start] + png_chunk(b"IDAT", data[:100]) + png_chunk(b"S#C!", data[100:]) + png[end:]
    with pytest.raises(ImageRejected, match="broken PNG file") as error:  # Pillow: "(chunk b'S#C!')"
        normalise_image(split, CONFIG)
    assert "S#C!" not in str(error.value)


def test_unsupported_mode_is_rejected():
    with pytest.raises(ImageRejected, match="unsupported image mode"):
        normalise_image(encode(Image.new("F", (8, 8)), "TIFF"), CONFIG)


@pytest.mark.parametrize("payload, reason", [
    (b"<!DOCTYPE html><html><title>404</title></html>", "not an image"),
    (b"", "not an image"),
    (encode(Image.effect_noise((300, 300), 60).convert("RGB"), "JPEG")[:2000], "truncated"),
    (encode(Image.new("RGB", (300, 300), (1, 2, 3)), "PNG")[:-30], "truncated"),
])
def test_non_images_and_truncated_files_are_rejected(payload, reason):
    with pytest.raises(ImageRejected, match=reason):
        normalise_image(payload, CONFIG)


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = encode(Image.new("1", (2000, 1000)), "PNG")  # 2 Mpixel, a few kB
    assert len(bomb) < 10_000
    with pytest.raises(ImageRejected, match="decompression bomb"):
        normalise_image(bomb, CONFIG)


def test_store_is_content_addressed_and_idempotent(tmp_path):
    jpeg = normalise_image(encode(Image.new("RGB", (30, 30), (5, 6, 7)), "PNG"), CONFIG)
    digest = store_image(jpeg, tmp_path)
    assert digest == hashlib.sha256(jpeg).hexdigest()
    assert image_path(tmp_path, digest).read_bytes() == jpeg
    assert store_image(jpeg, tmp_path) == digest
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{digest}.jpg"]
