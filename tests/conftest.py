"""Shared test settings: offline model hub, and the benchmark mirror beside the repository."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MIRROR = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline benchmark mirror (``MMRNS_DATA_MIRROR``, else ``../shared/datasets``)."""
    path = Path(os.environ.get("MMRNS_DATA_MIRROR") or DEFAULT_MIRROR)
    if not (path / "MKG-W").is_dir():
        pytest.fail(f"benchmark mirror not found at {path}: set MMRNS_DATA_MIRROR")
    return path
