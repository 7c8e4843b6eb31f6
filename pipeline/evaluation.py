"""Filtered link-prediction evaluation: ranks of the true entities among all entities.

For a triple ``(h, r, t)`` the tail query ``(h, r, ?)`` scores every entity ``e`` as
``s_e = f(h, r, e)`` and the head query ``(?, r, t)`` as ``s_e = f(e, r, t)``; ``s*`` is the
true entity's score. Candidates are all entities except the known answers of the query
(the *filter*: every other ``e`` with the triple in train + valid + test). With ``C`` the
remaining candidates other than the true entity itself:

- optimistic rank  ``1 + |{e in C : s_e >  s*}|`` (ties resolved in the model's favour),
- pessimistic rank ``1 + |{e in C : s_e >= s*}|`` (ties resolved against it),
- realistic rank   ``(optimistic + pessimistic) / 2``, the expected rank under uniformly
  random tie-breaking (PyKEEN's definition); the headline figure.

From ranks ``r_1..r_n``: ``MR = mean(r)``, ``MRR = mean(1/r)``, ``Hits@k = mean(r <= k)``
(fractions in [0, 1]). "both" pools the ``N`` head and ``N`` tail queries (``2N`` ranks).

A NaN score cannot be ranked: :func:`rank_triples` raises :class:`NaNScoreError` rather
than let ``NaN`` comparisons (always false) produce rank 1. Infinite scores are ranked
exactly like any other value.

Implementation: per batch of ``B`` queries, one ``score_all`` call ``[B, E]``, one ``>`` and
one ``>=`` comparison pass against the true scores over all entities, minus the same counts
over the filtered entries, which come as a sparse ``(row, entity)`` list from
:class:`pipeline.filtering.FilterIndex` (no ``[B, E]`` mask, no loop over entities).
"""
from __future__ import annotations

import itertools
import weakref
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from pipeline.distributed import World, all_gather_rows
from pipeline.errors import PipelineError
from pipeline.filtering import FilterIndex
from pipeline.graph import CATEGORIES, KnowledgeGraph
from pipeline.models.base import KGCModel, Side

RANK_TYPES = ("realistic", "optimistic", "pessimistic")
DIRECTIONS = ("both", "head", "tail")
HITS_AT = (1, 3, 10)
METRICS = ("mr", "mrr", *(f"hits@{k}" for k in HITS_AT))
DEFAULT_BATCH_SIZE = 1024  # queries per score_all call: [1024, 15000] float32 scores = 61 MB


class NaNScoreError(PipelineError):
    """The model produced NaN scores, which have no rank."""


class Ranks(NamedTuple):
    """Filtered ranks ``[N]`` of ``N`` queries under the three tie policies."""

    optimistic: torch.Tensor  # [N] int64
    pessimistic: torch.Tensor  # [N] int64
    realistic: torch.Tensor  # [N] float64, (optimistic + pessimistic) / 2

    @classmethod
    def concat(cls, parts: list[Ranks]) -> Ranks:
        return cls(*(torch.cat(column) for column in zip(*parts)))


def _model_device(model: KGCModel) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _rank_batch(model: KGCModel, batch: torch.Tensor, filter_index: FilterIndex, side: Side) -> Ranks:
    """Filtered ranks of the ``side`` queries of ``batch [B, 3]`` (on the model's device)."""
    scores = model.score_all(batch, side)  # [B, E]
    expected = (len(batch), model.num_entities)
    if tuple(scores.shape) != expected:
        raise ValueError(f"{type(model).__name__}.score_all returned shape {tuple(scores.shape)}, expected {expected}")
    # The sum is NaN if any score is (or if +inf and -inf meet): a cheap test, then the exact one.
    if torch.isnan(scores.sum()) and torch.isnan(scores).any():
        row = int(torch.isnan(scores).any(dim=1).nonzero()[0])
        raise NaNScoreError(
            f"{type(model).__name__} scored the {side} query of triple {tuple(batch[row].tolist())} with NaN; "
            "NaN scores cannot be ranked (diverged or corrupt model?)"
        )
    targets = batch[:, 2] if side == "tail" else batch[:, 0]  # [B]
    true_scores = scores.gather(1, targets.unsqueeze(1))  # [B, 1]
    # A row count is at most E: a 16-bit accumulator suffices below 2^15 entities and makes
    # the boolean reductions several times faster on CPU than the default int64.
    count_dtype = torch.int16 if model.num_entities < 2**15 else torch.int32
    greater = (scores > true_scores).sum(dim=1, dtype=count_dtype).long()  # [B], over all entities
    not_less = (scores >= true_scores).sum(dim=1, dtype=count_dtype).long()  # [B], includes the true entity
    rows, entities = filter_index.known_answers(batch, side)  # [K], [K]
    others = entities != targets[rows]  # the true entity stays a candidate of its own query
    rows, entities = rows[others], entities[others]
    filtered_scores, filtered_true = scores[rows, entities], true_scores[rows, 0]  # [K'], [K']
    greater -= torch.zeros_like(greater).index_add_(0, rows, (filtered_scores > filtered_true).long())
    not_less -= torch.zeros_like(not_less).index_add_(0, rows, (filtered_scores >= filtered_true).long())
    optimistic = 1 + greater
    return Ranks(optimistic, not_less, (optimistic + not_less).double() / 2)


