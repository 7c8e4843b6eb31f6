"""SANS: every structure-aware negative lies within k hops of the kept entity (checked
against a breadth-first search), the random-walk neighbourhoods are subsets of the exact
ones and approach them as walks grow, the uniform mix, positive exclusion, options."""
from __future__ import annotations

from collections import deque

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.samplers import SAMPLERS, build_sampler
from pipeline.samplers.known_positives import KnownPositives
from pipeline.samplers.sans import SANSSampler


def random_graph(num_entities=60, num_triples=70, seed=0) -> KnowledgeGraph:
    generator = torch.Generator().manual_seed(seed)
    train = torch.stack([
        torch.randint(num_entities, (num_triples,), generator=generator),
        torch.randint(3, (num_triples,), generator=generator),
        torch.randint(num_entities, (num_triples,), generator=generator),
    ], 1)
    return KnowledgeGraph(num_entities, 3, train, train[:2], train[:2])


def hop_distances(graph: KnowledgeGraph, source: int) -> dict[int, int]:
    """Breadth-first hop distance from ``source`` in the undirected TRAIN graph."""
    adjacency: dict[int, set[int]] = {}
    for h, _, t in graph.train.tolist():
        adjacency.setdefault(h, set()).add(t)
        adjacency.setdefault(t, set()).add(h)
    distance, queue = {source: 0}, deque([source])
    while queue:
        node = queue.popleft()
        for neighbour in adjacency.get(node, ()):
            if neighbour not in distance:
                distance[neighbour] = distance[node] + 1
                queue.append(neighbour)
    return distance


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_exact_neighbourhoods_are_the_k_hop_sets(hops):
    graph = random_graph()
    sampler = SANSSampler(graph, 10, seed=0, hops=hops)
    for entity in range(graph.num_entities):
        expected = sorted(e for e, d in hop_distances(graph, entity).items() if 1 <= d <= hops)
        assert sampler.neighbourhood(entity).tolist() == expected


@pytest.mark.parametrize("variant", ["exact", "random_walk"])
def test_structure_aware_negatives_lie_within_k_hops(variant):
    graph = random_graph(seed=1)
    options = {"variant": variant, "hops": 2, "structure_fraction": 1.0, "exclude_positives": False}  # filtering: below
    sampler = build_sampler("sans", options, graph, None, 8, seed=3)
    positives = graph.train.repeat(20, 1)
    negatives = sampler.sample(positives, None, 0)
    kept = torch.where(negatives.corrupt_head, positives[:, 2], positives[:, 0])
    checked = 0
    for entity, row in zip(kept.tolist(), negatives.ids.tolist()):
        distance = hop_distances(graph, entity)
        if len(distance) == 1:  # isolated: uniform fallback
            continue
        assert all(1 <= distance.get(e, 99) <= 2 for e in row), (entity, row)
        checked += 1
    assert checked > 1000
    # uniform negatives would fail this: most entities are farther than 2 hops
    uniform = SAMPLERS.get("uniform")(graph, 8, seed=3).sample(positives, None, 0)
    far = sum(hop_distances(graph, e).get(n, 99) > 2 for e, row in zip(kept.tolist(), uniform.ids.tolist()) for n in row)
    assert far > 0.3 * uniform.ids.numel()


def test_random_walk_neighbourhoods_approximate_the_exact_ones():
    graph = random_graph(seed=2)
    exact = SANSSampler(graph, 10, seed=0, hops=2)

    def recall(num_walks: int) -> float:
        walks = SANSSampler(graph, 10, seed=0, hops=2, variant="random_walk", num_walks=num_walks)
        found = total = 0
        for entity in range(graph.num_entities):
            approximate, true = set(walks.neighbourhood(entity).tolist()), set(exact.neighbourhood(entity).tolist())
            assert approximate <= true  # a walk of k steps never leaves N_k
            found, total = found + len(approximate), total + len(true)
        return found / total

    few, many = recall(2), recall(400)
    assert few < 0.9 and many > 0.99 and many > few


def test_random_walk_draws_follow_visit_counts():
    # a star: centre 0 with leaves 1..4, plus leaf 1 also linked to 5. A 2-step walk from 5
    # visits 1 at step one, then 0 or 5 (the start, not counted): visits 1 : 0 = 2 : 1.
    train = torch.tensor([[0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 0, 4], [1, 0, 5]])
    graph = KnowledgeGraph(6, 1, train, train[:1], train[:1])
    sampler = SANSSampler(graph, 1000, seed=0, hops=2, variant="random_walk", num_walks=2000, structure_fraction=1.0)
    draws = sampler.draw(torch.full((20000,), 5), torch.ones(20000, dtype=torch.bool))
    share_of_1 = (draws == 1).float().mean().item()
    assert set(draws.unique().tolist()) == {0, 1}
    assert 0.62 < share_of_1 < 0.72


