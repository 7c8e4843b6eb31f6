"""The experiment ledger (pipeline/ledger.py, `experiments-save`): finished runs kept in git and
read by `report` and `figures` beside `dvc exp show`."""
from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from pipeline import ledger
from pipeline.errors import DataError
from pipeline.table2 import _records
from stages import app
from stages import figures as _figures_commands  # noqa: F401  (registers the commands)
from stages import report as _report_commands  # noqa: F401
from tests.test_figures import synthetic_show
from tests.test_table2 import dvc_show


def write(path, payload) -> str:
    path.write_text(json.dumps(payload))
    return str(path)


def test_finished_keeps_only_experiments_that_ran_to_their_metrics():
    records = ledger.finished(dvc_show())
    # the commits (workspace, baseline) and the running NSCaching run (data.rev == "workspace") are left out
    assert sorted(r["name"] for r in records) == ["old-sans", "t2-mkg-w-transe-kbgan", "t2-mkg-w-transe-sans", "t2-mkg-w-transe-uniform"]
    record = next(r for r in records if r["name"] == "t2-mkg-w-transe-sans")
    assert set(record["data"]) == {"rev", "timestamp", "params", "metrics"}
    assert record["data"]["metrics"]["metrics/mkg-w/evaluate.json"]["data"]["mrr"] == pytest.approx(0.31)
    figures_show = synthetic_show()
    queued = [r["name"] for r in figures_show[0]["experiments"] if not r["revs"][0]["data"]["metrics"]]
    assert queued == ["f4-400"] and "f4-400" not in {r["name"] for r in ledger.finished(figures_show)}


def test_save_command_adds_new_runs_once_in_time_order(tmp_path):
    path = tmp_path / "experiments.jsonl"
    shown = dvc_show()
    first = CliRunner().invoke(app, ["experiments-save", "--experiments", write(tmp_path / "a.json", shown), "--ledger", str(path)])
    assert first.exit_code == 0, first.output
    assert "4 new of 4 finished experiments" in first.output and "(4 in all)" in first.output
    lines = path.read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["t2-mkg-w-transe-uniform", "t2-mkg-w-transe-sans", "t2-mkg-w-transe-kbgan", "old-sans"]
    before = path.read_text()
    again = CliRunner().invoke(app, ["experiments-save", "--experiments", write(tmp_path / "a.json", shown), "--ledger", str(path)])
    assert "0 new of 4" in again.output and path.read_text() == before  # idempotent, byte for byte
    # a later session: a new run, and the old ones no longer in `dvc exp show` (their refs stayed on the other machine)
    later = dvc_show()
    newer = json.loads(json.dumps(later[1]["experiments"][0]))
    newer["name"] = newer["revs"][0]["name"] = "t2-mkg-w-transe-uniform"
    newer["revs"][0]["data"]["rev"] = "f" * 40
    newer["revs"][0]["data"]["timestamp"] = "2026-02-01T00:00:00"
    later[1]["experiments"] = [newer]
    third = CliRunner().invoke(app, ["experiments-save", "--experiments", write(tmp_path / "b.json", later), "--ledger", str(path)])
    assert "1 new of 1" in third.output and "(5 in all)" in third.output
    assert json.loads(path.read_text().splitlines()[-1])["data"]["rev"] == "f" * 40  # both runs of the name kept, newest last
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically


def test_a_damaged_ledger_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "experiments.jsonl"
    path.write_text(ledger.render(ledger.finished(dvc_show())) + '{"name": "half"\n')
    with pytest.raises(DataError, match=r"experiments\.jsonl:5: not JSON"):
        ledger.read(path)
    damaged = path.read_text()
    saved = CliRunner().invoke(app, ["experiments-save", "--experiments", write(tmp_path / "a.json", dvc_show()), "--ledger", str(path)])
    assert isinstance(saved.exception, DataError) and path.read_text() == damaged  # refused, nothing overwritten
    path.write_text('{"name": "x", "data": {"rev": "abc"}}\n')
    with pytest.raises(DataError, match=r"experiments\.jsonl:1: not a ledger record"):
        ledger.read(path)
    assert ledger.read(tmp_path / "absent.jsonl") == []


