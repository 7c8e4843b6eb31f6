"""Table 2: the paper's numbers, the grid and its per-sampler losses, collecting results from
`dvc exp show --json` (DVC 3 nesting), the markdown/CSV report (ours beside the paper's, best
and second per block, missing runs), and the `table2` / `report` commands."""
from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from pipeline import table2
from pipeline.table2 import Cell
from stages import app
from stages import report as report_stage  # noqa: F401  (registers the commands)


def test_paper_table_and_grid_shape():
    paper = table2.paper_table()
    assert len(paper) == 87  # 3 datasets x (3 models x 7 + 2 x 3 + 2)
    assert paper[Cell("mkg-w", "TransE", "sans")] == {"mrr": 30.22, "mr": 489.0, "hits@1": 23.64, "hits@3": 32.78, "hits@10": 42.64}
    assert paper[Cell("db15k", "GC-OTE", "mmrns")]["hits@10"] == 50.96
    cells = table2.grid()
    assert len(cells) == 90 and len(set(cells)) == 90
    assert {c.sampler for c in cells if c.model == "RotatE"} == {"uniform", "sans", "mmrns"}
    assert len(table2.grid(["mkg-w"], ["TransE"])) == 7
    assert table2.grid(["mkg-w"], ["PairRE"], ["kbgan"]) == []


@pytest.mark.parametrize(("cell", "expected"), [
    (Cell("mkg-w", "TransE", "kbgan"), {"train.loss": "margin", "train.self_adversarial": False}),
    (Cell("mkg-w", "TransE", "bernoulli"), {"train.loss": "margin", "train.self_adversarial": False}),
    (Cell("mkg-w", "DistMult", "nscaching"), {"train.loss": "nssa", "train.self_adversarial": False, "train.valid_every": 500}),
    (Cell("mkg-w", "TransE", "sans"), {"train.loss": "nssa", "train.self_adversarial": True}),
    (Cell("db15k", "RotatE", "uniform"), {"train.loss": "nssa", "train.self_adversarial": True, "train.gamma": 6.0}),
])
def test_each_sampler_trains_under_its_own_papers_loss(cell, expected):
    values = table2.overrides(cell)
    assert values["datasets"] == [cell.dataset] and values["train.model"] == cell.model and values["sampler.name"] == cell.sampler
    assert {key: values[key] for key in expected} == expected
    assert ("train.gamma" in values) == (cell.dataset == "db15k")


def experiment(name, dataset, model, sampler, metrics, timestamp):
    data = {
        "rev": f"{abs(hash(name)):040x}"[:40],
        "timestamp": timestamp,
        "params": {"params.yaml": {"data": {"datasets": [dataset], "train": {"model": model}, "sampler": {"name": sampler}}}},
        "metrics": {f"metrics/{dataset}/evaluate.json": {"data": metrics}} if metrics else {},
    }
    return {"rev": data["rev"], "name": name, "data": data, "experiments": None}


def metrics(mrr, mr=1000.0):
    return {"mrr": mrr, "mr": mr, "hits@1": mrr - 0.05, "hits@3": mrr + 0.02, "hits@10": mrr + 0.1}


def queued(name, sampler):
    """A queued or running experiment as DVC shows it: its params, the *workspace's* metric files
    (stale: they belong to the commit it was queued from) and ``data.rev == "workspace"``."""
    record = experiment(name, "mkg-w", "TransE", sampler, metrics(0.99, 1), None)
    record["data"]["rev"] = "workspace"
    return record


def dvc_show():
    """The shape of DVC 3's `dvc exp show --json`: workspace, a commit, its experiments nested."""
    head = experiment(None, "mkg-w", "TransE", "uniform", None, "2026-01-01T00:00:00")
    head["experiments"] = [
        {"name": "t2-mkg-w-transe-uniform", "revs": [experiment("t2-mkg-w-transe-uniform", "mkg-w", "TransE", "uniform", metrics(0.30, 900), "2026-01-02T00:00:00")]},
        {"name": "old-sans", "revs": [experiment("old-sans", "mkg-w", "TransE", "sans", metrics(0.10), "2026-01-05T00:00:00")]},
        {"name": "t2-mkg-w-transe-sans", "revs": [experiment("t2-mkg-w-transe-sans", "mkg-w", "TransE", "sans", metrics(0.31, 500), "2026-01-03T00:00:00")]},
        {"name": "t2-mkg-w-transe-kbgan", "revs": [experiment("t2-mkg-w-transe-kbgan", "mkg-w", "TransE", "kbgan", metrics(0.25, 1500), "2026-01-04T00:00:00")]},
        {"name": "t2-mkg-w-transe-nscaching", "revs": [queued("t2-mkg-w-transe-nscaching", "nscaching")]},
    ]
    return [experiment("workspace", "mkg-w", "TransE", "uniform", None, None), head]


