"""NS-KGE: the closed-form non-sampling loss equals the brute-force sum over every negative
(and so does its gradient) for DistMult, ComplEx and TransE; the training step uses it;
other models get a clear error."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.losses import NegativeSamplingLoss
from pipeline.models import build_model
from pipeline.samplers import build_sampler
from pipeline.training import step_loss

SHARED = {"dim": 4, "gamma": 3.0, "regularization": 0.0}


def tiny_graph() -> KnowledgeGraph:
    train = torch.tensor([[0, 0, 1], [0, 0, 2], [1, 1, 3], [4, 2, 0], [2, 1, 5], [5, 0, 4]])
    return KnowledgeGraph(6, 3, train, train[:2], train[:2])


def brute_force(model, positives, c_pos, c_neg, fitted) -> torch.Tensor:
    """mean_b sum_side [c+ (y - s(e*))^2 + c- sum_{e != e*} s(e)^2], every entity enumerated."""
    rows = []
    for triple in positives:
        total = 0.0
        for side, column in (("tail", 2), ("head", 0)):
            scores, target = fitted(model.score_all(triple.unsqueeze(0), side)[0])
            true = int(triple[column])
            negatives = torch.cat([scores[:true], scores[true + 1 :]])
            total = total + c_pos * (target - scores[true]) ** 2 + c_neg * negatives.square().sum()
        rows.append(total)
    return torch.stack(rows).mean()


def fitted_scores(name: str, gamma: float):
    """The score NS-KGE fits, from the model's own all-entity scores, and its target."""
    if name == "TransE":  # model score gamma - ||.||_2  ->  gamma - ||.||^2, target gamma
        return lambda scores: (gamma - (gamma - scores) ** 2, gamma)
    return lambda scores: (scores, 1.0)


@pytest.mark.parametrize("name", ["DistMult", "ComplEx", "TransE"])
def test_closed_form_equals_brute_force_and_gradients_match(name):
    graph = tiny_graph()
    torch.manual_seed(0)
    model = build_model(name, graph, SHARED).double()
    with torch.no_grad():  # spread the embeddings so every term of the expansion matters
        for parameter in model.parameters():
            parameter.mul_(torch.randn_like(parameter).abs() * 3 + 1)
    sampler = build_sampler("ns-kge", {"positive_weight": 1.5, "negative_weight": 0.3}, graph, model, 20, seed=0)
    positives = graph.train

    closed = sampler.whole_graph_loss(positives, model, None)
    closed.backward()
    closed_gradients = [p.grad.to_dense().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    expected = brute_force(model, positives, 1.5, 0.3, fitted_scores(name, SHARED["gamma"]))
    expected.backward()
    expected_gradients = [p.grad.to_dense() for p in model.parameters()]

    assert closed.item() == pytest.approx(expected.item(), rel=1e-9)
    for got, want in zip(closed_gradients, expected_gradients):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in closed_gradients)


def test_row_weights_make_a_weighted_mean():
    graph = tiny_graph()
    torch.manual_seed(1)
    model = build_model("DistMult", graph, SHARED).double()
    sampler = build_sampler("ns-kge", {}, graph, model, 20, seed=0)
    per_row = torch.stack([sampler.whole_graph_loss(graph.train[i : i + 1], model, None) for i in range(6)])
    weights = torch.arange(1.0, 7.0, dtype=torch.float64)
    got = sampler.whole_graph_loss(graph.train, model, weights)
    assert got.item() == pytest.approx(((weights * per_row).sum() / weights.sum()).item(), rel=1e-10)


def test_training_step_uses_the_whole_graph_loss_and_draws_nothing():
    graph = tiny_graph()
    torch.manual_seed(2)
    model = build_model("ComplEx", graph, {**SHARED, "regularization": 0.01})
    sampler = build_sampler("ns-kge", {}, graph, model, 20, seed=0)
    assert not sampler.draws_negatives and sampler.sample(graph.train, model, 0).ids.shape == (6, 0)
    assert list(sampler.parameters()) == []  # the KGC model's parameters stay in the model's group
    loss = step_loss(model, sampler, NegativeSamplingLoss(), graph.train, step=0)
    expected = sampler.whole_graph_loss(graph.train, model, None) + model.regularization(graph.train)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(("name", "options", "message"), [
    ("RotatE", {}, "RotatE has none"),
    ("PairRE", {}, "PairRE has none"),
    ("TransE", {"p": 1}, "TransE needs train.transe.p: 2"),
])
def test_models_without_a_closed_form_are_refused(name, options, message):
    graph = tiny_graph()
    model = build_model(name, graph, SHARED, options)
    with pytest.raises(ConfigError, match=f"closed forms for DistMult, ComplEx and TransE only; {message}"):
        build_sampler("ns-kge", {}, graph, model, 20, seed=0)


def test_options_are_checked():
    graph = tiny_graph()
    model = build_model("DistMult", graph, SHARED)
    with pytest.raises(ConfigError, match="sampler.ns-kge.negative_weight must be a positive number"):
        build_sampler("ns-kge", {"negative_weight": 0}, graph, model, 20, seed=0)
    with pytest.raises(ConfigError, match="sampler.ns-kge: .*unexpected keyword argument 'c0'"):
        build_sampler("ns-kge", {"c0": 1}, graph, model, 20, seed=0)