def test_report_and_figures_rebuild_from_the_ledger_alone(tmp_path):
    """A fresh clone: `dvc exp show` lists nothing, the ledger holds the runs; the results equal those
    read from `dvc exp show` itself, and a run in both is counted once."""
    empty = write(tmp_path / "empty.json", [{"rev": "workspace", "name": None, "data": {"rev": "workspace", "params": {}}, "experiments": None}])
    runner = CliRunner()

    path = tmp_path / "table.jsonl"
    path.write_text(ledger.render(ledger.finished(dvc_show())))
    live = runner.invoke(app, ["report", "--no-ledger", "--experiments", write(tmp_path / "t.json", dvc_show()), "--out", str(tmp_path / "live"), "--dataset", "mkg-w"])
    kept = runner.invoke(app, ["report", "--ledger", str(path), "--experiments", empty, "--out", str(tmp_path / "kept"), "--dataset", "mkg-w"])
    assert "3 of 30 Table 2 runs found" in live.output and "3 of 30 Table 2 runs found" in kept.output, kept.output
    assert (tmp_path / "kept" / "table2.csv").read_text() == (tmp_path / "live" / "table2.csv").read_text()

    path = tmp_path / "figures.jsonl"
    path.write_text(ledger.render(ledger.finished(synthetic_show())))
    shown = write(tmp_path / "f.json", synthetic_show())
    outputs = {}
    for name, arguments in (("live", ["--no-ledger", "--experiments", shown]), ("kept", ["--ledger", str(path), "--experiments", empty]),
                            ("both", ["--ledger", str(path), "--experiments", shown])):
        result = runner.invoke(app, ["figures", *arguments, "--out", str(tmp_path / name), "--figure", "fig5"])
        assert result.exit_code == 0, result.output
        assert "fig5: 5 of 8 points found" in result.output
        outputs[name] = (tmp_path / name / "figures.csv").read_text()
    assert outputs["live"] == outputs["kept"] == outputs["both"]
    eps3 = next(r for r in csv.DictReader(io.StringIO(outputs["both"])) if r["parameter"] == "sampler.mmrns.eps0" and r["value"] == "3")
    assert eps3["seeds"] == "2" and eps3["mrr"] == "30.0"
    # each run is read once, from `dvc exp show`, however many sources hold it
    revs = [record["data"]["rev"] for record in _records(ledger.combined(ledger.read(path), synthetic_show()))]
    assert len(revs) == len(set(revs)) == len(list(_records(synthetic_show())))


def test_rendering_one_figure_keeps_the_other_figures_rows(tmp_path):
    shown = write(tmp_path / "f.json", synthetic_show())
    runner = CliRunner()
    everything = runner.invoke(app, ["figures", "--no-ledger", "--experiments", shown, "--out", str(tmp_path)])
    assert everything.exit_code == 0, everything.output
    before = list(csv.DictReader(io.StringIO((tmp_path / "figures.csv").read_text())))
    # fig5 again from a show without its eps0 runs: its rows change, fig4's and fig6's stay
    fewer = synthetic_show()
    fewer[0]["experiments"] = [e for e in fewer[0]["experiments"] if not e["name"].startswith("f5-")]
    result = runner.invoke(app, ["figures", "--no-ledger", "--experiments", write(tmp_path / "g.json", fewer), "--out", str(tmp_path), "--figure", "fig5"])
    assert result.exit_code == 0, result.output
    after = list(csv.DictReader(io.StringIO((tmp_path / "figures.csv").read_text())))
    assert len(after) == len(before) == 112 + 8 + 8
    assert [r for r in after if r["figure"] != "fig5"] == [r for r in before if r["figure"] != "fig5"]
    key = lambda row: (row["figure"], row["dataset"], row["model"], row["sampler"], row["parameter"], row["value"])  # noqa: E731
    assert [key(r) for r in after] == [key(r) for r in before]  # rows stay in place: a diff shows only what changed
    eps3 = next(r for r in after if r["figure"] == "fig5" and r["value"] == "3")
    assert eps3["mrr"] == "" and next(r for r in before if r["figure"] == "fig5" and r["value"] == "3")["mrr"] == "30.0"