def test_collect_reads_nested_experiments_and_prefers_the_recipes_runs():
    results = table2.collect(dvc_show())
    assert set(results) == {Cell("mkg-w", "TransE", c) for c in ("uniform", "sans", "kbgan")}
    sans = results[Cell("mkg-w", "TransE", "sans")]
    assert sans["experiment"] == "t2-mkg-w-transe-sans"  # the recipe's run beats a newer ad-hoc one
    assert sans["mrr"] == pytest.approx(31.0) and sans["mr"] == 500.0 and sans["hits@10"] == pytest.approx(41.0)


def test_markdown_and_csv_in_table_2_shape():
    cells = table2.grid(["mkg-w"], ["TransE"])
    results = table2.collect(dvc_show())
    markdown = table2.render_markdown(results, cells)
    rows = {line.split(" | ")[1]: line for line in markdown.splitlines() if line.startswith("| TransE")}
    assert set(rows) == {"Uniform", "Bernoulli", "KBGAN", "NSCaching", "SANS", "NS-KGE", "MMRNS"}
    assert "| **31.00** (30.22) | **500** (489) |" in rows["SANS"]  # best MRR and MR of the block
    assert "| _30.00_ (29.19) | _900_ (1067) |" in rows["Uniform"]  # second
    assert "| 25.00 (24.21) | 1500 (1450) |" in rows["KBGAN"]
    assert "missing (28.90)" in rows["NSCaching"] and "missing (33.51)" in rows["MMRNS"]
    table = list(csv.DictReader(io.StringIO(table2.render_csv(results, cells))))
    assert [row["sampler"] for row in table] == list(table2.ALL_SAMPLERS)
    sans = next(row for row in table if row["sampler"] == "sans")
    assert (sans["mkg-w_mrr"], sans["mkg-w_mrr_paper"], sans["mkg-w_mrr_place"], sans["mkg-w_experiment"]) == ("31.0", "30.22", "1", "t2-mkg-w-transe-sans")
    assert next(row for row in table if row["sampler"] == "mmrns")["mkg-w_mrr"] == ""


def test_commands_queue_recipe_and_report(tmp_path):
    runner = CliRunner()
    queued = runner.invoke(app, ["table2", "--dataset", "mkg-w", "--model", "transe", "--sampler", "kbgan", "--sampler", "sans", "--dry-run"])
    assert queued.exit_code == 0, queued.output
    assert queued.output.splitlines() == [
        "dvc exp run --queue --name t2-mkg-w-transe-kbgan -S 'datasets=[mkg-w]' -S train.model=TransE -S sampler.name=kbgan "
        "-S train.loss=margin -S train.self_adversarial=false",
        "dvc exp run --queue --name t2-mkg-w-transe-sans -S 'datasets=[mkg-w]' -S train.model=TransE -S sampler.name=sans "
        "-S train.loss=nssa -S train.self_adversarial=true",
    ]
    shown = tmp_path / "show.json"
    shown.write_text(json.dumps(dvc_show()))
    result = runner.invoke(app, ["report", "--no-ledger", "--experiments", str(shown), "--out", str(tmp_path / "reports"), "--dataset", "mkg-w"])
    assert result.exit_code == 0, result.output
    assert "3 of 30 Table 2 runs found" in result.output
    assert (tmp_path / "reports" / "table2.md").read_text().count("missing") > 20
    assert (tmp_path / "reports" / "table2.csv").read_text().startswith("model,sampler,mkg-w_mrr,")


def test_dvc_parses_every_cells_overrides_into_params(tmp_path):
    """The `-S` arguments go through DVC's own override parser (what `dvc exp run` applies)."""
    import shutil

    import yaml
    from dvc.utils.hydra import apply_overrides

    from tests.conftest import REPO

    # every sampler and loss choice, margin 6, validation every 500, a dashed model name (0.5 s per cell)
    for cell in table2.grid(["mkg-w"], ["TransE"]) + table2.grid(["db15k"], ["DistMult", "GC-OTE"]):
        params = tmp_path / f"{table2.experiment_name(cell)}.yaml"
        shutil.copy(REPO / "params.yaml", params)
        apply_overrides(params, table2.override_arguments(cell)[1::2])
        applied = yaml.safe_load(params.read_text())
        for key, value in table2.overrides(cell).items():
            node = applied
            for part in key.split("."):
                node = node[part]
            assert node == value, (cell, key)
