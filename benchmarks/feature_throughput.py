"""Feature extraction throughput on this machine: images/s through a full-size BEiT-base
(randomly initialised: BeitConfig() defaults, hidden 768, 12 layers, 12 heads, 224/16)
on real photos, and sentences/s through the packaged SBERT all-MiniLM-L6-v2. Both go
through the extract stages' own code (BeitEncoder.pooled, embed_sentences).

    python benchmarks/feature_throughput.py [--images 64] [--sentences 2000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data
from transformers import BeitConfig, BeitImageProcessorPil, BeitModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.features.hub import default_device  # noqa: E402
from pipeline.features.text import PACKAGED_PREFIX, embed_sentences, load_sentence_model, resolve_text_model  # noqa: E402
from pipeline.features.visual import BeitEncoder, VisualSettings  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse")
WORDS = (
    "the film was directed by an american producer and released in with music from a british composer who "
    "later won several awards for work on television series set in new york during the early years of war"
).split()


def images_per_second(num_images: int, batch_size: int, device: torch.device) -> float:
    photos = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in PHOTOS]
    images = [photos[i % len(photos)] for i in range(num_images)]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        BeitModel(BeitConfig(), add_pooling_layer=False).save_pretrained(folder)
        BeitImageProcessorPil(size={"height": 224, "width": 224}, do_center_crop=False).save_pretrained(folder)
        settings = VisualSettings(model=folder, hidden_shape=(197, 768), kernel=(9, 3), stride=(8, 2), image_mode="first", batch_size=batch_size, dtype="float16", seed=0)
        encoder = BeitEncoder(Path(folder), settings, device)
        encoder.pooled(images[:batch_size])  # warm-up
        start = time.perf_counter()
        pooled = encoder.pooled(images)
        elapsed = time.perf_counter() - start
    assert pooled.shape == (num_images, 24, 383)
    return num_images / elapsed


def sentences_per_second(num_sentences: int, batch_size: int, device: torch.device) -> float:
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(5, 30))).capitalize() + "." for _ in range(num_sentences)]
    model = load_sentence_model(resolve_text_model(f"{PACKAGED_PREFIX}all-MiniLM-L6-v2"), device)
    embed_sentences(model, [sentences[:batch_size]], batch_size, batch_size)  # warm-up
    start = time.perf_counter()
    values, counts = embed_sentences(model, [[sentence] for sentence in sentences], 4, batch_size)
    elapsed = time.perf_counter() - start
    assert counts.sum() == num_sentences
    return num_sentences / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--sentence-batch", type=int, default=256)
    args = parser.parse_args()
    device = default_device()
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"BEiT-base (random init) on {args.images} photos, batch {args.image_batch}: "
          f"{images_per_second(args.images, args.image_batch, device):.2f} images/s")
    print(f"SBERT all-MiniLM-L6-v2 (packaged) on {args.sentences} sentences (5-30 words), batch {args.sentence_batch}: "
          f"{sentences_per_second(args.sentences, args.sentence_batch, device):.1f} sentences/s")


if __name__ == "__main__":
    main()