def rank_triples(
    model: KGCModel,
    triples: torch.Tensor,
    filter_index: FilterIndex,
    side: Side,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    world: World | None = None,
) -> Ranks:
    """Filtered ranks ``[N]`` of the true ``side`` entity of each triple ``[N, 3]``, on CPU.

    Runs on the model's device, in eval mode (the previous mode is restored) under
    ``torch.inference_mode``. ``filter_index`` holds the known triples to filter out.
    ``world`` with ``N`` ranks (the same model on each): rank ``r`` scores the ``r``-th
    contiguous block of the batches and every rank gets all ranks, in order. The batches are
    those of one process, so the ranks are exactly one process's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    world = world or World()
    device = _model_device(model)
    triples = triples.to(device, torch.long)
    filter_index = filter_index.to(device)
    starts = range(0, len(triples), batch_size)
    block = -(-len(starts) // world.size)  # batches per rank
    mine = starts[world.rank * block : (world.rank + 1) * block]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [
                Ranks(*(column.cpu() for column in _rank_batch(model, triples[start : start + batch_size], filter_index, side)))
                for start in tqdm(mine, desc=f"rank {side}s", unit="batch", disable=not progress, leave=False)
            ]
    finally:
        model.train(was_training)
    empty = torch.empty(0, dtype=torch.long)
    bounds = torch.stack([torch.cat([part.optimistic for part in parts] or [empty]),
                          torch.cat([part.pessimistic for part in parts] or [empty])], 1)  # [n_r, 2]
    if world.size > 1:
        bounds = torch.cat(all_gather_rows(world, bounds.to(world.device))).cpu()
    optimistic, pessimistic = bounds.unbind(1)
    return Ranks(optimistic, pessimistic, (optimistic + pessimistic).double() / 2)


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """MR, MRR and Hits@k of ranks ``[N]`` (N >= 1)."""
    ranks = ranks.double()
    metrics = {"mr": ranks.mean().item(), "mrr": ranks.reciprocal().mean().item()}
    metrics.update({f"hits@{k}": (ranks <= k).double().mean().item() for k in HITS_AT})
    return metrics


def _direction_metrics(head: torch.Tensor, tail: torch.Tensor) -> dict[str, dict[str, float]]:
    """``{direction: {metric: value}}`` from head-query and tail-query ranks ``[N]``."""
    return {"both": rank_metrics(torch.cat([head, tail])), "head": rank_metrics(head), "tail": rank_metrics(tail)}


_FILTER_CACHE: dict[int, FilterIndex] = {}


def graph_filter(graph: KnowledgeGraph) -> FilterIndex:
    """The filter (train + valid + test) of ``graph``, built once per graph object and cached
    while the graph lives (validation every k steps reuses it)."""
    key = id(graph)
    if key not in _FILTER_CACHE:
        _FILTER_CACHE[key] = FilterIndex.build(graph.all_triples, graph.num_entities, graph.num_relations)
        weakref.finalize(graph, _FILTER_CACHE.pop, key, None)
    return _FILTER_CACHE[key]


def _positions_in(triples: torch.Tensor, subset: torch.Tensor, num_entities: int, num_relations: int) -> torch.Tensor:
    """Row index ``[M]`` in ``triples [N, 3]`` of each row of ``subset [M, 3]``; ``-1`` where absent."""

    def keys(t: torch.Tensor) -> torch.Tensor:
        return (t[:, 0] * num_relations + t[:, 1]) * num_entities + t[:, 2]

    sorted_keys, order = torch.sort(keys(triples))
    subset_keys = keys(subset)
    position = torch.searchsorted(sorted_keys, subset_keys).clamp_(max=len(sorted_keys) - 1)
    return torch.where(sorted_keys[position] == subset_keys, order[position], -1)


def evaluate(
    model: KGCModel,
    graph: KnowledgeGraph,
    split: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: bool = False,
    world: World | None = None,
) -> dict:
    """Filtered evaluation of ``model`` on ``graph``'s ``split`` ("valid" or "test").

    ``device``: where to compute; the model is moved there (``nn.Module.to`` is in place).
    ``None`` keeps the model's device. Returns ``metrics[rank_type][direction][metric]``
    (rank types :data:`RANK_TYPES`, directions :data:`DIRECTIONS`, metrics :data:`METRICS`),
    ``metrics["num_triples"]``, and for ``split == "test"`` on a graph with relation
    categories ``metrics["categories"][category][direction][metric]`` (realistic ranks;
    categories without test triples are left out). ``world``: sharded over its ranks
    (:func:`rank_triples`), the same metrics on every rank, equal to one process's.
    """
    triples = graph.split(split)
    if len(triples) == 0:
        raise PipelineError(f"cannot evaluate on the {split} split: it holds no triples")
    if device is not None:
        model.to(device)
    filter_index = graph_filter(graph)
    ranks = {
        side: rank_triples(model, triples, filter_index, side, batch_size=batch_size, progress=progress, world=world)
        for side in ("head", "tail")
    }
    metrics: dict = {
        rank_type: _direction_metrics(getattr(ranks["head"], rank_type), getattr(ranks["tail"], rank_type))
        for rank_type in RANK_TYPES
    }
    metrics["num_triples"] = len(triples)
    if split == "test" and graph.test_categories:
        metrics["categories"] = {}
        for category in CATEGORIES:
            members = graph.test_categories.get(category)
            if members is None or len(members) == 0:
                continue
            rows = _positions_in(triples, members, graph.num_entities, graph.num_relations)
            if (rows < 0).any():
                missing = int((rows < 0).sum())
                raise PipelineError(f"test category {category}: {missing} of its {len(members)} triples are not in the test split")
            metrics["categories"][category] = _direction_metrics(ranks["head"].realistic[rows], ranks["tail"].realistic[rows])
    return metrics
