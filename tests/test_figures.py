"""Fig. 4/5/6: the grids and their queue commands (through DVC's own override parser), matching
experiments of `dvc exp show --json` to points (held keys, one training budget per figure, seeds,
newest per seed), and the `figures` command rendering valid PNGs from synthetic metrics with
missing runs reported."""
from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline import figures
from pipeline.errors import ConfigError
from pipeline.table2 import Cell
from stages import app
from stages import figures as _figures_commands  # noqa: F401  (registers the commands)
from tests.conftest import REPO

DEFAULTS = figures.defaults_from(yaml.safe_load((REPO / "params.yaml").read_text()))


def params_of(point: figures.Point, seed: int = 42, **changes) -> dict:
    """The params.yaml of an experiment run for ``point`` (the committed file with its requirements applied)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**figures.requirements(point, DEFAULTS), "train.seed": seed, **changes}.items():
        node, *path = params, *key.split(".")
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return params


def experiment(name: str, params: dict, metrics: dict | None, timestamp: str) -> dict:
    dataset = params["datasets"][0]
    data = {"rev": f"{abs(hash(name)):040x}"[:40], "timestamp": timestamp, "params": {"params.yaml": {"data": params}},
            "metrics": {f"metrics/{dataset}/evaluate.json": {"data": metrics}} if metrics else {}}
    return {"rev": data["rev"], "name": name, "data": data}


def synthetic_show() -> list:
    """DVC 3's nesting: workspace, then a commit with experiments (some queued, without metrics)."""
    revs = []
    # Fig. 5: eps0 curve complete, one point with two seeds; beta only at its default
    for k, eps0 in enumerate(figures.FIG5_EPS0):
        point = figures.Point("fig5", Cell("mkg-w", "TransE", "mmrns"), "sampler.mmrns.eps0", eps0)
        revs.append(experiment(f"f5-a{k}", params_of(point), {"mrr": 0.30 - 0.01 * k, "hits@10": 0.45}, f"2026-01-0{k + 1}"))
    eps3 = figures.Point("fig5", Cell("mkg-w", "TransE", "mmrns"), "sampler.mmrns.eps0", 3)
    revs.append(experiment("f5-seed2", params_of(eps3, seed=2), {"mrr": 0.31, "hits@10": 0.47}, "2026-01-06"))
    revs.append(experiment("f5-seed2-old", params_of(eps3, seed=2), {"mrr": 0.10, "hits@10": 0.10}, "2025-12-01"))  # older: ignored
    # a variant run (another kgc_gradient) matches no point even though its eps0/beta/ablation are the defaults
    full = figures.Point("fig6", Cell("mkg-w", "TransE", "mmrns"), "sampler.mmrns.ablation", "none")
    revs.append(experiment("variant", params_of(full, **{"sampler.mmrns.kgc_gradient": "maximise"}), {"mrr": 0.99, "hits@10": 0.99}, "2026-02-01"))
    for ablation, mrr in (("no_kca", 0.28), ("no_css", 0.27)):
        point = figures.Point("fig6", Cell("mkg-w", "TransE", "mmrns"), "sampler.mmrns.ablation", ablation)
        revs.append(experiment(f"f6-{ablation}", params_of(point), {"mrr": mrr, "hits@10": 0.40}, "2026-01-07"))
    # Fig. 4: TransE + Uniform dims, one queued run (no metrics)
    for dim in figures.FIG4_DIMS:
        point = figures.Point("fig4", Cell("mkg-w", "TransE", "uniform"), "train.dim", dim)
        revs.append(experiment(f"f4-{dim}", params_of(point), {"mrr": 0.25 + dim / 4000, "hits@10": 0.40} if dim != 400 else None, "2026-01-08"))
    head = experiment("main", yaml.safe_load((REPO / "params.yaml").read_text()), None, "2026-01-01")
    head["experiments"] = [{"name": r["name"], "revs": [r]} for r in revs]
    return [head]


