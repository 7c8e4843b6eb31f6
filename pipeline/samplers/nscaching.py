"""NSCaching (Zhang et al., ICDE 2019): negatives from small caches of high-scoring
entities, kept per query and refreshed by importance sampling.

State: a head cache ``H[(r, t)] [N1]`` per (relation, tail) and a tail cache ``T[(h, r)] [N1]``
per (head, relation) pair of TRAIN (entity ids; rows looked up by ``searchsorted`` on sorted
keys ``t R + r`` / ``h R + r``), filled uniformly at start. Per step, for positives ``[B, 3]``:

1. Side: row ``b`` corrupts its head with probability ``p_r`` (Bernoulli ``tph / (tph + hpt)``
   as in the NSCaching code; ``head_probability: uniform`` gives 1/2).
2. Sample: ``n`` negatives uniformly from the row's cache, ``ids [B, n]`` (NSCaching "unif").
3. Update (lazy: only in epochs ``e`` with ``e % update_every_epochs == 0``, epoch =
   ``step B // |TRAIN|``): for each distinct key of the batch, both caches, candidates
   ``C = cache [N1] ∪ N2 uniform entities`` ``[U, N1 + N2]`` are scored by the model
   (no gradient) and ``N1`` of them are kept, drawn without replacement with probability
   ``softmax(score)`` (importance sampling; Gumbel-top-k: ``topk(score + G, N1)``,
   ``G ~ Gumbel(0, 1)`` from the sampler's generator).

``exclude_positives`` (default true, NSCaching's ``remove`` of false negatives): the initial
fill redraws known TRAIN triples and the update gives them probability 0, so no cache entry
ever forms a known triple (the ``N1`` previous entries are always admissible candidates).
The caches are buffers saved with the sampler's state (checkpoints resume them).
"""
from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.models.base import KGCModel
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives
from pipeline.samplers.bernoulli import side_probabilities
from pipeline.samplers.known_positives import KnownPositives
from pipeline.samplers.uniform import MAX_REDRAW_ROUNDS

def positive_integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"sampler.nscaching.{name} must be a positive integer, got {value!r}")
    return value