def test_mixing_with_uniform_and_isolated_entities():
    graph = random_graph(seed=4, num_entities=200, num_triples=60)  # many isolated entities
    sampler = SANSSampler(graph, 10, seed=0, hops=1, structure_fraction=0.3, exclude_positives=False)
    assert sampler.structural == 3
    positives = graph.train.repeat(50, 1)
    negatives = sampler.sample(positives, None, 0)
    kept = torch.where(negatives.corrupt_head, positives[:, 2], positives[:, 0])
    inside = torch.tensor([[n in set(sampler.neighbourhood(e).tolist()) for n in row] for e, row in zip(kept.tolist(), negatives.ids.tolist())])
    assert inside[:, :3].all()  # every kept entity of a positive has a neighbour
    assert inside[:, 3:].float().mean() < 0.2  # the uniform part mostly lands outside the 1-hop set
    lonely = torch.tensor([[150 + i, 0, 150 + i] for i in range(5)])  # self-loop only: isolated
    assert sampler.sample(lonely, None, 0).ids.shape == (5, 10)


def test_exclude_positives_and_state():
    train = torch.tensor([[0, 0, t] for t in range(1, 5)] + [[h, 0, 0] for h in range(1, 5)] + [[5, 0, 1]])
    graph = KnowledgeGraph(6, 1, train, train[:1], train[:1])
    positives = torch.tensor([[0, 0, 1], [1, 0, 0]]).repeat(200, 1)
    known = KnownPositives(graph.train, 6, 1)
    plain = SANSSampler(graph, 6, seed=0, structure_fraction=1.0, exclude_positives=False).sample(positives, None, 0)
    assert known.corruptions_known(positives, plain.ids, plain.corrupt_head).any()
    sampler = SANSSampler(graph, 6, seed=0, structure_fraction=1.0, exclude_positives=True)
    excluded = sampler.sample(positives, None, 0)
    assert not known.corruptions_known(positives, excluded.ids, excluded.corrupt_head).any()
    state = sampler.state_dict()
    assert set(state) == {"_extra_state"}  # neighbourhoods are rebuilt from the graph
    expected = sampler.sample(positives, None, 1)
    restored = SANSSampler(graph, 6, seed=99, structure_fraction=1.0, exclude_positives=True)
    restored.load_state_dict(state)
    assert torch.equal(restored.sample(positives, None, 1).ids, expected.ids)


@pytest.mark.parametrize(("options", "message"), [
    ({"hops": 0}, "sampler.sans.hops must be a positive integer"),
    ({"variant": "bfs"}, "sampler.sans.variant must be one of exact, random_walk"),
    ({"num_walks": 0}, "sampler.sans.num_walks must be a positive integer"),
    ({"structure_fraction": 1.5}, r"sampler.sans.structure_fraction must be a number in \[0, 1\]"),
    ({"exclude_positives": "no"}, "sampler.sans.exclude_positives must be true or false"),
])
def test_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        build_sampler("sans", options, random_graph(), None, 4, seed=0)


def test_a_neighbourhood_of_known_answers_only_falls_back_to_uniform():
    # leaf 1's 2-hop set is {0, 2, 3}; (1, 0, ?) knows 0, 2 and 3 as answers (0 -> 2, 0 -> 3 via relation 1)
    train = torch.tensor([[1, 0, 0], [1, 0, 2], [1, 0, 3], [0, 1, 2], [0, 1, 3], [4, 1, 5], [5, 1, 6], [6, 1, 7]])
    graph = KnowledgeGraph(8, 2, train, train[:1], train[:1])
    sampler = SANSSampler(graph, 5, seed=0, structure_fraction=1.0)
    assert set(sampler.neighbourhood(1).tolist()) == {0, 2, 3}
    positives = torch.tensor([[1, 0, 0]]).repeat(50, 1)
    negatives = sampler.sample(positives, None, 0)
    tails = negatives.ids[~negatives.corrupt_head]
    assert len(tails) and set(tails.unique().tolist()) <= {1, 4, 5, 6, 7}  # uniform fallback, never a known answer
