"""A vectorised membership index of known triples, to keep true triples out of negatives."""
from __future__ import annotations

import torch
from torch import nn


class KnownPositives(nn.Module):
    """Sorted int64 keys ``(h R + r) E + t`` of known triples, queried with ``searchsorted``.

    A buffer (not saved in checkpoints; rebuilt from the graph), so it follows the model's
    device.
    """

    def __init__(self, triples: torch.Tensor, num_entities: int, num_relations: int):
        super().__init__()
        self.num_entities, self.num_relations = num_entities, num_relations
        self.register_buffer("sorted_keys", torch.unique(self.key(*triples.unbind(-1))), persistent=False)

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
