"""Reading the Parquet tables stages hand to each other."""
import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.tables import read_table


def test_reads_the_requested_columns_or_all(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"id": [0, 1], "label": ["a", "b"], "extra": [1.0, 2.0]}).to_parquet(path)
    assert list(read_table(path, ["id"], "download").columns) == ["id"]
    assert list(read_table(path, ["id"], "download", all_columns=True).columns) == ["id", "label", "extra"]


def test_missing_file_names_the_stage_to_run(tmp_path):
    with pytest.raises(DataError, match=r"nope.parquet: missing file \(run the align stage first\)"):
        read_table(tmp_path / "nope.parquet", ["entity"], "align")


def test_missing_columns_are_listed(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"id": [0]}).to_parquet(path)
    with pytest.raises(DataError, match=r"missing columns \['label'\]"):
        read_table(path, ["id", "label"], "download")
