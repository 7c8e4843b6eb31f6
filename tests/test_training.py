"""Training loop and `train` stage: resume equivalence (real interruption), extension,
fresh start on changed config, NaN guard, early stopping, optimizer groups, config errors,
and the stage's outputs on a small canonical dataset."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from pipeline.errors import ConfigError
from pipeline.evaluation import evaluate
from pipeline.graph import KnowledgeGraph, load_graph
from pipeline.losses import NegativeSamplingLoss, SubsamplingWeights
from pipeline.models import build_model
from pipeline.samplers import build_sampler
from pipeline.samplers.uniform import UniformSampler
from pipeline.training import TrainingDiverged, TrainSettings, build_optimizer, fit, load_model, read_checkpoint
from stages.train import check_sampler_section, check_train_section

SHARED = {"dim": 8, "gamma": 3.0, "regularization": 1e-3}


def small_graph(seed: int = 0) -> KnowledgeGraph:
    generator = torch.Generator().manual_seed(seed)
    triples = torch.unique(
        torch.stack([torch.randint(30, (260,), generator=generator), torch.randint(3, (260,), generator=generator), torch.randint(30, (260,), generator=generator)], 1),
        dim=0,
    )
    triples = triples[torch.randperm(len(triples), generator=generator)]
    return KnowledgeGraph(30, 3, triples[:200], triples[200:220], triples[220:240])


class Run:
    """Builds model, sampler and loss from seeds, as a fresh process would."""

    def __init__(self, graph, model="TransE", sampler="uniform", sampler_options=None, subsampling=False, steps=40, patience=100):
        self.graph, self.model_name, self.sampler_name = graph, model, sampler
        self.sampler_options, self.subsampling = sampler_options or {}, subsampling
        self.settings = TrainSettings(steps=steps, batch_size=16, lr=0.01, sampler_lr=0.001, valid_every=10, patience=patience, seed=5, log_every=5)
        self.fingerprint = {"model": model, "sampler": sampler, "subsampling": subsampling}

    def __call__(self, directory: Path, validate=None, loss=None, settings=None):
        torch.manual_seed(self.settings.seed)
        model = build_model(self.model_name, self.graph, SHARED)
        sampler = build_sampler(self.sampler_name, self.sampler_options, self.graph, model, 4, 11)
        weights = SubsamplingWeights(self.graph.train, 30, 3) if self.subsampling else None
        validate = validate or (lambda m: evaluate(m, self.graph, "valid")["realistic"]["both"])
        config = {"name": self.model_name, "shared": SHARED, "options": {}}
        result = fit(model, sampler, loss or NegativeSamplingLoss(0.5, True), self.graph, settings or self.settings, directory, validate, config, self.fingerprint, weights, progress=False)
        return model, result


def interrupting(graph, at_call: int):
    """A validator that stops the run (like Ctrl-C) on its ``at_call``-th call, before that checkpoint."""
    calls = []

    def validate(model):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return evaluate(model, graph, "valid")["realistic"]["both"]

    return validate


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "options",
    [
        {"model": "TransE", "sampler": "uniform"},
        {"model": "ComplEx", "sampler": "bernoulli", "sampler_options": {"exclude_positives": True}, "subsampling": True},
        {"model": "TransE", "sampler": "kbgan", "sampler_options": {"generator_dim": 4, "candidates": 6}},
        {"model": "DistMult", "sampler": "nscaching", "sampler_options": {"cache_size": 5, "candidates": 5}},
        {"model": "TransE", "sampler": "sans", "sampler_options": {"variant": "random_walk", "num_walks": 5, "exclude_positives": True}},
        {"model": "ComplEx", "sampler": "ns-kge"},
    ],
)
def test_interrupted_run_resumes_bit_identical(tmp_path, options):
    graph = small_graph()
    run = Run(graph, **options)
    model_a, result_a = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", validate=interrupting(graph, at_call=3))
    assert read_checkpoint(tmp_path / "b" / "last.pt")["step"] == 20
    model_b, result_b = run(tmp_path / "b")
    assert result_b.step == result_a.step == 40
    assert same_parameters(model_a, model_b)
    assert result_b.history == result_a.history and len(result_a.history) == 4
    assert result_b.losses == result_a.losses and len(result_a.losses) == 8
    assert result_b.best == result_a.best
    assert torch.equal(read_checkpoint(tmp_path / "a" / "best.pt")["model"]["entities.weight"], read_checkpoint(tmp_path / "b" / "best.pt")["model"]["entities.weight"])
    assert result_a.history[-1]["valid_mrr"] > 0  # really validated with the filtered evaluation


def test_raising_steps_extends_a_finished_run(tmp_path):
    graph = small_graph()
    model_a, result_a = Run(graph, steps=40)(tmp_path / "a")
    Run(graph, steps=20)(tmp_path / "b")
    model_b, result_b = Run(graph, steps=40)(tmp_path / "b")
    assert same_parameters(model_a, model_b) and result_b.history == result_a.history


def test_changed_configuration_starts_fresh(tmp_path):
    graph = small_graph()
    Run(graph, steps=20)(tmp_path)
    run = Run(graph, steps=20)
    run.fingerprint = {**run.fingerprint, "lr": "changed"}
    calls = []
    _, result = run(tmp_path, validate=lambda m: calls.append(1) or {"mrr": 0.1, "hits@10": 0.2})
    assert len(calls) == 2 and [row["step"] for row in result.history] == [10, 20]


def test_finished_run_is_not_trained_again(tmp_path):
    graph = small_graph()
    _, first = Run(graph, steps=20)(tmp_path)
    _, second = Run(graph, steps=20)(tmp_path, validate=lambda m: pytest.fail("no validation expected"))
    assert second.history == first.history and second.step == 20


class NaNAfter(NegativeSamplingLoss):
    """The real loss, turned NaN from a given step on (a stand-in for a diverging run)."""

    def __init__(self, step: int):
        super().__init__(0.5, True)
        self.calls, self.nan_from = 0, step

    def forward(self, positive, negative, weights=None):
        self.calls += 1
        loss = super().forward(positive, negative, weights)
        return loss * float("nan") if self.calls > self.nan_from else loss


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    graph = small_graph()
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 15; last good checkpoint: .*last.pt \(step 10\)"):
        Run(graph)(tmp_path, loss=NaNAfter(15))
    checkpoint = read_checkpoint(tmp_path / "last.pt")
    assert checkpoint["step"] == 10
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_early_stopping_after_patience_validations(tmp_path):
    graph = small_graph()
    scores = iter([0.5, 0.4, 0.45, 0.3, 0.9])
    _, result = Run(graph, steps=100, patience=3)(tmp_path, validate=lambda m: {"mrr": next(scores), "hits@10": 0.0})
    assert result.stopped_early and result.step == 40
    assert result.best["step"] == 10 and result.best["mrr"] == 0.5
    assert read_checkpoint(tmp_path / "best.pt")["step"] == 10


def test_resumed_run_judges_early_stopping_by_its_own_patience(tmp_path):
    graph = small_graph()
    scores = [0.5, 0.4, 0.45, 0.6, 0.3, 0.2, 0.1]
    _, stopped = Run(graph, steps=100, patience=2)(tmp_path, validate=iter_scores(scores[:3]))
    assert stopped.stopped_early and stopped.step == 30  # 0.4, 0.45: two validations without a new best
    _, resumed = Run(graph, steps=100, patience=3)(tmp_path, validate=iter_scores(scores[3:]))
    assert [row["step"] for row in resumed.history] == [10, 20, 30, 40, 50, 60, 70]  # continued from step 30
    assert resumed.stopped_early and resumed.best["step"] == 40 and resumed.best["mrr"] == 0.6
    _, again = Run(graph, steps=90, patience=4)(tmp_path, validate=iter_scores([0.7, 0.65]))
    assert again.step == 90 and again.best == {**again.best, "step": 80, "mrr": 0.7} and not again.stopped_early


def iter_scores(values):
    """A validator returning ``values`` in turn (MRR), then failing the test if called again."""
    it = iter(values)
    return lambda model: {"mrr": next(it, None) or pytest.fail("validated more often than expected"), "hits@10": 0.0}


def test_load_model_rebuilds_the_best_model(tmp_path):
    graph = small_graph()
    model, _ = Run(graph, steps=20)(tmp_path)
    loaded = load_model(tmp_path / "last.pt", graph)
    assert torch.equal(loaded.score_all(graph.test, "tail"), model.score_all(graph.test, "tail"))


class TrainableSampler(UniformSampler):
    def __init__(self, graph, num_negatives, seed):
        super().__init__(graph, num_negatives, seed)
        self.temperature = nn.Parameter(torch.ones(1))


def test_sampler_parameters_get_their_own_learning_rate():
    graph = small_graph()
    model = build_model("DistMult", graph, SHARED)
    settings = TrainSettings(steps=1, batch_size=4, lr=0.01, sampler_lr=0.002, valid_every=1, patience=1, seed=0)
    groups = build_optimizer(model, TrainableSampler(graph, 2, 0), settings).param_groups
    assert [group["lr"] for group in groups] == [0.01, 0.002]
    assert groups[1]["params"][0].shape == (1,)
    assert len(build_optimizer(model, UniformSampler(graph, 2, 0), settings).param_groups) == 1


# -- the stage ------------------------------------------------------------------------
def params_file() -> dict:
    """The repository's params.yaml (the stage's real defaults)."""
    return yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", "abc", "train.batch_size must be a positive integer, got 'abc'"),
        ("steps", 0, "train.steps must be a positive integer, got 0"),
        ("lr", -1.0, "train.lr must be a positive number, got -1.0"),
        ("gamma", "3", "train.gamma must be a non-negative number, got '3'"),
        ("self_adversarial", "yes", "train.self_adversarial must be true or false"),
        ("model", "TransX", "unknown model 'TransX'; valid: complex, distmult, gc-ote, pairre, rotate, transe"),
        ("loss", "hinge", "unknown loss 'hinge'"),
        ("device", "tpu", "train.device must be auto, cpu or cuda"),
        ("threads", -1, "train.threads must be a non-negative integer, got -1"),
        ("lrr", 0.1, "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ],
)
def test_train_section_errors_name_the_key(key, value, message):
    section = dict(params_file()["train"], **{key: value})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_train_section(section)


def test_sampler_section_errors():
    with pytest.raises(ConfigError, match="unknown sampler 'nope'"):
        check_sampler_section({"name": "nope", "seed": 1})
    with pytest.raises(ConfigError, match="sampler.seed must be a non-negative integer"):
        check_sampler_section({"name": "uniform", "seed": "x"})
    with pytest.raises(ConfigError, match="unknown key 'sampler.nme'; did you mean 'sampler.name'?"):
        check_sampler_section({"nme": "uniform", "seed": 1})


def write_canonical(directory: Path, graph: KnowledgeGraph) -> None:
    directory.mkdir(parents=True)
    pd.DataFrame({"id": range(graph.num_entities), "key": [f"e{i}" for i in range(graph.num_entities)], "label": [f"entity {i}" for i in range(graph.num_entities)]}).to_parquet(directory / "entities.parquet")
    pd.DataFrame({"id": range(graph.num_relations), "key": [f"r{i}" for i in range(graph.num_relations)], "label": [f"relation {i}" for i in range(graph.num_relations)]}).to_parquet(directory / "relations.parquet")
    for split in ("train", "valid", "test"):
        pd.DataFrame(graph.split(split).numpy(), columns=["head", "relation", "tail"]).to_parquet(directory / f"{split}.parquet")


def run_stage(tmp_path: Path, **train_overrides):
    from typer.testing import CliRunner

    from stages import app

    params = params_file()
    params["train"].update({"dim": 8, "batch_size": 16, "steps": 30, "valid_every": 10, "log_every": 5, "device": "cpu", **train_overrides})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(
        app,
        ["train", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "models"), "--metrics", str(tmp_path / "metrics" / "train.json"),
         "--report", str(tmp_path / "reports" / "train.json"), "--plots", str(tmp_path / "plots"), "--params", str(tmp_path / "params.yaml")],
    )


def test_train_stage_outputs_resume_and_fresh_start(tmp_path):
    write_canonical(tmp_path / "data", small_graph())
    result = run_stage(tmp_path)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert set(metrics) == {"steps", "best_step", "valid_mrr", "train_seconds"} and metrics["steps"] == 30  # headline only
    report = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert report["model"] == "TransE" and report["best_step"] == metrics["best_step"] and 0 < report["valid"]["mrr"] <= 1
    assert metrics["valid_mrr"] == report["valid"]["mrr"]  # the model selection criterion, for `dvc exp show`
    curve = pd.read_csv(tmp_path / "plots" / "train_curve.csv")
    assert list(curve.columns) == ["step", "loss", "valid_mrr", "valid_hits@10"] and list(curve["step"]) == [10, 20, 30]
    assert list(pd.read_csv(tmp_path / "plots" / "train_loss.csv")["step"]) == [5, 10, 15, 20, 25, 30]
    assert (tmp_path / "plots" / "train_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_model(tmp_path / "models" / "best.pt", load_graph(tmp_path / "data"))
    assert best.num_entities == 30

    again = run_stage(tmp_path, steps=40, patience=7)  # same config, more steps, another patience: resumes at 30
    assert again.exit_code == 0, again.output
    assert "resuming from step 30" in again.output
    assert list(pd.read_csv(tmp_path / "plots" / "train_curve.csv")["step"]) == [10, 20, 30, 40]

    fresh = run_stage(tmp_path, steps=20, lr=0.05)  # changed config: starts over
    assert fresh.exit_code == 0, fresh.output
    assert list(pd.read_csv(tmp_path / "plots" / "train_curve.csv")["step"]) == [10, 20]


def test_train_stage_reports_config_errors(tmp_path):
    write_canonical(tmp_path / "data", small_graph())
    result = run_stage(tmp_path, batch_size="abc")
    assert result.exit_code != 0
    assert "train.batch_size must be a positive integer, got 'abc'" in str(result.exception)


def test_train_stage_with_mmrns_sampler_checkpoints_and_resumes(tmp_path):
    """The stage builds MMRNS through its factory (no feature caches: structure only),
    trains, stores the sampler's parameters in last.pt, and resumes from them."""
    write_canonical(tmp_path / "data", small_graph())
    params = params_file()
    params["sampler"].update({"name": "mmrns"})
    params["sampler"]["mmrns"].update({"presample_size": 10, "warm_start": 5})  # Uniform for 5 steps, MMRNS after
    base = dict(params)

    def run(steps: int):
        from typer.testing import CliRunner

        from stages import app

        base["train"] = dict(params["train"], dim=8, batch_size=16, steps=steps, valid_every=10, log_every=5,
                             device="cpu", num_negatives=4)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(base))
        return CliRunner().invoke(app, [
            "train", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "models"),
            "--metrics", str(tmp_path / "metrics" / "train.json"), "--report", str(tmp_path / "reports" / "train.json"),
            "--plots", str(tmp_path / "plots"), "--features", str(tmp_path / "no-features"), "--params", str(tmp_path / "params.yaml")])

    first = run(20)
    assert first.exit_code == 0, first.output
    for modality in ("text", "image"):
        assert f"no entity has the {modality} modality; the sampler does not use it" in first.output
    assert json.loads((tmp_path / "reports" / "train.json").read_text())["sampler"] == "mmrns"
    checkpoint = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    sampler_weights = [k for k in checkpoint["sampler"] if k.endswith("weight")]
    assert sampler_weights, "the sampler's trainable parameters must be in the checkpoint"
    assert len(checkpoint["optimizer"]["param_groups"]) == 2  # model lr and sampler_lr

    again = run(30)  # same config, more steps: resumes at 20
    assert again.exit_code == 0, again.output
    assert list(pd.read_csv(tmp_path / "plots" / "train_curve.csv")["step"]) == [10, 20, 30]
