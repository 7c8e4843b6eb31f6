"""A batch's rows grouped by relation: the layout every relation-gated similarity shares.

Everything relation-gated in MMRNS depends only on (relation, candidate), so it is computed
once per distinct relation of the batch (``G`` groups, ``[G, P, x]``) and compared with the
``B`` rows' queries ``[B, x]`` group by group. Groups are numbered by size and cut into
chunks of consecutive groups; inside a chunk the rows are packed into a zero-padded block
``[g, width, x]`` (``width`` = the chunk's largest group), so one ``bmm`` per chunk gives
every row's dot products with its own group's candidates and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class CosineForm:
    """Eq. 8 ``<q, c> / (|q| |c| + δ)``; ``norm_gradient=False`` treats the norms as constants
    (the released script detaches them, with δ = 1e-10)."""

    delta: float = 1e-8
    norm_gradient: bool = True


def cosine_backward(
    grad: torch.Tensor, sim: torch.Tensor, query_norms: torch.Tensor, candidate_norms: torch.Tensor, form: CosineForm
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``sim = dots / (|q| |c| + δ)`` (all arguments broadcast to one shape): the gradients of
    ``dots`` and of the product ``|q| |c|`` (zero when the norms are constants)."""
    denominator = query_norms * candidate_norms + form.delta
    grad_dots = grad / denominator
    return grad_dots, -grad_dots * sim * float(form.norm_gradient)


def norm_gradient(vectors: torch.Tensor, norms: torch.Tensor, grad_norms: torch.Tensor) -> torch.Tensor:
    """``d |x| / d x`` times ``grad_norms``: ``x / |x|`` scaled, 0 where ``|x| = 0`` (as autograd's norm)."""
    scale = torch.where(norms > 0, grad_norms / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0)
    return vectors * scale.unsqueeze(-1)


@dataclass(frozen=True)
class GroupChunk:
    """Groups ``[first, last)`` and the rows that belong to them."""

    first: int
    last: int
    rows: torch.Tensor  # [m] batch rows of these groups
    local: torch.Tensor  # [m] each row's group, counted from ``first``
    rank: torch.Tensor  # [m] each row's position inside its group
    width: int  # largest group of the chunk: the padded block width

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        """``[m, x]`` row values -> the zero-padded block ``[last - first, width, x]``."""
        block = rows.new_zeros(self.last - self.first, self.width, rows.shape[-1])
        return block.index_put_((self.local, self.rank), rows)

    def query_block(self, queries: torch.Tensor) -> torch.Tensor:
        """The chunk's rows of ``queries [B, x]`` as the padded block ``[g, width, x]``."""
        return self.pack(queries[self.rows])

    def dots(self, candidates: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """``[m, P]``: each row's query (``block`` from :meth:`query_block`) against its group's ``candidates [g, P, x]``."""
        return torch.bmm(block, candidates.transpose(1, 2))[self.local, self.rank]

    def dots_backward(
        self, grad: torch.Tensor, candidates: torch.Tensor, block: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of :meth:`dots` for ``grad [m, P]``: ``([g, P, x], [m, x])``."""
        padded = self.pack(grad)  # [g, width, P]
        grad_candidates = torch.bmm(padded.transpose(1, 2), block)
        grad_queries = torch.bmm(padded, candidates)[self.local, self.rank]
        return grad_candidates, grad_queries


@dataclass(frozen=True)
class RowGroups:
    """Rows ``[B]`` in ``num_groups`` groups (group ids ordered by group size), cut into chunks."""

    group: torch.Tensor  # [B] each row's group
    num_groups: int
    chunks: tuple[GroupChunk, ...]

    @classmethod
    def build(cls, group: torch.Tensor, num_groups: int, groups_per_chunk: int) -> RowGroups:
        """``group [B]`` with ids in ``[0, num_groups)`` numbered so that sizes do not decrease."""
        sizes = torch.bincount(group, minlength=num_groups)  # [G]
        order = torch.argsort(group, stable=True)  # rows sorted by group
        starts = torch.cumsum(sizes, 0) - sizes
        rank = torch.arange(len(group), device=group.device) - starts[group[order]]
        chunks, bounds = [], starts.tolist() + [len(group)]
        size_list = sizes.tolist()
        for first in range(0, num_groups, max(1, groups_per_chunk)):
            last = min(num_groups, first + groups_per_chunk)
            span = slice(bounds[first], bounds[last])
            rows = order[span]
            chunks.append(GroupChunk(first, last, rows, group[rows] - first, rank[span], max(size_list[first:last])))
        return cls(group, num_groups, tuple(chunks))

    @classmethod
    def single(cls, batch: int, device: torch.device | str) -> RowGroups:
        """Every row in one group (relation-free representations)."""
        return cls.build(torch.zeros(batch, dtype=torch.long, device=device), 1, 1)


def relation_groups(relations: torch.Tensor, groups_per_chunk: int) -> tuple[torch.Tensor, RowGroups]:
    """Distinct relations ``[G]`` of a batch's relation column ``[B]`` (ordered by how many rows
    use them) and the rows grouped by them."""
    distinct, group = torch.unique(relations, return_inverse=True)
    order = torch.argsort(torch.bincount(group, minlength=len(distinct)), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return distinct[order], RowGroups.build(rank[group], len(distinct), groups_per_chunk)


def grouped_dots(candidates: torch.Tensor, queries: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """``[B, P]``: dot products of ``queries [B, x]`` with the candidates ``[G, P, x]`` of each row's
    group (``G = 1``: the same candidates for every row)."""
    if candidates.shape[0] == 1:
        return queries @ candidates[0].T
    blocks = candidates.split([chunk.last - chunk.first for chunk in groups.chunks])  # one backward node, no zero-filled slices
    parts = [chunk.dots(block, chunk.query_block(queries)) for chunk, block in zip(groups.chunks, blocks)]
    rows = torch.cat([chunk.rows for chunk in groups.chunks])
    return torch.cat(parts)[torch.argsort(rows)]


def grouped_cosine(
    candidates: torch.Tensor, queries: torch.Tensor, groups: RowGroups, form: CosineForm = CosineForm()
) -> torch.Tensor:
    """Eq. 8 ``[B, P]``: cosine of ``queries [B, x]`` to the candidates ``[G, P, x]`` of each row's group.

    Plain autograd; ``G = 1`` compares every row with the same candidates.
    """
    dots = grouped_dots(candidates, queries, groups)
    norms = torch.linalg.vector_norm(candidates, dim=-1)
    norms = norms[0].unsqueeze(0) if candidates.shape[0] == 1 else norms[groups.group]
    scale = torch.linalg.vector_norm(queries, dim=-1, keepdim=True) * norms
    if not form.norm_gradient:
        scale = scale.detach()
    return dots / (scale + form.delta)
