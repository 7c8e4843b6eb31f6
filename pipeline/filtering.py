"""The filter of filtered ranking: every known true answer of a query, as a CSR index.

A tail query ``(h, r, ?)`` has the known answers ``{t : (h, r, t) in known}``; a head query
``(?, r, t)`` has ``{h : (h, r, t) in known}``. :class:`FilterIndex` stores both maps in
compressed-sparse-row form (sorted query keys, offsets, answer entities) so a batch of ``B``
queries is answered with a ``searchsorted`` and a few gathers: no Python loop over queries
or answers, no dense ``[B, E]`` mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.base import Side


@dataclass(frozen=True)
class _SideIndex:
    """Answers of the queries of one side, grouped by query key (CSR)."""

    keys: torch.Tensor  # [Q] int64, sorted, unique query keys
    offsets: torch.Tensor  # [Q + 1] int64, answers of keys[q] are answers[offsets[q]:offsets[q + 1]]
    answers: torch.Tensor  # [N] int64 entity ids

    def to(self, device: torch.device | str) -> _SideIndex:
        return _SideIndex(self.keys.to(device), self.offsets.to(device), self.answers.to(device))


def _query_keys(triples: torch.Tensor, side: Side, num_relations: int) -> torch.Tensor:
    """Key ``[B]`` of the query of each triple ``[B, 3]``: ``h*R + r`` (tail side) or ``t*R + r`` (head side)."""
    fixed = triples[:, 0] if side == "tail" else triples[:, 2]
    return fixed * num_relations + triples[:, 1]


def _build_side(triples: torch.Tensor, side: Side, num_entities: int, num_relations: int) -> _SideIndex:
    keys = _query_keys(triples, side, num_relations)
    answers = triples[:, 2] if side == "tail" else triples[:, 0]
    # One sorted, duplicate-free int64 code per (query key, answer): each answer once per query.
    codes = torch.unique(keys * num_entities + answers)  # [N'] sorted
    unique_keys, counts = torch.unique_consecutive(codes // num_entities, return_counts=True)
    offsets = torch.zeros(len(unique_keys) + 1, dtype=torch.long, device=triples.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    return _SideIndex(unique_keys, offsets, codes % num_entities)


@dataclass(frozen=True)
class FilterIndex:
    """Known answers of head and tail queries over a set of known triples ``[N, 3]``.

    Build it once per graph with :meth:`build` and reuse it (building sorts the ``N``
    triples twice).
    """

    num_relations: int
    head: _SideIndex  # answers of head queries (?, r, t), keyed by t*R + r
    tail: _SideIndex  # answers of tail queries (h, r, ?), keyed by h*R + r

    @classmethod
    def build(cls, known: torch.Tensor, num_entities: int, num_relations: int) -> FilterIndex:
        """Index the known triples ``[N, 3]`` (head, relation, tail); tensors stay on ``known``'s device."""
        known = known.long()
        return cls(
            num_relations,
            _build_side(known, "head", num_entities, num_relations),
            _build_side(known, "tail", num_entities, num_relations),
        )

    @property
    def device(self) -> torch.device:
        return self.tail.answers.device

    def to(self, device: torch.device | str) -> FilterIndex:
        """The same index with its tensors on ``device`` (``self`` if already there)."""
        if torch.device(device) == self.device:
            return self
        return FilterIndex(self.num_relations, self.head.to(device), self.tail.to(device))

    def known_answers(self, triples: torch.Tensor, side: Side) -> tuple[torch.Tensor, torch.Tensor]:
        """Known answers of the ``side`` queries of ``triples [B, 3]``, as a sparse ``[B, E]`` pattern.

        Returns ``(rows [K], entities [K])``: entity ``entities[k]`` is a known answer of the
        query of row ``rows[k]``. Rows are ascending. The queried triple's own entity is
        included when the triple is among the known triples. ``triples`` must be on the
        index's device.
        """
        index = self.tail if side == "tail" else self.head
        if len(index.keys) == 0:
            empty = torch.empty(0, dtype=torch.long, device=triples.device)
            return empty, empty
        keys = _query_keys(triples, side, self.num_relations)
        position = torch.searchsorted(index.keys, keys).clamp_(max=len(index.keys) - 1)  # [B]
        starts = index.offsets[position]
        counts = torch.where(index.keys[position] == keys, index.offsets[position + 1] - starts, 0)  # [B]
        rows = torch.repeat_interleave(torch.arange(len(triples), device=triples.device), counts)  # [K]
        first_of_row = torch.cumsum(counts, dim=0) - counts  # [B] position of each row's first answer in [K]
        within_row = torch.arange(len(rows), device=triples.device) - first_of_row[rows]  # [K]
        return rows, index.answers[starts[rows] + within_row]