def test_grids_share_configurations_and_dvc_parses_every_queued_override(tmp_path):
    from dvc.utils.hydra import apply_overrides

    assert len(figures.points("fig4")) == 2 * 7 * 8 and len(figures.points("fig5")) == 8 and len(figures.points("fig6")) == 8
    runs = figures.unique_runs(figures.points("fig5") + figures.points("fig6"), DEFAULTS)
    assert len(runs) == 14  # default eps0 = default beta = the full MMRNS of Fig. 6 on MKG-W: one run
    for name, values in runs[:3] + runs[-2:] + figures.unique_runs(figures.points("fig4", ["kbgan"], ["DistMult"]), DEFAULTS)[:2]:
        arguments = figures.queue_arguments(name, values, 2, ["train.steps=500"])
        assert arguments[:5] == ["exp", "run", "--queue", "--name", f"{name}-s2"]
        params = tmp_path / f"{name}.yaml"
        shutil.copy(REPO / "params.yaml", params)
        apply_overrides(params, arguments[6::2])
        applied = yaml.safe_load(params.read_text())
        for key, value in {**values, "train.seed": 2, "sampler.seed": 2, "train.steps": 500}.items():
            node = applied
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, key)


def test_collect_matches_params_held_keys_and_seeds():
    results = figures.collect(synthetic_show(), figures.points("fig5") + figures.points("fig6"), DEFAULTS)
    eps = {p.value: r for p, r in results.items() if p.parameter == "sampler.mmrns.eps0"}
    assert set(eps) == {1, 3, 5, 10}
    assert eps[3].mean["mrr"] == pytest.approx(30.0) and eps[3].std["mrr"] == pytest.approx(1.414, abs=1e-3)  # seeds 42 (29) and 2 (31)
    assert eps[3].experiments == ("f5-a1", "f5-seed2")
    beta = {p.value: r for p, r in results.items() if p.parameter == "sampler.mmrns.beta"}
    default_eps0, default_beta = DEFAULTS["sampler.mmrns.eps0"], DEFAULTS["sampler.mmrns.beta"]
    default_mrr = 30.0 - figures.FIG5_EPS0.index(default_eps0)  # the default-eps0 run is also the default beta and full MMRNS
    assert set(beta) == {default_beta} and beta[default_beta].mean["mrr"] == pytest.approx(default_mrr)
    ablations = {(p.cell.dataset, p.value): r.mean["mrr"] for p, r in results.items() if p.figure == "fig6"}
    assert ablations == {("mkg-w", "none"): pytest.approx(default_mrr), ("mkg-w", "no_kca"): pytest.approx(28.0), ("mkg-w", "no_css"): pytest.approx(27.0)}


def test_a_model_hyper_parameter_is_held_only_for_the_models_that_use_it():
    """DistMult's N3 weight is part of its configuration; TransE ignores it, so its runs count whatever their value."""
    other = DEFAULTS["train.regularization"] * 4
    distmult = figures.Point("fig4", Cell("mkg-w", "DistMult", "uniform"), "train.dim", 100)
    transe = figures.Point("fig4", Cell("mkg-w", "TransE", "uniform"), "train.dim", 100)
    assert figures.requirements(distmult, DEFAULTS)["train.regularization"] == DEFAULTS["train.regularization"]
    assert "train.regularization" not in figures.requirements(transe, DEFAULTS) and "train.gamma" in figures.requirements(transe, DEFAULTS)
    revs = [experiment("dm-default", params_of(distmult), {"mrr": 0.20, "hits@10": 0.30}, "2026-01-01"),
            experiment("dm-other-n3", params_of(distmult, seed=43, **{"train.regularization": other}), {"mrr": 0.90, "hits@10": 0.90}, "2026-01-02"),
            experiment("te-other-n3", params_of(transe, **{"train.regularization": other}), {"mrr": 0.25, "hits@10": 0.40}, "2026-01-02")]
    head = experiment("main", yaml.safe_load((REPO / "params.yaml").read_text()), None, "2026-01-01")
    head["experiments"] = [{"name": r["name"], "revs": [r]} for r in revs]
    assert figures.collect([head], [distmult], DEFAULTS)[distmult].experiments == ("dm-default",)
    assert figures.collect([head], [transe], DEFAULTS)[transe].experiments == ("te-other-n3",)
    queued = dict(figures.unique_runs([distmult, transe], DEFAULTS))
    assert queued[distmult.name()]["train.regularization"] == DEFAULTS["train.regularization"]
    assert "train.regularization" not in queued[transe.name()]


