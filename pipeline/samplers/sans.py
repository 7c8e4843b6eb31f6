"""SANS (Ahrabian et al., EMNLP 2020): structure-aware negatives from the k-hop
neighbourhood of the entity the corruption keeps.

For a positive ``(h, r, t)`` whose tail is corrupted the kept entity is ``h`` (head
corruption: ``t``); its k-hop neighbourhood ``N_k(e)`` is every entity reachable from ``e``
in 1..k steps of the undirected TRAIN graph, ``e`` itself excluded (``k = 2`` default).
Entities that close to ``e`` are likely of a related type, i.e. hard negatives.

- ``variant: exact``: ``N_k`` from sparse boolean products, ``R_1 = A``,
  ``R_j = bool(R_{j-1} (A + I))`` (``A [E, E]`` the symmetric adjacency), stored as CSR
  (``offsets [E + 1]``, ``members [M]``); a negative is uniform over ``N_k(e)``.
- ``variant: random_walk`` (RW-SANS): ``num_walks`` walks of ``k`` uniform steps from every
  entity; the visited entities (start excluded) approximate ``N_k(e)`` (always a subset) and
  a negative is drawn in proportion to its visit count (RW-SANS's implicit weighting).

Both are one weighted CSR (``weights [M]``, all 1 for ``exact``), sampled for a batch at once:
``u ~ U[c(o_e), c(o_{e+1}))`` on the cumulative weights ``c [M + 1]``, member =
``searchsorted(c, u, right) - 1``. Shapes: positives ``[B, 3]``, negatives ``[B, n]``.

Mixing with uniform: the first ``round(structure_fraction * n)`` negatives of a row are
structure-aware, the rest uniform over all entities (diversity; the neighbourhood of a
low-degree entity is small). A kept entity with an empty neighbourhood (isolated in TRAIN)
gets uniform negatives only. ``exclude_positives`` (default true) redraws negatives that form
a known TRAIN triple from the same distribution: the true tail of ``(h, r, t)`` is always in
``N_1(h)``, and the RotatE code base SANS builds on filters known triples. A neighbourhood
holding only known answers (a hub's leaf) would never yield one: after
``STRUCTURE_REDRAW_ROUNDS`` rounds such draws are redrawn uniformly.
The neighbourhoods are rebuilt from the graph (buffers, not checkpointed); the sampler's
state is its random generator.
"""
from __future__ import annotations

import warnings

import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.models.base import KGCModel
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives
from pipeline.samplers.known_positives import KnownPositives
from pipeline.samplers.uniform import MAX_REDRAW_ROUNDS

VARIANTS = ("exact", "random_walk")
#: Redraw rounds from the neighbourhood before a still-known structure-aware draw is redrawn uniformly.
STRUCTURE_REDRAW_ROUNDS = 10


