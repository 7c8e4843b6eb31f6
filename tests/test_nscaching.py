"""NSCaching: after updates the caches hold higher-scoring entities than a uniform set, no
entry is ever a known positive when filtering, negatives come from the caches, the lazy
schedule, checkpointed state, options."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.models import build_model
from pipeline.samplers import build_sampler
from pipeline.samplers.known_positives import KnownPositives
from pipeline.samplers.nscaching import NSCachingSampler


def dense_graph(num_entities=40, seed=0) -> KnowledgeGraph:
    """Few queries with many answers each, so uniform candidates often hit known triples."""
    generator = torch.Generator().manual_seed(seed)
    triples = []
    for h in range(4):
        for r in range(2):
            tails = torch.randperm(num_entities, generator=generator)[:15]
            triples += [[h, r, int(t)] for t in tails]
    train = torch.tensor(triples)
    return KnowledgeGraph(num_entities, 2, train, train[:2], train[:2])


def model_for(graph: KnowledgeGraph, name: str = "DistMult"):
    """A model whose scores spread over a few units, as a trained model's do (softmax of
    the initial near-zero scores is nearly uniform)."""
    torch.manual_seed(0)
    model = build_model(name, graph, {"dim": 8, "gamma": 3.0, "regularization": 0.0})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4.0 if name == "DistMult" else 3.0)
    return model


def cache_scores(sampler: NSCachingSampler, model, positives: torch.Tensor, head_side: bool) -> torch.Tensor:
    rows = sampler.cache_rows(positives, head_side)
    with torch.no_grad():
        return model.score_negatives(positives, sampler.cache(head_side)[rows], torch.full((len(positives),), head_side))


@pytest.mark.parametrize("model_name", ["DistMult", "TransE"])
def test_updates_fill_the_cache_with_high_scoring_entities(model_name):
    graph = dense_graph()
    model = model_for(graph, model_name)
    sampler = NSCachingSampler(graph, 5, seed=0, cache_size=6, candidates=20)
    positives = graph.train
    before = cache_scores(sampler, model, positives, head_side=False).mean()
    for step in range(30):
        sampler.sample(positives, model, step)
    after = cache_scores(sampler, model, positives, head_side=False)
    generator = torch.Generator().manual_seed(1)
    uniform_ids = torch.randint(graph.num_entities, after.shape, generator=generator)
    with torch.no_grad():
        uniform = model.score_negatives(positives, uniform_ids, torch.zeros(len(positives), dtype=torch.bool))
    assert after.mean() > uniform.mean() + 0.5 * uniform.std()
    assert after.mean() > before + 0.5 * uniform.std()
    # both caches were refreshed
    assert cache_scores(sampler, model, positives, head_side=True).mean() > uniform.mean()


def test_cache_entries_are_never_known_positives_when_filtering():
    graph = dense_graph()
    model = model_for(graph)
    with torch.no_grad():  # make true triples the highest-scoring candidates: the update would pick them
        model.entities.weight[:, :] = model.entities.weight.abs() + 0.5
        model.relations.weight[:, :] = model.relations.weight.abs() + 0.5
        model.entities.weight[torch.unique(graph.train[:, 2])] *= 3
    known = KnownPositives(graph.train, graph.num_entities, graph.num_relations)

    def known_entries(sampler: NSCachingSampler) -> int:
        count = 0
        for head_side in (True, False):
            keys = sampler.head_keys if head_side else sampler.tail_keys
            triples = sampler.representatives(keys, head_side)
            count += int(known.corruptions_known(triples, sampler.cache(head_side), torch.full((len(keys),), head_side)).sum())
        return count

    unfiltered = NSCachingSampler(graph, 5, seed=0, cache_size=10, candidates=20, exclude_positives=False)
    filtered = NSCachingSampler(graph, 5, seed=0, cache_size=10, candidates=20)
    assert known_entries(filtered) == 0
    for step in range(20):
        unfiltered.sample(graph.train, model, step)
        negatives = filtered.sample(graph.train, model, step)
        assert known_entries(filtered) == 0
        assert not known.corruptions_known(graph.train, negatives.ids, negatives.corrupt_head).any()
    assert known_entries(unfiltered) > 20  # the test can fail: unfiltered caches collect true triples


def test_negatives_come_from_the_row_cache():
    graph = dense_graph()
    model = model_for(graph)
    sampler = NSCachingSampler(graph, 7, seed=2, cache_size=4, update_every_epochs=1000)
    positives = graph.train[:30]
    negatives = sampler.sample(positives, model, step=5)  # epoch 0: updated after sampling
    sampler2 = NSCachingSampler(graph, 7, seed=2, cache_size=4, update_every_epochs=1000)
    for b in range(len(positives)):
        head = bool(negatives.corrupt_head[b])
        row = sampler2.cache_rows(positives[b : b + 1], head)
        assert set(negatives.ids[b].tolist()) <= set(sampler2.cache(head)[row].flatten().tolist())


def test_lazy_update_only_in_every_kth_epoch():
    graph = dense_graph()  # 120 triples, batch 60: two steps per epoch
    model = model_for(graph)
    sampler = NSCachingSampler(graph, 3, seed=0, update_every_epochs=3)
    positives = graph.train[:60]
    snapshots = []
    for step in range(8):  # epochs 0 0 1 1 2 2 3 3
        before = sampler.tail_cache.clone()
        sampler.sample(positives, model, step)
        snapshots.append(not torch.equal(before, sampler.tail_cache))
    assert snapshots == [True, True, False, False, False, False, True, True]


def test_state_dict_restores_caches_and_generator():
    graph = dense_graph()
    model = model_for(graph)
    sampler = build_sampler("nscaching", {"cache_size": 5, "candidates": 5}, graph, model, 4, seed=0)
    sampler.sample(graph.train, model, 0)
    state = copy.deepcopy(sampler.state_dict())  # the caches change in place while sampling
    assert {"head_cache", "tail_cache", "_extra_state"} == set(state)
    expected = sampler.sample(graph.train, model, 1)
    restored = build_sampler("nscaching", {"cache_size": 5, "candidates": 5}, graph, model, 4, seed=123)
    restored.load_state_dict(state)
    got = restored.sample(graph.train, model, 1)
    assert torch.equal(got.ids, expected.ids) and torch.equal(restored.tail_cache, sampler.tail_cache)


@pytest.mark.parametrize(("options", "message"), [
    ({"cache_size": 0}, "sampler.nscaching.cache_size must be a positive integer"),
    ({"candidates": 1.5}, "sampler.nscaching.candidates must be a positive integer"),
    ({"head_probability": "tph"}, "sampler.nscaching.head_probability must be one of bernoulli, uniform"),
    ({"exclude_positives": 1}, "sampler.nscaching.exclude_positives must be true or false"),
])
def test_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        build_sampler("nscaching", options, dense_graph(), None, 4, seed=0)