@SAMPLERS.register("nscaching")
class NSCachingSampler(NegativeSampler):
    """Cache-based negatives with lazy importance-sampling updates; see the module docstring."""

    def __init__(
        self,
        graph: KnowledgeGraph,
        num_negatives: int,
        seed: int,
        cache_size: int = 50,
        candidates: int = 50,
        update_every_epochs: int = 1,
        head_probability: str = "bernoulli",
        exclude_positives: bool = True,
    ):
        super().__init__(graph, num_negatives, seed)
        self.cache_size = positive_integer("cache_size", cache_size)
        self.candidates = positive_integer("candidates", candidates)
        self.update_every_epochs = positive_integer("update_every_epochs", update_every_epochs)
        if not isinstance(exclude_positives, bool):
            raise ConfigError(f"sampler.nscaching.exclude_positives must be true or false, got {exclude_positives!r}")
        self.num_relations, self.num_train = graph.num_relations, len(graph.train)
        self.known = KnownPositives(graph.train, graph.num_entities, graph.num_relations) if exclude_positives else None
        probabilities = side_probabilities(graph.train, graph.num_relations, head_probability, "sampler.nscaching.head_probability")
        self.register_buffer("probabilities", probabilities, persistent=False)
        h, r, t = graph.train.unbind(-1)
        for side, keys in (("head", torch.unique(t * self.num_relations + r)), ("tail", torch.unique(h * self.num_relations + r))):
            self.register_buffer(f"{side}_keys", keys, persistent=False)
            self.register_buffer(f"{side}_cache", self.initial_cache(keys, head_side=side == "head"))

    # -- cache layout ------------------------------------------------------------------
    def query_keys(self, positives: torch.Tensor, head_side: bool) -> torch.Tensor:
        """Keys ``[B]``: ``t R + r`` (head cache) or ``h R + r`` (tail cache)."""
        fixed = positives[:, 2] if head_side else positives[:, 0]
        return fixed * self.num_relations + positives[:, 1]

    def cache_rows(self, positives: torch.Tensor, head_side: bool) -> torch.Tensor:
        """Cache rows ``[B]`` of the positives' queries (every TRAIN query has one)."""
        keys = self.head_keys if head_side else self.tail_keys
        rows = torch.searchsorted(keys, self.query_keys(positives, head_side)).clamp_max(len(keys) - 1)
        if not torch.equal(keys[rows], self.query_keys(positives, head_side)):
            raise ValueError("NSCaching samples corruptions of TRAIN triples only; a positive's query has no cache")
        return rows

    def cache(self, head_side: bool) -> torch.Tensor:
        return self.head_cache if head_side else self.tail_cache

    def representatives(self, keys: torch.Tensor, head_side: bool) -> torch.Tensor:
        """A triple ``[K, 3]`` per query key (the corrupted slot holds a placeholder 0)."""
        fixed, relation = keys // self.num_relations, keys % self.num_relations
        placeholder = torch.zeros_like(fixed)
        return torch.stack([placeholder, relation, fixed] if head_side else [fixed, relation, placeholder], 1)

    def initial_cache(self, keys: torch.Tensor, head_side: bool) -> torch.Tensor:
        """Uniform entities ``[K, N1]``, known TRAIN triples redrawn when excluding positives."""
        cache = torch.randint(self.num_entities, (len(keys), self.cache_size), generator=self.generator)
        if self.known is not None:
            triples, side = self.representatives(keys, head_side), torch.full((len(keys),), head_side)
            for _ in range(MAX_REDRAW_ROUNDS):
                known = self.known.corruptions_known(triples, cache, side)
                if not known.any():
                    break
                cache[known] = torch.randint(self.num_entities, (int(known.sum()),), generator=self.generator)
        return cache

    # -- sampling and update -------------------------------------------------------------
    def sample(self, positives: torch.Tensor, model: KGCModel, step: int) -> Negatives:
        batch, device = len(positives), positives.device
        coins = torch.rand(batch, generator=self.generator).to(device)
        corrupt_head = coins < self.probabilities[positives[:, 1]]
        columns = torch.randint(self.cache_size, (batch, self.num_negatives), generator=self.generator).to(device)
        head_ids = self.head_cache[self.cache_rows(positives, True).unsqueeze(1), columns]  # [B, n]
        tail_ids = self.tail_cache[self.cache_rows(positives, False).unsqueeze(1), columns]
        ids = torch.where(corrupt_head.unsqueeze(1), head_ids, tail_ids)
        epoch = step * batch // self.num_train
        if epoch % self.update_every_epochs == 0:
            with torch.no_grad():
                self.update(positives, model, head_side=True)
                self.update(positives, model, head_side=False)
        return Negatives(ids=ids, corrupt_head=corrupt_head)

    def update(self, positives: torch.Tensor, model: KGCModel, head_side: bool) -> None:
        """Refresh the caches of the batch's distinct queries on one side (step 3)."""
        device = positives.device
        rows = torch.unique(self.cache_rows(positives, head_side))  # [U]
        keys = (self.head_keys if head_side else self.tail_keys)[rows]
        triples = self.representatives(keys, head_side).to(device)
        fresh = torch.randint(self.num_entities, (len(rows), self.candidates), generator=self.generator).to(device)
        candidates = torch.cat([self.cache(head_side)[rows], fresh], 1)  # [U, N1 + N2]
        side = torch.full((len(rows),), head_side, device=device)
        scores = model.score_negatives(triples, candidates, side).float()
        if self.known is not None:
            scores = scores.masked_fill(self.known.corruptions_known(triples, candidates, side), float("-inf"))
        uniform = torch.rand(scores.shape, generator=self.generator).to(device).clamp_min(torch.finfo(torch.float32).tiny)
        keep = (scores - torch.log(-torch.log(uniform))).topk(self.cache_size, dim=1).indices  # Gumbel-top-k
        self.cache(head_side)[rows] = candidates.gather(1, keep)