def undirected_csr(train: torch.Tensor, num_entities: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``(offsets [E + 1], neighbours [A])`` of the undirected TRAIN graph, no self-loops,
    each neighbour once."""
    h, _, t = train.unbind(-1)
    keep = h != t
    source, target = torch.cat([h[keep], t[keep]]), torch.cat([t[keep], h[keep]])
    codes = torch.unique(source * num_entities + target)
    return csr_offsets(codes // num_entities, num_entities), codes % num_entities


def csr_offsets(sorted_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``offsets [R + 1]`` of a CSR whose entries have the (ascending) row ids ``sorted_rows``."""
    offsets = torch.zeros(num_rows + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(sorted_rows, minlength=num_rows), 0, out=offsets[1:])
    return offsets


def exact_neighbourhoods(train: torch.Tensor, num_entities: int, hops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``(offsets [E + 1], members [M])`` of ``N_k(e)``: entities within 1..k hops, ``e`` excluded."""
    offsets, neighbours = undirected_csr(train, num_entities)
    rows = torch.repeat_interleave(torch.arange(num_entities), offsets.diff())
    shape = (num_entities, num_entities)
    adjacency = torch.sparse_coo_tensor(torch.stack([rows, neighbours]), torch.ones(len(rows)), shape, check_invariants=False).coalesce()
    identity = torch.sparse_coo_tensor(torch.arange(num_entities).repeat(2, 1), torch.ones(num_entities), shape, check_invariants=False)
    step = (adjacency + identity).coalesce()
    reach = adjacency
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        for _ in range(hops - 1):
            indices = torch.sparse.mm(reach, step).coalesce().indices()
            reach = torch.sparse_coo_tensor(indices, torch.ones(indices.shape[1]), shape, check_invariants=False).coalesce()
    source, member = reach.indices()
    keep = source != member
    return csr_offsets(source[keep], num_entities), member[keep]


def random_walk_neighbourhoods(
    train: torch.Tensor, num_entities: int, hops: int, num_walks: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR ``(offsets [E + 1], members [M], visits [M])``: entities visited by ``num_walks``
    uniform walks of ``hops`` steps from each entity (start excluded), with visit counts."""
    offsets, neighbours = undirected_csr(train, num_entities)
    degree = offsets.diff()
    start = torch.arange(num_entities).repeat_interleave(num_walks)  # [E W]
    position, alive = start.clone(), degree[start] > 0
    visited = []
    for _ in range(hops):
        choice = (torch.rand(len(position), generator=generator) * degree[position]).long()
        position = torch.where(alive, neighbours[(offsets[position] + choice).clamp_max(max(len(neighbours) - 1, 0))], position)
        visited.append(torch.where(alive & (position != start), position, -1))
    visited = torch.stack(visited, 1)  # [E W, k]
    sources = start.unsqueeze(1).expand_as(visited)
    valid = visited >= 0
    codes, visits = torch.unique(sources[valid] * num_entities + visited[valid], return_counts=True)
    return csr_offsets(codes // num_entities, num_entities), codes % num_entities, visits


@SAMPLERS.register("sans")
class SANSSampler(NegativeSampler):
    """Structure-aware negatives (k-hop neighbourhood of the kept entity) mixed with uniform
    ones; see the module docstring."""

    def __init__(
        self,
        graph: KnowledgeGraph,
        num_negatives: int,
        seed: int,
        hops: int = 2,
        variant: str = "exact",
        num_walks: int = 100,
        structure_fraction: float = 0.5,
        exclude_positives: bool = True,
    ):
        super().__init__(graph, num_negatives, seed)
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 1:
            raise ConfigError(f"sampler.sans.hops must be a positive integer, got {hops!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"sampler.sans.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if isinstance(num_walks, bool) or not isinstance(num_walks, int) or num_walks < 1:
            raise ConfigError(f"sampler.sans.num_walks must be a positive integer, got {num_walks!r}")
        if isinstance(structure_fraction, bool) or not isinstance(structure_fraction, (int, float)) or not 0 <= structure_fraction <= 1:
            raise ConfigError(f"sampler.sans.structure_fraction must be a number in [0, 1], got {structure_fraction!r}")
        if not isinstance(exclude_positives, bool):
            raise ConfigError(f"sampler.sans.exclude_positives must be true or false, got {exclude_positives!r}")
        self.hops, self.variant = hops, variant
        self.structural = round(structure_fraction * num_negatives)  # structure-aware negatives per row
        if variant == "exact":
            offsets, members = exact_neighbourhoods(graph.train, graph.num_entities, hops)
            weights = torch.ones_like(members)
        else:  # walks from their own seeded generator, so the neighbourhoods do not depend on the sampling stream
            walks = torch.Generator().manual_seed(seed)
            offsets, members, weights = random_walk_neighbourhoods(graph.train, graph.num_entities, hops, num_walks, walks)
        cumulative = torch.zeros(len(weights) + 1, dtype=torch.long)
        torch.cumsum(weights, 0, out=cumulative[1:])
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("members", members, persistent=False)
        self.register_buffer("cumulative", cumulative, persistent=False)
        self.known = KnownPositives(graph.train, graph.num_entities, graph.num_relations) if exclude_positives else None

    def neighbourhood(self, entity: int) -> torch.Tensor:
        """Members of ``N_k(entity)`` (approximate for ``random_walk``), ascending."""
        return self.members[self.offsets[entity] : self.offsets[entity + 1]]

    def draw(self, kept: torch.Tensor, structural: torch.Tensor) -> torch.Tensor:
        """Entity ids ``[N]``: from ``N_k(kept)`` where ``structural [N]`` and the
        neighbourhood is not empty, else uniform. ``kept [N]`` on the sampler's device."""
        device = kept.device
        low, high = self.cumulative[self.offsets[kept]], self.cumulative[self.offsets[kept + 1]]
        mass = high - low
        u = (torch.rand(len(kept), generator=self.generator).to(device) * mass).long().clamp_max((mass - 1).clamp_min(0))
        member = torch.searchsorted(self.cumulative, low + u, right=True) - 1
        from_structure = self.members[member.clamp(0, max(len(self.members) - 1, 0))] if len(self.members) else kept
        uniform = torch.randint(self.num_entities, (len(kept),), generator=self.generator).to(device)
        return torch.where(structural & (mass > 0), from_structure, uniform)

    def sample(self, positives: torch.Tensor, model: KGCModel, step: int) -> Negatives:
        batch, device = len(positives), positives.device
        corrupt_head = torch.rand(batch, generator=self.generator).to(device) < 0.5
        kept = torch.where(corrupt_head, positives[:, 2], positives[:, 0]).unsqueeze(1).expand(batch, self.num_negatives)
        structural = (torch.arange(self.num_negatives, device=device) < self.structural).expand(batch, -1)
        ids = self.draw(kept.flatten(), structural.flatten()).view(batch, self.num_negatives)
        if self.known is not None:
            for round_ in range(MAX_REDRAW_ROUNDS):
                known = self.known.corruptions_known(positives, ids, corrupt_head)
                if not known.any():
                    break
                # a neighbourhood may hold nothing but known answers: after a few rounds, redraw uniformly
                ids[known] = self.draw(kept[known], structural[known] & (round_ < STRUCTURE_REDRAW_ROUNDS))
        return Negatives(ids=ids, corrupt_head=corrupt_head)
