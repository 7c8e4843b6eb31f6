"""benchmarks/negative_quality.py: the figures it prints about a sampler's negatives."""
import sys
from pathlib import Path

import torch

from pipeline.graph import KnowledgeGraph
from pipeline.models import MODELS
from pipeline.samplers import NegativeSampler, Negatives

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import negative_quality  # noqa: E402


class HeldOutTails(NegativeSampler):
    """Always proposes the TEST tail of the query (a false negative) and then entity 0."""

    def __init__(self, graph: KnowledgeGraph, answers: dict):
        super().__init__(graph, 2, 0)
        self.answers = answers

    def sample(self, positives, model, step):
        tails = torch.tensor([[self.answers[(int(h), int(r))], 0] for h, r, _ in positives.tolist()])
        return Negatives(tails, torch.zeros(len(positives), dtype=torch.bool))


def test_counts_false_negatives_and_hardness():
    train = torch.tensor([[1, 0, 2], [3, 0, 4], [1, 1, 0]])
    test = torch.tensor([[1, 0, 5], [3, 0, 6]])
    graph = KnowledgeGraph(8, 2, train, test[:0], test)
    torch.manual_seed(0)
    model = MODELS.get("TransE")(8, 2, 4, 3.0)
    sampler = HeldOutTails(graph, {(1, 0): 5, (3, 0): 6})
    batch = train[:2]
    figures = negative_quality.describe(sampler, model, graph, [batch], 0)
    assert figures["false negatives (valid/test) %"] == 50.0  # the test tails; entity 0 is no known answer
    assert figures["TRAIN triples %"] == 0.0
    every = model.score_all(batch, "tail")
    chosen = model.score_negatives(batch, torch.tensor([[5, 0], [6, 0]]), torch.zeros(2, dtype=torch.bool))
    expected = (every.unsqueeze(1) < chosen.unsqueeze(2)).float().mean(2).mean()
    assert abs(figures["hardness"] - expected.item()) < 1e-6
    assert figures["distinct per batch"] == 3 / 4
