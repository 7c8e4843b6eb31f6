"""Pre-samples per relation group (``presample_scope: relation``), a variant of the shared one.

The paper's pre-sample is one uniform set of ``P`` candidates for the whole batch, so every
relation-gated representation is computed for every (distinct relation, candidate) pair
(``[G, P, .]``) and at most ``P / (B n)`` of a batch's negatives can be distinct. Here each
relation group ``g`` of the batch (the step corrupts one side, so a group is a
(relation, side) pair) draws its own uniform pool of

    P_g = min(|E|, max(minimum, ceil(P s_g / B)))        s_g: rows of the group

entities, and its rows draw their negatives from it. Candidates are represented under their
own group's relation only, so the relation-gated work is ``sum_g P_g`` pairs instead of
``G P``, and negatives of different groups come from different pools.

Shapes: ``G`` groups, ``S = sum_g P_g`` candidates, ``W = max_g P_g`` (the padded width),
``B`` rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.samplers.mmrns.groups import RowGroups, relation_groups


@dataclass(frozen=True)
class RelationPools:
    """The pools of one step, flat (``[S]``, pool by pool) and as each row's padded candidates (``[B, W]``)."""

    relation_ids: torch.Tensor  # [G] the groups' relations (ordered by group size, as relation_groups)
    groups: RowGroups  # the batch's rows by group
    ids: torch.Tensor  # [S] candidate entity ids
    pool: torch.Tensor  # [S] the group whose pool holds the candidate
    slot: torch.Tensor  # [S] its position in that pool
    sizes: torch.Tensor  # [G] P_g
    row_ids: torch.Tensor  # [B, W] the candidates of each row's pool (0 in padding)
    row_valid: torch.Tensor  # [B, W] bool: a slot of the row's pool (False: padding)

    @property
    def width(self) -> int:
        return self.row_ids.shape[1]

    @classmethod
    def draw(
        cls, relations: torch.Tensor, presample: int, minimum: int, num_entities: int, generator: torch.Generator,
        groups_per_chunk: int,
    ) -> RelationPools:
        """One uniform pool per relation of the batch's relation column ``relations [B]`` (sizes
        above), each drawn without replacement."""
        relation_ids, groups = relation_groups(relations, groups_per_chunk)
        batch = len(relations)
        rows_per_group = torch.bincount(groups.group, minlength=groups.num_groups).tolist()
        sizes = [min(num_entities, max(minimum, math.ceil(presample * count / batch))) for count in rows_per_group]
        ids = torch.cat([torch.randperm(num_entities, generator=generator)[:size] for size in sizes])
        device = groups.group.device
        size_tensor = torch.tensor(sizes, device=device)
        pool = torch.repeat_interleave(torch.arange(len(sizes), device=device), size_tensor)
        slot = torch.arange(len(ids), device=device) - (torch.cumsum(size_tensor, 0) - size_tensor)[pool]
        table = torch.zeros(len(sizes), max(sizes), dtype=torch.long, device=device).index_put_((pool, slot), ids.to(device))
        row_valid = torch.arange(max(sizes), device=device) < size_tensor[groups.group].unsqueeze(1)
        return cls(relation_ids, groups, ids.to(device), pool, slot, size_tensor, table[groups.group], row_valid)

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """``[S, x]`` per candidate -> ``[G, W, x]`` per pool, zeros in padding (differentiable)."""
        padded = values.new_zeros(len(self.sizes), self.width, values.shape[-1])
        return padded.index_put((self.pool, self.slot), values)

    def select(self, rows: torch.Tensor, groups_per_chunk: int) -> RelationPools:
        """The pools of ``rows [m]`` (batch rows) only, for those rows in that order: the same
        candidates in the same slots, the width cut to the largest kept pool."""
        kept = torch.unique(self.groups.group[rows])  # [k] kept groups, ascending
        renumber = torch.full((len(self.sizes),), -1, dtype=torch.long, device=rows.device)
        renumber[kept] = torch.arange(len(kept), device=rows.device)
        flat = renumber[self.pool] >= 0  # [S] candidates of kept pools
        sizes = self.sizes[kept]
        width = int(sizes.max())
        groups = RowGroups.build(renumber[self.groups.group[rows]], len(kept), groups_per_chunk)
        return RelationPools(
            self.relation_ids[kept], groups, self.ids[flat], renumber[self.pool[flat]], self.slot[flat], sizes,
            self.row_ids[rows, :width], self.row_valid[rows, :width],
        )