def budget_show() -> list:
    """TransE + Uniform (Fig. 4) dim runs of 3000 steps, its default point also run for 7000 steps (another
    seed, newer), one dim 400 run of 7000 steps; Fig. 5 eps0 runs without warm start, its default with 6000."""
    uniform = {dim: figures.Point("fig4", Cell("mkg-w", "TransE", "uniform"), "train.dim", dim) for dim in figures.FIG4_DIMS}
    eps0 = {value: figures.Point("fig5", Cell("mkg-w", "TransE", "mmrns"), "sampler.mmrns.eps0", value) for value in figures.FIG5_EPS0}
    short, long = {"train.steps": 3000, "train.valid_every": 500, "train.patience": 100}, {"train.steps": 7000, "train.valid_every": 500, "train.patience": 100}
    revs = [experiment(f"short-{dim}", params_of(uniform[dim], **short), {"mrr": 0.20 + dim / 2500, "hits@10": 0.40}, "2026-01-01") for dim in (50, 100, 200)]
    revs.append(experiment("long-200", params_of(uniform[200], seed=43, **long), {"mrr": 0.32, "hits@10": 0.45}, "2026-01-02"))
    revs.append(experiment("long-400", params_of(uniform[400], **long, **{"sampler.mmrns.warm_start": 0}), {"mrr": 0.33, "hits@10": 0.46}, "2026-01-02"))
    revs += [experiment(f"eps0-{value}", params_of(point, **{"sampler.mmrns.warm_start": 0}), {"mrr": 0.30, "hits@10": 0.45}, "2026-01-03")
             for value, point in eps0.items() if value != DEFAULTS["sampler.mmrns.eps0"]]
    revs.append(experiment("eps0-default-warm", params_of(eps0[DEFAULTS["sampler.mmrns.eps0"]]), {"mrr": 0.99, "hits@10": 0.99}, "2026-01-04"))
    head = experiment("main", yaml.safe_load((REPO / "params.yaml").read_text()), None, "2026-01-01")
    head["experiments"] = [{"name": r["name"], "revs": [r]} for r in revs]
    return [head]


def test_a_point_never_mixes_training_budgets():
    curve = [p for p in figures.points("fig4", ["uniform"], ["TransE"]) if p.parameter == "train.dim"]
    shown = budget_show()
    shown[0]["experiments"] = [e for e in shown[0]["experiments"] if e["name"] != "long-400"]
    results = {p.value: r for p, r in figures.collect(shown, curve, DEFAULTS).items()}
    assert results[200].experiments == ("short-200",) and results[200].mean["mrr"] == pytest.approx(28.0)  # the 7000-step run of the same configuration is left out
    assert results[200].budget == {"train.steps": 3000, "train.valid_every": 500, "train.patience": 100}
    with pytest.raises(ConfigError, match="fig4: its runs have 2 training budgets: train.steps=3000 .*train.steps=7000 .*--budget train.steps=3000"):
        figures.collect(budget_show(), curve, DEFAULTS)  # swept runs of two budgets: neither is chosen silently
    chosen = {p.value: r.experiments for p, r in figures.collect(budget_show(), curve, DEFAULTS, {"train.steps": 7000}).items()}
    assert chosen == {200: ("long-200",), 400: ("long-400",)}  # warm_start does not bear on Uniform runs
    fig5 = {p.value: r.experiments for p, r in figures.collect(budget_show(), figures.points("fig5"), DEFAULTS).items() if p.parameter == "sampler.mmrns.eps0"}
    assert fig5 == {value: (f"eps0-{value}",) for value in figures.FIG5_EPS0 if value != DEFAULTS["sampler.mmrns.eps0"]}  # not the default's 6000-step warm start


