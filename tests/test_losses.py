"""Losses: the vectorised losses against plain per-element reference implementations,
hand-computed values, subsampling weights, and the registry."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.losses import LOSSES, MarginRankingLoss, NegativeSamplingLoss, SubsamplingWeights, build_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_nssa(positive, negative, weights, alpha, self_adversarial):
    """Plain-Python RotatE loss, one row at a time."""
    positive_terms, negative_terms = [], []
    for b, row in enumerate(negative):
        if self_adversarial:
            exps = [math.exp(alpha * s) for s in row]
            w = [x / sum(exps) for x in exps]
        else:
            w = [1 / len(row)] * len(row)
        positive_terms.append(-log_sigmoid(positive[b]))
        negative_terms.append(-sum(wi * log_sigmoid(-s) for wi, s in zip(w, row)))
    if weights is None:
        weights = [1.0] * len(positive)
    mean = lambda terms: sum(x * y for x, y in zip(weights, terms)) / sum(weights)  # noqa: E731
    return (mean(positive_terms) + mean(negative_terms)) / 2


def reference_margin(positive, negative, weights, margin):
    per_row = [sum(max(0.0, margin - positive[b] + s) for s in row) / len(row) for b, row in enumerate(negative)]
    if weights is None:
        return sum(per_row) / len(per_row)
    return sum(w * x for w, x in zip(weights, per_row)) / sum(weights)


@pytest.fixture
def scores():
    generator = torch.Generator().manual_seed(0)
    positive = torch.randn(7, generator=generator, dtype=torch.float64) * 3
    negative = torch.randn(7, 5, generator=generator, dtype=torch.float64) * 3
    negative[2, 1] = negative[2, 3]  # a tie
    weights = torch.rand(7, generator=generator, dtype=torch.float64) + 0.1
    return positive, negative, weights


@pytest.mark.parametrize("self_adversarial", [True, False])
@pytest.mark.parametrize("use_weights", [True, False])
def test_nssa_equals_reference(scores, self_adversarial, use_weights):
    positive, negative, weights = scores
    weights = weights if use_weights else None
    loss = NegativeSamplingLoss(0.5, self_adversarial)(positive, negative, weights)
    expected = reference_nssa(positive.tolist(), negative.tolist(), None if weights is None else weights.tolist(), 0.5, self_adversarial)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("use_weights", [True, False])
def test_margin_equals_reference(scores, use_weights):
    positive, negative, weights = scores
    weights = weights if use_weights else None
    loss = MarginRankingLoss(3.0)(positive, negative, weights)
    expected = reference_margin(positive.tolist(), negative.tolist(), None if weights is None else weights.tolist(), 3.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_nssa_hand_computed_and_weights_detached():
    positive = torch.tensor([0.0], requires_grad=True)
    negative = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = NegativeSamplingLoss(0.5, True)(positive, negative)
    # -log sigmoid(0) = log 2 for both halves: (log 2 + (0.5 + 0.5) log 2) / 2 = log 2
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # d/ds_neg of -(w log sigmoid(-s)) with w detached = w * sigmoid(s) / 2 = 0.5 * 0.5 / 2
    assert torch.allclose(negative.grad, torch.tensor([[0.125, 0.125]]))


def test_distance_convention_gamma_in_score():
    # TransE-style scores s = gamma - d: the loss equals -log sig(gamma - d_pos) - ... in distance form.
    gamma, d_pos, d_neg = 3.0, 1.0, torch.tensor([[2.0, 5.0]])
    loss = NegativeSamplingLoss(0.5, False)(torch.tensor([gamma - d_pos]), gamma - d_neg)
    expected = (-log_sigmoid(gamma - d_pos) - 0.5 * (log_sigmoid(2.0 - gamma) + log_sigmoid(5.0 - gamma))) / 2
    assert loss.item() == pytest.approx(expected)
    assert MarginRankingLoss(gamma)(torch.tensor([gamma - d_pos]), gamma - d_neg).item() == pytest.approx(
        (max(0, gamma + d_pos - 2.0) + max(0, gamma + d_pos - 5.0)) / 2
    )


def test_subsampling_weights_hand_computed():
    train = torch.tensor([[0, 0, 1], [0, 0, 2], [3, 0, 1], [0, 1, 1]])
    weights = SubsamplingWeights(train, num_entities=4, num_relations=2)
    # (0, 0, 1): count(h=0, r=0) = 2, count(t=1, r=0 inverse) = 2, plus 4 + 4 -> 1/sqrt(12)
    # (0, 1, 1): count(0, 1) = 1, count(1, 1^-1) = 1 -> 1/sqrt(10)
    # (2, 1, 3): unseen -> 1/sqrt(8)
    result = weights(torch.tensor([[0, 0, 1], [0, 1, 1], [2, 1, 3]]))
    assert torch.allclose(result, torch.tensor([12, 10, 8], dtype=torch.float32).rsqrt())


def test_build_loss_and_unknown_name():
    assert isinstance(build_loss("margin", 2.0, 0.5, True), MarginRankingLoss)
    assert build_loss("margin", 2.0, 0.5, True).margin == 2.0
    nssa = build_loss("NSSA", 2.0, 0.7, False)
    assert isinstance(nssa, NegativeSamplingLoss) and nssa.adversarial_temperature == 0.7 and not nssa.self_adversarial
    with pytest.raises(ConfigError, match="unknown loss 'hinge'; valid: margin, nssa"):
        build_loss("hinge", 1.0, 0.5, True)
    assert LOSSES.names() == ["margin", "nssa"]


def plain_score(name, model, h, r, t):
    """The model's score of one triple from its textbook formula, in plain Python."""
    e, rel = model.entities.weight.tolist(), model.relations.weight.tolist()
    if name == "TransE":
        return 3.0 - math.sqrt(sum((a + b - c) ** 2 for a, b, c in zip(e[h], rel[r], e[t])))
    if name == "DistMult":
        return sum(a * b * c for a, b, c in zip(e[h], rel[r], e[t]))
    half = len(e[h]) // 2
    as_complex = lambda row: [complex(x, y) for x, y in zip(row[:half], row[half:])]  # noqa: E731
    return sum(a * b * c.conjugate() for a, b, c in zip(as_complex(e[h]), as_complex(rel[r]), as_complex(e[t]))).real


