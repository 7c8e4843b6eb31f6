"""The training progress bar's total is the step by which the run ends unless VALID MRR
improves (stop_horizon), so its ETA holds under early stopping."""
from __future__ import annotations

import torch

from pipeline.graph import KnowledgeGraph
from pipeline.losses import NegativeSamplingLoss
from pipeline.models import build_model
from pipeline.samplers.uniform import UniformSampler
from pipeline.training import LoopState, TrainSettings, fit, stop_horizon

SETTINGS = TrainSettings(steps=100, batch_size=8, lr=0.01, sampler_lr=0.001, valid_every=10, patience=3, seed=0, log_every=5)


def test_horizon_before_and_after_validations():
    assert stop_horizon(LoopState(), SETTINGS) == 40  # first validation always improves, then 3 without
    improved = LoopState(step=30, best={"step": 30, "mrr": 0.5}, history=[{"step": 30}])
    assert stop_horizon(improved, SETTINGS) == 60
    waiting = LoopState(step=50, best={"step": 30, "mrr": 0.5}, bad_validations=2, history=[{"step": 50}])
    assert stop_horizon(waiting, SETTINGS) == 60
    assert stop_horizon(LoopState(), TrainSettings(**{**SETTINGS.__dict__, "steps": 25})) == 25  # never past steps


def test_run_stops_at_the_horizon_of_its_best_validation(tmp_path):
    generator = torch.Generator().manual_seed(0)
    triples = torch.stack([torch.randint(20, (80,), generator=generator), torch.randint(2, (80,), generator=generator),
                           torch.randint(20, (80,), generator=generator)], 1)
    graph = KnowledgeGraph(20, 2, triples[:60], triples[60:70], triples[70:])
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.2, 0.9])  # best at step 20, then 3 worse validations: stop at 50

    def validate(model):
        return {"mrr": next(scores), "hits@10": 0.0}

    torch.manual_seed(0)
    model = build_model("TransE", graph, {"dim": 4, "gamma": 3.0, "regularization": 0.0})
    result = fit(model, UniformSampler(graph, 2, 1), NegativeSamplingLoss(0.5, True), graph, SETTINGS, tmp_path, validate,
                 {"name": "TransE", "shared": {"dim": 4, "gamma": 3.0, "regularization": 0.0}, "options": {}}, {"run": 1}, progress=False)
    assert result.stopped_early and result.step == 50 and result.best["step"] == 20
    after_best = LoopState(step=20, best=result.best, history=[{"step": 20}])
    assert stop_horizon(after_best, SETTINGS) == result.step
