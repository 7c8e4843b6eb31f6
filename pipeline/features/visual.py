"""Visual features: BEiT's last hidden state of an entity's image, 2-D average pooled.

For an image, BEiT (``transformers.BeitModel``) gives the last hidden state
``H in R^{L x d}`` (``L = (S/P)^2 + 1`` tokens of image size ``S`` and patch ``P``, plus
[CLS]; ``[197, 768]`` for BEiT-base at 224/16). Treating ``H`` as a one-channel image, a
2-D average pooling with kernel ``(k_1, k_2)`` and stride ``(s_1, s_2)`` gives

    V[i, j] = 1/(k_1 k_2) * sum_{a < k_1, b < k_2} H[s_1 i + a, s_2 j + b]

of shape ``[floor((L - k_1)/s_1) + 1, floor((d - k_2)/s_2) + 1]``; ``[24, 383]`` for
kernel (9, 3), stride (8, 2) (paper, section 4.3.1). With several images per entity,
``image_mode`` ``first`` keeps the first listed image (align's seeded choice) and ``mean``
averages the pooled features of all readable images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.features.cache import CacheReport, EncodedBatch, content_key, update_cache
from pipeline.features.hub import default_device, model_hash, resolve_model_dir
from pipeline.media import image_path

IMAGE_MODES = ("first", "mean")
NO_IMAGE = "no image"


@dataclass(frozen=True)
class VisualSettings:
    """The ``extract_visual`` parameters."""

    model: str  # local folder or Hugging Face Hub repo id of a BEiT checkpoint
    hidden_shape: tuple[int, int]  # [L, d] the model's last hidden state, checked on load
    kernel: tuple[int, int]  # (k_1, k_2)
    stride: tuple[int, int]  # (s_1, s_2)
    image_mode: str  # "first" | "mean"
    batch_size: int  # images per forward pass
    dtype: str  # storage: "float16" | "float32"
    seed: int
    checkpoint_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.image_mode not in IMAGE_MODES:
            raise ConfigError(f"extract_visual.image_mode: {self.image_mode!r} is not one of {', '.join(IMAGE_MODES)}")
        if self.batch_size < 1:
            raise ConfigError(f"extract_visual.batch_size: must be >= 1, got {self.batch_size}")
        pooled_shape(self.hidden_shape, self.kernel, self.stride)


def pooled_shape(shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, int]:
    """``[T, D]`` of the pooled ``[L, d]`` hidden state: ``floor((L - k) / s) + 1`` per axis."""
    if len(shape) != 2 or len(kernel) != 2 or len(stride) != 2:
        raise ConfigError("extract_visual: hidden_shape, kernel and stride must each have two entries")
    if any(k < 1 or s < 1 or k > n for n, k, s in zip(shape, kernel, stride)):
        raise ConfigError(f"extract_visual: kernel {list(kernel)} / stride {list(stride)} do not fit hidden_shape {list(shape)}")
    return tuple((n - k) // s + 1 for n, k, s in zip(shape, kernel, stride))


def pool_tokens(hidden: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """2-D average pooling of hidden states ``[N, L, d]`` -> ``[N, T, D]`` (see module doc)."""
    return F.avg_pool2d(hidden.unsqueeze(1), kernel_size=tuple(kernel), stride=tuple(stride)).squeeze(1)


def select_images(digests: Sequence[str], image_mode: str) -> list[str]:
    """The digests an entity's feature is computed from: the first, or all of them."""
    return list(digests[:1]) if image_mode == "first" else list(digests)


def read_image(store: Path, digest: str) -> tuple[Image.Image | None, str | None]:
    """The RGB image of ``digest`` in ``store``, or None and the reason it is unreadable."""
    try:
        with Image.open(image_path(store, digest)) as image:
            return image.convert("RGB"), None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return None, f"unreadable image {digest}: {type(error).__name__}: {error}"


def load_processor(folder: Path):
    """The checkpoint's image processor (Pillow backend: resize, rescale, normalise)."""
    from transformers import BeitImageProcessorPil

    return BeitImageProcessorPil.from_pretrained(folder)