@pytest.mark.parametrize("name", ["TransE", "DistMult", "ComplEx"])
def test_training_step_loss_fast_path_equals_plain_reference(name):
    from pipeline.graph import KnowledgeGraph
    from pipeline.models import build_model

    generator = torch.Generator().manual_seed(2)
    train = torch.stack([torch.randint(20, (30,), generator=generator), torch.randint(3, (30,), generator=generator), torch.randint(20, (30,), generator=generator)], 1)
    graph = KnowledgeGraph(20, 3, train, train[:2], train[:2])
    torch.manual_seed(0)
    model = build_model(name, graph, {"dim": 6, "gamma": 3.0, "regularization": 0.0}).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(20)
    positives = train[:8]
    negatives = torch.randint(20, (8, 5), generator=generator)
    negatives[0, 1] = negatives[0, 2]  # tied negatives
    corrupt_head = torch.rand(8, generator=generator) < 0.5
    weights = SubsamplingWeights(train, 20, 3)(positives).double()
    positive, negative = model.score_batch(positives, negatives, corrupt_head)
    fast = NegativeSamplingLoss(0.5, True)(positive, negative, weights)

    plain_positive = [plain_score(name, model, h, r, t) for h, r, t in positives.tolist()]
    plain_negative = [
        [plain_score(name, model, *((e, r, t) if head else (h, r, e))) for e in row]
        for (h, r, t), row, head in zip(positives.tolist(), negatives.tolist(), corrupt_head.tolist())
    ]
    expected = reference_nssa(plain_positive, plain_negative, weights.tolist(), 0.5, True)
    assert fast.item() == pytest.approx(expected, rel=1e-10)
