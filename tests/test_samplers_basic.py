"""Uniform and Bernoulli samplers, and the known-positive index: shapes, seeds, state,
exclusion of TRAIN triples, Bernoulli probabilities by hand."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.samplers import SAMPLERS
from pipeline.samplers.bernoulli import BernoulliSampler, head_corruption_probabilities
from pipeline.samplers.known_positives import KnownPositives
from pipeline.samplers.uniform import UniformSampler


def graph_of(train, num_entities=6, num_relations=3) -> KnowledgeGraph:
    train = torch.tensor(train, dtype=torch.long).reshape(-1, 3)
    return KnowledgeGraph(num_entities, num_relations, train, train[:1], train[:1])


def test_known_positives_contains_broadcasts():
    known = KnownPositives(torch.tensor([[0, 1, 2], [3, 0, 4], [0, 1, 2]]), num_entities=5, num_relations=2)
    heads = torch.tensor([[0], [3]])
    tails = torch.tensor([[2, 4], [2, 4]])
    expected = torch.tensor([[True, False], [False, False]])  # relation 1 everywhere
    assert torch.equal(known.contains(heads, torch.tensor(1), tails), expected)
    assert torch.equal(known.contains(torch.tensor([3, 4]), torch.tensor([0, 0]), torch.tensor([4, 4])), torch.tensor([True, False]))
    empty = KnownPositives(torch.zeros((0, 3), dtype=torch.long), 5, 2)
    assert not empty.contains(torch.tensor([0]), torch.tensor([0]), torch.tensor([0])).any()


def test_corruptions_known_uses_the_right_side():
    known = KnownPositives(torch.tensor([[0, 0, 1], [2, 0, 1]]), num_entities=4, num_relations=1)
    positives = torch.tensor([[0, 0, 1], [0, 0, 1]])
    candidates = torch.tensor([[2, 3], [2, 1]])
    result = known.corruptions_known(positives, candidates, torch.tensor([True, False]))
    # row 0 replaces the head: (2,0,1) known, (3,0,1) not; row 1 the tail: (0,0,2) not, (0,0,1) known
    assert torch.equal(result, torch.tensor([[True, False], [False, True]]))


def test_uniform_shapes_range_seed_and_coin():
    graph = graph_of([[0, 0, 1]] * 4, num_entities=50)
    positives = graph.train.repeat(500, 1)
    first = UniformSampler(graph, 7, seed=3).sample(positives, model=None, step=0)
    again = UniformSampler(graph, 7, seed=3).sample(positives, model=None, step=0)
    other = UniformSampler(graph, 7, seed=4).sample(positives, model=None, step=0)
    assert first.ids.shape == (2000, 7) and first.ids.dtype == torch.long and first.representations is None
    assert first.ids.min() >= 0 and first.ids.max() < 50
    assert torch.equal(first.ids, again.ids) and torch.equal(first.corrupt_head, again.corrupt_head)
    assert not torch.equal(first.ids, other.ids)
    assert 0.45 < first.corrupt_head.float().mean().item() < 0.55
    assert torch.equal(first.as_model_input(), first.ids)


def test_sampler_state_dict_restores_the_generator():
    graph = graph_of([[0, 0, 1]], num_entities=30)
    sampler = SAMPLERS.get("uniform")(graph, 5, seed=1)
    sampler.sample(graph.train, None, 0)
    state = sampler.state_dict()
    expected = sampler.sample(graph.train.repeat(10, 1), None, 1)
    restored = UniformSampler(graph, 5, seed=999)
    restored.load_state_dict(state)
    got = restored.sample(graph.train.repeat(10, 1), None, 1)
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.corrupt_head, expected.corrupt_head)


@pytest.mark.parametrize("name", ["uniform", "bernoulli"])
def test_exclude_positives_leaves_no_known_triple(name):
    # (0, 0, ?) has tails 1..4 known and (?, 0, 0) heads 1..4: 4 of 6 draws hit a known triple.
    train = [[0, 0, t] for t in range(1, 5)] + [[h, 0, 0] for h in range(1, 5)]
    graph = graph_of(train, num_entities=6, num_relations=1)
    positives = torch.tensor([[0, 0, 1], [1, 0, 0]]).repeat(200, 1)
    plain = SAMPLERS.get(name)(graph, 10, seed=0).sample(positives, None, 0)
    known = KnownPositives(graph.train, 6, 1)
    assert known.corruptions_known(positives, plain.ids, plain.corrupt_head).any()  # the test can fail
    excluded = SAMPLERS.get(name)(graph, 10, seed=0, exclude_positives=True).sample(positives, None, 0)
    assert not known.corruptions_known(positives, excluded.ids, excluded.corrupt_head).any()


def test_exclude_positives_must_be_boolean():
    with pytest.raises(ConfigError, match="sampler.uniform.exclude_positives must be true or false"):
        UniformSampler(graph_of([[0, 0, 1]]), 3, 0, exclude_positives="yes")
    with pytest.raises(ConfigError, match="sampler.bernoulli.exclude_positives"):
        BernoulliSampler(graph_of([[0, 0, 1]]), 3, 0, exclude_positives=1)


def test_bernoulli_probabilities_hand_computed():
    train = [
        # relation 0, 1-to-N: head 0 with tails 1, 2, 3 -> tph 3, hpt 1 -> p = 3/4
        [0, 0, 1], [0, 0, 2], [0, 0, 3],
        # relation 1, N-to-1: heads 1, 2 into tail 0, and head 3 into 4 -> tph 1, hpt 3/2 -> p = 1/(1+1.5)
        [1, 1, 0], [2, 1, 0], [3, 1, 4],
    ]  # relation 2 absent -> 0.5
    probabilities = head_corruption_probabilities(torch.tensor(train), num_relations=3)
    assert torch.allclose(probabilities, torch.tensor([0.75, 0.4, 0.5]))


def test_bernoulli_sampler_follows_the_relation_probability():
    train = [[0, 0, t] for t in range(1, 10)] + [[h, 1, 0] for h in range(1, 10)]
    graph = graph_of(train, num_entities=10, num_relations=2)  # relation 0: p = 0.9, relation 1: p = 0.1
    positives = torch.tensor([[0, 0, 1], [1, 1, 0]]).repeat(2000, 1)
    sample = BernoulliSampler(graph, 2, seed=5).sample(positives, None, 0)
    rate = [sample.corrupt_head[positives[:, 1] == r].float().mean().item() for r in (0, 1)]
    assert 0.87 < rate[0] < 0.93 and 0.07 < rate[1] < 0.13


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown sampler 'random'; valid: .*bernoulli.*uniform"):
        SAMPLERS.get("random")


def test_answers_among_a_shared_presample_equals_the_per_pair_lookup():
    generator = torch.Generator().manual_seed(3)
    entities, relations = 30, 3
    triples = torch.stack([torch.randint(entities, (400,), generator=generator), torch.randint(relations, (400,), generator=generator),
                           torch.randint(entities, (400,), generator=generator)], 1)
    known = KnownPositives(triples, entities, relations)
    positives = torch.cat([triples[:40], torch.tensor([[29, 2, 29]])])  # and one query without any answer
    candidates = torch.randperm(entities, generator=generator)[:17]
    corrupt_head = torch.rand(len(positives), generator=generator) < 0.5
    fast = known.answers_among(positives, candidates, corrupt_head)
    assert fast.any() and not fast.all()
    assert torch.equal(fast, known.corruptions_known(positives, candidates.expand(len(positives), -1), corrupt_head))
    empty = KnownPositives(torch.zeros((0, 3), dtype=torch.long), entities, relations)
    assert not empty.answers_among(positives, candidates, corrupt_head).any()