def test_fig4_models_may_have_different_budgets(tmp_path):
    """Each Fig. 4 PNG (one per model) is a figure of its own budget: MMRNS warm-started for 2000
    steps with TransE and 500 with DistMult plot side by side, each beside its own Uniform runs."""
    revs = []
    for model, warm in (("TransE", 2000), ("DistMult", 500)):
        for sampler in ("uniform", "mmrns"):
            for dim in (50, 100):
                point = figures.Point("fig4", Cell("mkg-w", model, sampler), "train.dim", dim)
                changes = {"train.steps": 3000, "sampler.mmrns.warm_start": warm}
                revs.append(experiment(f"{model}-{sampler}-{dim}", params_of(point, **changes), {"mrr": 0.2, "hits@10": 0.3}, "2026-01-01"))
    head = experiment("main", yaml.safe_load((REPO / "params.yaml").read_text()), None, "2026-01-01")
    head["experiments"] = [{"name": r["name"], "revs": [r]} for r in revs]
    chosen = figures.points("fig4", ["uniform", "mmrns"])
    with pytest.raises(ConfigError, match="4 training budgets"):
        figures.collect([head], chosen, DEFAULTS)  # both models as one figure: their budgets differ
    shown = tmp_path / "show.json"
    shown.write_text(json.dumps([head]))
    result = CliRunner().invoke(app, ["figures", "--no-ledger", "--experiments", str(shown), "--out", str(tmp_path), "--figure", "fig4",
                                      "--sampler", "uniform", "--sampler", "mmrns"])
    assert result.exit_code == 0, result.output
    assert "sampler.mmrns.warm_start=2000" in result.output and "sampler.mmrns.warm_start=500" in result.output
    rows = [r for r in csv.DictReader(io.StringIO((tmp_path / "figures.csv").read_text())) if r["seeds"] != "0"]
    assert len(rows) == 8 and {r["experiments"] for r in rows} == {r["name"] for r in revs}


def test_figures_command_plots_one_budget_and_names_several(tmp_path):
    shown = tmp_path / "show.json"
    shown.write_text(json.dumps(budget_show()))
    arguments = ["figures", "--no-ledger", "--experiments", str(shown), "--out", str(tmp_path), "--figure", "fig4", "--sampler", "uniform"]
    several = CliRunner().invoke(app, arguments)
    assert "2 training budgets" in str(several.exception) and "long-400" in str(several.exception)
    result = CliRunner().invoke(app, [*arguments, "--budget", "train.steps=3000"])
    assert result.exit_code == 0, result.output
    assert "fig4: 4 of 16 points found at train.steps=3000 train.valid_every=500" in result.output  # dim 50, 100, 200 = lr 1e-3
    rows = [r for r in csv.DictReader(io.StringIO((tmp_path / "figures.csv").read_text())) if r["seeds"] != "0"]
    assert {r["experiments"] for r in rows} == {"short-50", "short-100", "short-200"} and all(r["budget"].startswith("train.steps=3000 ") for r in rows)
    bad = CliRunner().invoke(app, [*arguments, "--budget", "train.epochs=3"])
    assert "--budget 'train.epochs=3': expected KEY=INTEGER" in str(bad.exception)