class BeitEncoder:
    """A BEiT checkpoint with its image processor, on ``device``."""

    def __init__(self, folder: Path, settings: VisualSettings, device: torch.device):
        from transformers import BeitModel

        self.processor = load_processor(folder)
        self.model = BeitModel.from_pretrained(folder, add_pooling_layer=False).to(device).eval()
        config = self.model.config
        actual = ((config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)
        if actual != tuple(settings.hidden_shape):
            raise ConfigError(
                f"extract_visual.hidden_shape: {list(settings.hidden_shape)} does not match model "
                f"{settings.model!r}, whose last hidden state is {list(actual)}"
            )
        self.settings, self.device = settings, device

    @torch.inference_mode()
    def pooled(self, images: list[Image.Image]) -> np.ndarray:
        """Pooled features ``[n, T, D]`` float32 of ``n`` images, in batches."""
        outputs = []
        for start in range(0, len(images), self.settings.batch_size):
            pixels = self.processor(images=images[start : start + self.settings.batch_size], return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # [b, L, d]
            outputs.append(pool_tokens(hidden.float(), self.settings.kernel, self.settings.stride).cpu().numpy())
        return np.concatenate(outputs)


def extract_visual(
    image_hashes: Sequence[Sequence[str]], store: str | Path, out_dir: str | Path, settings: VisualSettings
) -> CacheReport:
    """Update the visual cache in ``out_dir`` for entities ``0..E-1`` whose image digests
    (in the content-addressed ``store``) are ``image_hashes[E][k]``.

    The model is loaded only when some entity has an image to encode; its identity (name
    and hash of its files), its image processor's settings and the pooling parameters key
    the cache.
    """
    store = Path(store)
    selected = [select_images(digests, settings.image_mode) for digests in image_hashes]
    needs_model = any(selected)
    folder = resolve_model_dir(settings.model, "extract_visual.model") if needs_model else None
    config = {
        "model": {"name": settings.model, "hash": model_hash(folder) if folder else None},
        "preprocessing": json.loads(load_processor(folder).to_json_string()) if folder else None,
        "hidden_shape": list(settings.hidden_shape),
        "kernel": list(settings.kernel),
        "stride": list(settings.stride),
        "image_mode": settings.image_mode,
    }
    item_shape = pooled_shape(settings.hidden_shape, settings.kernel, settings.stride)
    device = default_device()
    encoder: BeitEncoder | None = None

    def encode(todo: np.ndarray) -> Iterator[EncodedBatch]:
        nonlocal encoder
        torch.manual_seed(settings.seed)
        progress = tqdm(total=len(todo), desc="extract-visual", unit="entity")
        for start in range(0, len(todo), settings.batch_size):
            entities = todo[start : start + settings.batch_size]
            images, owners, failures, counts = [], [], [], np.zeros(len(entities), dtype=np.int32)
            for position, entity in enumerate(entities):
                reasons = []
                for digest in selected[entity]:
                    image, reason = read_image(store, digest)
                    if image is None:
                        reasons.append(reason)
                    else:
                        images.append(image)
                        owners.append(position)
                        counts[position] += 1
                failures.append("; ".join(reasons) if reasons else (NO_IMAGE if not selected[entity] else None))
            values = np.zeros((len(entities), *item_shape), dtype=np.float32)
            if images:
                if encoder is None:
                    encoder = BeitEncoder(folder, settings, device)
                np.add.at(values, np.asarray(owners), encoder.pooled(images))
                values /= np.maximum(counts, 1)[:, None, None]
            yield EncodedBatch(
                entities=entities,
                values=values,
                has_feature=counts > 0,
                counts=counts,
                failures=failures,
                reusable=np.array([not failure or failure == NO_IMAGE for failure in failures]),
            )
            progress.update(len(entities))
        progress.close()

    return update_cache(out_dir, [content_key(digests) for digests in selected], config, item_shape, settings.dtype, encode, settings.checkpoint_seconds)
