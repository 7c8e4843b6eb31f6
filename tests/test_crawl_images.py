"""Image verification, normalisation and the content-addressed store."""
from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from pipeline.crawl.images import ImageConfig, ImageRejected, normalise_image, store_image
from pipeline.media import image_path

CONFIG = ImageConfig(max_side=64, jpeg_quality=90, max_pixels=1_000_000)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("mode, fmt", [
    ("RGB", "JPEG"), ("L", "PNG"), ("1", "PNG"), ("P", "GIF"), ("LA", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
    ("RGB", "WEBP"), ("RGB", "BMP"),
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
