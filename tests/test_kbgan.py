"""KBGAN: REINFORCE updates of the generator raise the probability of the candidates the
discriminator rewards; negatives come from the candidates; the generator stays out of the
KGC model and trains in the sampler's parameter group; baseline; checkpoint state; a
pre-trained generator."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.losses import MarginRankingLoss
from pipeline.models import build_model
from pipeline.samplers import build_sampler
from pipeline.samplers.kbgan import KBGANSampler
from pipeline.training import GradientDensifier, TrainSettings, build_optimizer, step_loss, write_checkpoint

SHARED = {"dim": 8, "gamma": 3.0, "regularization": 0.0}


def small_graph(num_entities=30) -> KnowledgeGraph:
    train = torch.tensor([[h, h % 2, (h * 7 + 3) % num_entities] for h in range(num_entities)])
    return KnowledgeGraph(num_entities, 2, train, train[:2], train[:2])


def rigged_discriminator(graph: KnowledgeGraph, favourite: int):
    """A DistMult discriminator under which entity ``favourite`` is the most plausible
    corruption of every query (reward = its score), the others graded below it."""
    torch.manual_seed(0)
    model = build_model("DistMult", graph, SHARED)
    with torch.no_grad():
        model.relations.weight.fill_(1.0)
        model.entities.weight.copy_(torch.rand(graph.num_entities, 8) * 0.5)
        model.entities.weight[favourite] = 1.0
    return model.requires_grad_(False)


def generator_probabilities(sampler: KBGANSampler, positives: torch.Tensor, corrupt_head: torch.Tensor) -> torch.Tensor:
    """pi over ALL entities as candidates ``[B, E]``."""
    everything = torch.arange(sampler.num_entities).expand(len(positives), -1)
    with torch.no_grad():
        return torch.softmax(sampler.generator_model.score_negatives(positives, everything, corrupt_head) / sampler.temperature, -1)


def test_generator_update_raises_the_probability_of_high_reward_candidates():
    graph = small_graph()
    favourite = 0
    discriminator = rigged_discriminator(graph, favourite)
    sampler = KBGANSampler(graph, 4, seed=0, generator_dim=8, candidates=10, head_probability="uniform")
    optimizer = build_optimizer(discriminator, sampler, TrainSettings(steps=1, batch_size=30, lr=1e-3, sampler_lr=0.05, valid_every=1, patience=1, seed=0))
    densify = GradientDensifier(optimizer)
    positives = graph.train
    side = torch.zeros(len(positives), dtype=torch.bool)
    with torch.no_grad():
        rewards = discriminator.score_negatives(positives, torch.arange(graph.num_entities).expand(len(positives), -1), side)
    assert (rewards.argmax(1) == favourite).all()
    before = generator_probabilities(sampler, positives, side)
    expected_before = (before * rewards).sum(1).mean()
    for step in range(60):
        negatives = sampler.sample(positives, discriminator, step)
        scores = discriminator.score_negatives(positives, negatives.ids, negatives.corrupt_head)
        loss = sampler.auxiliary_loss(positives, negatives, scores, discriminator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        densify()
        optimizer.step()
    after = generator_probabilities(sampler, positives, side)
    assert after[:, favourite].mean() > 3 * before[:, favourite].mean()
    assert (after * rewards).sum(1).mean() > expected_before  # expected reward under the policy rose


def test_negatives_are_candidates_drawn_by_the_policy():
    graph = small_graph()
    sampler = KBGANSampler(graph, 50, seed=1, candidates=3)
    negatives = sampler.sample(graph.train, None, 0)
    assert negatives.ids.shape == (30, 50) and sampler.pending.shape == (30, 50)
    assert all(len(set(row)) <= 3 for row in negatives.ids.tolist())  # only 3 candidates per row
    assert (sampler.pending <= 0).all() and sampler.pending.requires_grad


def test_generator_parameters_stay_out_of_the_kgc_model_and_train_in_the_sampler_group():
    graph = small_graph()
    torch.manual_seed(3)
    model = build_model("TransE", graph, SHARED)
    sampler = build_sampler("kbgan", {"generator_dim": 8}, graph, model, 5, seed=0)
    model_ids = {id(p) for p in model.parameters()}
    generator_ids = {id(p) for p in sampler.generator_model.parameters()}
    assert generator_ids and not generator_ids & model_ids
    optimizer = build_optimizer(model, sampler, TrainSettings(steps=1, batch_size=30, lr=1e-3, sampler_lr=1e-4, valid_every=1, patience=1, seed=0))
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == generator_ids and optimizer.param_groups[1]["lr"] == 1e-4
    # one real training step: the KGC model gets the margin-loss gradient, the generator the REINFORCE one
    loss = step_loss(model, sampler, MarginRankingLoss(3.0), graph.train, step=0)
    loss.backward()
    assert all(p.grad is not None for p in sampler.generator_model.parameters())
    assert model.entities.weight.grad is not None


def test_baseline_is_a_moving_average_of_rewards():
    graph = small_graph()
    sampler = KBGANSampler(graph, 2, seed=0, generator_dim=4, baseline_decay=0.5)
    for rewards, expected in ((torch.full((30, 2), 4.0), 4.0), (torch.full((30, 2), 2.0), 3.0), (torch.full((30, 2), 0.0), 1.5)):
        negatives = sampler.sample(graph.train, None, 0)
        sampler.auxiliary_loss(graph.train, negatives, rewards, None)
        assert sampler.baseline.item() == pytest.approx(expected)
    with pytest.raises(RuntimeError, match="needs the log-probabilities"):
        sampler.auxiliary_loss(graph.train, negatives, rewards, None)


def test_state_dict_holds_the_generator_and_baseline(tmp_path):
    graph = small_graph()
    sampler = KBGANSampler(graph, 3, seed=0, generator_dim=4)
    negatives = sampler.sample(graph.train, None, 0)
    sampler.auxiliary_loss(graph.train, negatives, torch.ones(30, 3), None)
    state = copy.deepcopy(sampler.state_dict())
    assert {"generator_model.entities.weight", "generator_model.relations.weight", "baseline", "baseline_ready"} <= set(state)
    expected = sampler.sample(graph.train, None, 1)
    restored = KBGANSampler(graph, 3, seed=42, generator_dim=4)
    restored.load_state_dict(state)
    assert torch.equal(restored.sample(graph.train, None, 1).ids, expected.ids)


def test_pretrained_generator_is_loaded_from_a_checkpoint(tmp_path):
    graph = small_graph()
    torch.manual_seed(5)
    trained = build_model("ComplEx", graph, {**SHARED, "dim": 6})
    path = tmp_path / "best.pt"
    write_checkpoint(path, {"model_config": {"name": "ComplEx", "shared": {**SHARED, "dim": 6}, "options": {}}, "model": trained.state_dict()})
    sampler = build_sampler("kbgan", {"pretrained": str(path)}, graph, None, 3, seed=0)
    assert type(sampler.generator_model).__name__ == "ComplEx" and sampler.generator_model.training
    assert torch.equal(sampler.generator_model.entities.weight, trained.entities.weight)
    with pytest.raises(ConfigError, match="sampler.kbgan.pretrained: no checkpoint at"):
        build_sampler("kbgan", {"pretrained": str(tmp_path / "missing.pt")}, graph, None, 3, seed=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"candidates": 0}, r"sampler.kbgan.candidates must be an integer >= 1"),
    ({"temperature": 0}, r"sampler.kbgan.temperature must be a number"),
    ({"baseline_decay": 1.5}, r"sampler.kbgan.baseline_decay must be a number in \[0.0, 1.0\]"),
    ({"head_probability": "x"}, "sampler.kbgan.head_probability must be one of bernoulli, uniform"),
    ({"generator_model": "Nope"}, "unknown model 'Nope'"),
])
def test_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        build_sampler("kbgan", options, small_graph(), None, 3, seed=0)