def test_figures_command_renders_valid_pngs_and_reports_missing_runs(tmp_path):
    shown = tmp_path / "show.json"
    shown.write_text(json.dumps(synthetic_show()))
    out = tmp_path / "figures"
    result = CliRunner().invoke(app, ["figures", "--no-ledger", "--experiments", str(shown), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "fig5: 5 of 8 points found" in result.output and "fig6: 3 of 8 points found" in result.output
    # Uniform dims 50/100/200 and lr 1e-3 (= dim 200), MMRNS dim 200 and lr 1e-3 (= Fig. 5's default run)
    assert "fig4: 6 of 112 points found" in result.output
    assert "fig6: missing 5: f6-mkg-w-transe-mmrns-no-rel, f6-mkg-y-transe-mmrns-none" in result.output
    assert "f4-mkg-w-transe-uniform-dim400" in result.output and "figures-queue --figure fig4" in result.output
    for name in ("fig4_transe.png", "fig4_distmult.png", "fig5.png", "fig6.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 800 and image.size[1] > 400
            image.verify()
    rows = list(csv.DictReader(io.StringIO((out / "figures.csv").read_text())))
    assert len(rows) == 112 + 8 + 8
    eps3 = next(r for r in rows if r["figure"] == "fig5" and r["parameter"] == "sampler.mmrns.eps0" and r["value"] == "3")
    assert (eps3["mrr"], eps3["mrr_std"], eps3["seeds"]) == ("30.0", "1.41", "2")
    assert next(r for r in rows if r["figure"] == "fig6" and r["value"] == "no_rel")["mrr"] == ""
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left

    bad = CliRunner().invoke(app, ["figures", "--no-ledger", "--experiments", str(shown), "--out", str(out), "--figure", "fig7"])
    assert "--figure: unknown fig7; valid: fig4, fig5, fig6" in str(bad.exception)


def test_queue_command_dry_run_prints_each_configuration_once():
    result = CliRunner().invoke(app, ["figures-queue", "--figure", "fig5", "--figure", "fig6", "--dry-run", "--set", "train.threads=1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 14 and all(line.startswith("dvc exp run --queue --name f") and line.endswith("-S train.threads=1") for line in lines)
    assert lines[0].startswith("dvc exp run --queue --name f5-mkg-w-transe-mmrns-eps0-1 -S 'datasets=[mkg-w]' -S train.model=TransE -S sampler.name=mmrns")
    assert sum("sampler.mmrns.ablation=no_rel" in line for line in lines) == 2  # MKG-W and MKG-Y
    seeded = CliRunner().invoke(app, ["figures-queue", "--figure", "fig6", "--dry-run", "--seeds", "3"])
    assert len(seeded.output.splitlines()) == 24 and "--name f6-mkg-y-transe-mmrns-no-rel-s3 " in seeded.output


def test_queue_command_narrows_fig4_to_a_model():
    result = CliRunner().invoke(app, ["figures-queue", "--figure", "fig4", "--sampler", "uniform", "--model", "distmult", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 7 and all("--name f4-mkg-w-distmult-uniform-" in line and "train.model=DistMult" in line for line in lines)
    assert all(f"train.regularization={DEFAULTS['train.regularization']}" in line for line in lines)
    unknown = CliRunner().invoke(app, ["figures-queue", "--figure", "fig4", "--model", "RotatE", "--dry-run"])
    assert unknown.exit_code != 0 and "--model: unknown RotatE; valid: TransE, DistMult" in str(unknown.exception)


def test_committed_figures_rebuild_from_the_committed_ledger_alone(tmp_path):
    """The README's figures (its MMRNS points: the relation-scoped sampler) come from
    reports/experiments.jsonl, so a fresh clone (no `dvc exp` refs) reproduces
    plots/figures/**/figures.csv; dvc.yaml's top-level plots name those PNGs."""
    relation = tmp_path / "relation.yaml"
    relation.write_text((REPO / "params.yaml").read_text().replace("    presample_scope: batch\n", "    presample_scope: relation\n"))
    nothing = tmp_path / "none.json"
    nothing.write_text("[]")
    for committed, figure in ((REPO / "plots/figures", "fig4"), (REPO / "plots/figures/relation", "fig5"), (REPO / "plots/figures/relation", "fig6")):
        out = tmp_path / figure
        result = CliRunner().invoke(app, ["figures", "--figure", figure, "--params", str(relation), "--experiments", str(nothing),
                                          "--ledger", str(REPO / "reports/experiments.jsonl"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        rebuilt = [r for r in csv.DictReader(io.StringIO((out / "figures.csv").read_text())) if r["figure"] == figure]
        expected = [r for r in csv.DictReader(io.StringIO((committed / "figures.csv").read_text())) if r["figure"] == figure]
        assert rebuilt == expected and all(r["seeds"] != "0" for r in rebuilt if r["dataset"] == "mkg-w")  # MKG-Y: not run
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert declared and all((REPO / path).is_file() and path.endswith(".png") for path in declared)
