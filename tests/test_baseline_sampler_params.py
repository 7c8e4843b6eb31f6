"""The params.yaml subsections of the Table 2 baseline samplers build their sampler, and one
real training step (``pipeline.training.step_loss``) with it gives a finite loss whose
gradient reaches the KGC model (and KBGAN's generator)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.graph import KnowledgeGraph
from pipeline.losses import build_loss
from pipeline.models import build_model
from pipeline.samplers import build_sampler
from pipeline.training import step_loss

PARAMS = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())


@pytest.mark.parametrize(("name", "model_name"), [("kbgan", "TransE"), ("nscaching", "DistMult"), ("sans", "ComplEx"), ("ns-kge", "TransE")])
def test_committed_options_build_and_train_one_step(name, model_name):
    generator = torch.Generator().manual_seed(0)
    train = torch.stack([torch.randint(40, (120,), generator=generator), torch.randint(4, (120,), generator=generator), torch.randint(40, (120,), generator=generator)], 1)
    graph = KnowledgeGraph(40, 4, train, train[:5], train[:5])
    torch.manual_seed(0)
    model = build_model(model_name, graph, {"dim": 8, "gamma": 3.0, "regularization": 1e-3})
    sampler = build_sampler(name, PARAMS["sampler"][name], graph, model, PARAMS["train"]["num_negatives"], PARAMS["sampler"]["seed"])
    loss_fn = build_loss("margin" if name == "kbgan" else "nssa", 3.0, 0.5, True)
    loss = step_loss(model, sampler, loss_fn, train[:32], step=0)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.entities.weight.grad is not None and model.entities.weight.grad.coalesce().values().abs().sum() > 0
    assert all(p.grad is not None for p in sampler.parameters())
