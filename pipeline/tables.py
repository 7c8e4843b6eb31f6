"""Reading the Parquet tables one stage hands to the next, with errors that say which
file is missing or incomplete and which stage writes it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import pyarrow.parquet as pq

from pipeline.errors import DataError


def read_table(path: str | Path, columns: Sequence[str], producer: str, all_columns: bool = False) -> pd.DataFrame:
    """The table at ``path`` with at least ``columns`` (only those unless ``all_columns``).

    A missing file names the ``producer`` stage to run; missing columns are listed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"missing file (run the {producer} stage first)")
    missing = [c for c in columns if c not in pq.read_schema(path).names]
    if missing:
        raise DataError(path, f"missing columns {missing}; expected at least {list(columns)}")
    return pd.read_parquet(path, columns=None if all_columns else list(columns))
