"""Fixtures shared by the feature-extraction tests: real photos in a content-addressed
image store, a tiny randomly initialised BEiT saved like a real checkpoint, and a small
media table."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from pipeline.media import image_path

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def store_jpeg(store: Path, image: Image.Image) -> str:
    """Save ``image`` as JPEG under its SHA-256 digest in ``store``; return the digest."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    path = image_path(store, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return digest


@pytest.fixture(scope="session")
def photo_store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An image store holding scikit-image's photos: (store, photo name -> digest)."""
    store = tmp_path_factory.mktemp("images")
    digests = {name: store_jpeg(store, Image.fromarray(getattr(skimage_data, name)())) for name in PHOTOS}
    return store, digests


def save_tiny_beit(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised BEiT (hidden 32, 2 layers, 224/16: 197 tokens) and its image
    processor, written with ``save_pretrained`` like a downloaded checkpoint."""
    from transformers import BeitConfig, BeitImageProcessorPil, BeitModel

    torch.manual_seed(seed)
    config = BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224, patch_size=16)
    BeitModel(config, add_pooling_layer=False).save_pretrained(folder)
    BeitImageProcessorPil(size={"height": 224, "width": 224}, do_center_crop=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_beit(tmp_path_factory) -> Path:
    return save_tiny_beit(tmp_path_factory.mktemp("tiny-beit"))


def write_media(path: Path, rows: list[dict]) -> Path:
    """An ``entities_media.parquet`` with the align stage's columns."""
    table = pd.DataFrame(
        {
            "entity": pd.Series([row["entity"] for row in rows], dtype="int64"),
            "sentences": [row.get("sentences", []) for row in rows],
            "text_source": [row.get("text_source", "label") for row in rows],
            "image_hashes": [row.get("image_hashes", []) for row in rows],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path, index=False)
    return path
