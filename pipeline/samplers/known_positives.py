"""A vectorised membership index of known triples, to keep true triples out of negatives."""
from __future__ import annotations

import torch
from torch import nn


class KnownPositives(nn.Module):
    """Sorted int64 keys ``(h R + r) E + t`` of known triples, queried with ``searchsorted``, and
    the same keys with head and tail swapped, ``(t R + r) E + h``, so that the known answers of
    a query ``(h, r, ?)`` or ``(?, r, t)`` are one contiguous run.

    Buffers (not saved in checkpoints; rebuilt from the graph), so they follow the model's
    device.
    """

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int):
        super().__init__()
        self.num_entities, self.num_relations = num_entities, num_relations
        heads, relations, tails = triples.unbind(-1)
        self.register_buffer("sorted_keys", torch.unique(self.key(heads, relations, tails)), persistent=False)
        self.register_buffer("sorted_head_keys", torch.unique(self.key(tails, relations, heads)), persistent=False)

    def key(self, heads: torch.Tensor, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        return (heads * self.num_relations + relations) * self.num_entities + tails

    def contains(self, heads: torch.Tensor, relations: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        """Bool ``[...]``: is ``(h, r, t)`` known? Arguments broadcast against each other."""
        keys = self.key(heads, relations, tails)
        if len(self.sorted_keys) == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        position = torch.searchsorted(self.sorted_keys, keys).clamp_max_(len(self.sorted_keys) - 1)
        return self.sorted_keys[position] == keys

    def corruptions_known(self, positives: torch.Tensor, candidates: torch.Tensor, corrupt_head: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, n]``: is positive ``b`` with its head (or tail) replaced by ``candidates[b, i]`` known?

        ``positives [B, 3]``, ``candidates [B, n]`` entity ids, ``corrupt_head [B]`` bool.
        """
        h, r, t = (column.unsqueeze(1) for column in positives.unbind(-1))
        side = corrupt_head.unsqueeze(1)
        return self.contains(torch.where(side, candidates, h), r, torch.where(side, t, candidates))

    def answers_among(self, positives: torch.Tensor, candidates: torch.Tensor, corrupt_head: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, P]``, the same as :meth:`corruptions_known` with ``candidates [P]`` shared by
        every row, at the cost of the rows' known answers rather than ``B P`` lookups."""
        batch, count = len(positives), len(candidates)
        position = torch.full((self.num_entities,), -1, dtype=torch.long, device=candidates.device)
        position[candidates] = torch.arange(count, device=candidates.device)  # [E]: slot in the pre-sample
        known = torch.zeros(batch, count, dtype=torch.bool, device=candidates.device)
        for head_side, keys in ((False, self.sorted_keys), (True, self.sorted_head_keys)):
            rows = (corrupt_head == head_side).nonzero().squeeze(1)
            if len(rows) == 0 or len(keys) == 0:
                continue
            kept = positives[rows, 2] if head_side else positives[rows, 0]
            prefix = (kept * self.num_relations + positives[rows, 1]) * self.num_entities
            first = torch.searchsorted(keys, prefix)
            counts = torch.searchsorted(keys, prefix + self.num_entities) - first  # [b] answers per row
            row = torch.repeat_interleave(rows, counts)
            run_start = torch.repeat_interleave(first - (torch.cumsum(counts, 0) - counts), counts)
            answers = keys[run_start + torch.arange(len(row), device=keys.device)] % self.num_entities
            slot = position[answers]
            inside = slot >= 0
            known[row[inside], slot[inside]] = True
        return known
