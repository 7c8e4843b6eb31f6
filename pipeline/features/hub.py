"""Find a pretrained model's local folder, fingerprint it, and pick the device.

A model is named by a local folder (e.g. a ``save_pretrained`` output) or a Hugging Face
Hub repo id. A repo id is fetched into the Hugging Face cache, or read from it alone when
``HF_HUB_OFFLINE=1``. A model that cannot be found raises a ConfigError saying how to
provide it, not a traceback from ``huggingface_hub``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from pipeline.errors import ConfigError

# Other frameworks' copies of the weights: never needed by transformers / sentence-transformers on torch.
IGNORED_FILES = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.tflite", "coreml/*", "tf_model*", "flax_model*", "rust_model*"]


def default_device() -> torch.device:
    """CUDA when present, else the CPU: the encoders run the same code on either."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_dir(name: str, key: str) -> Path:
    """Local folder of model ``name`` (a folder or a Hub repo id); ``key`` is the params key."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        return Path(snapshot_download(repo_id=name, ignore_patterns=IGNORED_FILES))
    except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError, httpx.HTTPError, OSError) as error:
        raise ConfigError(
            f"{key}: model {name!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Provide it either as "
            f"a local folder: set {key} to a directory holding the model files (config and weights, as written "
            f"by save_pretrained), or through the Hugging Face cache: on a machine with internet run "
            f"`huggingface-cli download {name}`, copy the cache (HF_HOME, default ~/.cache/huggingface) here "
            f"and run with HF_HUB_OFFLINE=1."
        ) from None


def model_hash(folder: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file in ``folder`` (weights,
    configs, tokenizer), skipping hidden files and Markdown model cards."""
    digest = hashlib.sha256()
    files = sorted(
        file
        for file in folder.rglob("*")
        if file.is_file()
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)
        and file.suffix.lower() != ".md"
    )
    for file in files:
        digest.update(str(file.relative_to(folder).as_posix()).encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()
