"""MMRNS: relation-enhanced multimodal negative sampling (Xu et al., ACM MM 2022, section 3).

Shapes: ``B`` batch, ``P`` pre-sampled candidates, ``n`` negatives per positive, ``R_b``
distinct relations in the batch, ``d`` entity width, ``a`` attention width (50).

Per training step (``step`` 0-based):

1. Pre-sample (sec. 4.3.2): one uniform set of ``P`` candidates shared by the batch (the
   paper only says "we randomly sample a subset of entities first"; the script shares it,
   and sharing lets every per-candidate computation run once). ``P = ceil(|E|/10)`` by
   default. Even steps corrupt tails, odd steps heads (the script alternates batches).
2. Representations of the candidates and of each row's *positive entity* (the entity
   being replaced: the tail for tail corruption, the head for head corruption):
   KCA (eqs. 1-6, :mod:`pipeline.samplers.kca`) for image and text, and the structural
   branch (eq. 7) ``e_s = t ⊙ sigmoid(MLP([r; t]))`` on the KGC model's own
   representations, an MLP ``Linear(d_r + d, 100) - LeakyReLU(0.1) - Linear(100, d)`` (the
   paper writes one layer; hidden 100 is the script's). Everything relation-gated depends
   only on (relation, candidate), so it is computed once per distinct relation of the
   batch (``[R_b, P, .]``) and compared with each row's positive by relation group: never
   ``[B, P, 24, a]`` or ``[B, P, d]``.
3. Cosine similarities (eq. 8, δ = 1e-8) of every candidate to the row's positive, per
   modality: three ``[B, P]`` matrices.
4. Sampling log-probabilities (eq. 12): ``log p = log(sum_m softmax(sim_m / ϵ) / 3)``,
   ``ϵ = ϵ0 / (1 + ln(iter))`` with ``iter = step + 1`` (eq. 15; step 0 uses ϵ0).
5. Masked Gumbel-softmax (eq. 13): ``y = softmax((log p + log mask + g) / τ)``, τ = 1,
   ``log mask = ln(1e-38)`` at the row's known TRAIN answers among the candidates (found
   with the sorted-key :class:`~pipeline.samplers.known_positives.KnownPositives` index, no
   dense ``[B, |E|]`` mask) and
   at the positive entity itself. ``n`` draws without replacement: after each draw the
   chosen column gets ``ln(1e-38)`` added. Straight-through: the forward value is the
   hard one-hot, the gradient that of ``y``. The hard choice is the Gumbel-max
   ``argmax(log p + g)`` over candidates that are neither known positives nor drawn, so a
   known positive is never drawn even when ``ln(1e-38)`` would not outweigh the noise.
   The negatives' representations are ``one_hot @ E[candidates]`` (computed as a gather
   with the matching backward), so the KGC loss reaches the sampler (``kgc_grad_to_sampler``).
6. Contrastive loss (eqs. 9-11) in :meth:`MMRNSSampler.auxiliary_loss`, returned as
   ``β L_con`` (eq. 14: the loop adds it to ``L_kgc``).

Decisions where the paper is silent:

- Exhausted rows: when a row has fewer than ``n`` eligible candidates in the pre-sample,
  its remaining slots are filled with uniform entities from the whole graph that are
  neither known TRAIN answers nor already drawn (rejection sampling with the sampler's
  generator); these slots carry no sampler gradient and no contrastive term.
- Missing modalities (feature-cache masks): a modality's similarity exists only when both
  the candidate and the row's positive have that modality. A candidate without it gets no
  probability mass from that modality's softmax (which runs over the candidates that have
  it); a row whose positive lacks it drops that modality from its mixture (the mean is
  over the modalities available to the row; a row with none samples uniformly).
  Candidates with no available modality are not drawn. The modality's contrastive term
  uses only valid candidates. A requested modality that no entity has (offline: no image
  was crawled) would be unavailable to every row, so it is not computed at all
  (``absent_modalities``; same draws and losses, without KCA's image branch); with none
  left, the sampler draws uniformly from the pre-sample. An entity without image still
  has a text representation from KCA with all-zero image tokens (as the script); only the
  zero *image* is never compared as content. Padding sentences (rows beyond the entity's count) are zero, as in
  the script.
- Contrastive sets (default, per row): positives = the pre-sample candidates that are
  known TRAIN answers of the row's query, other than the row's own entity (``cos(z, z)``
  would be a constant); negatives = every other candidate; weights (eq. 9) =
  ``softmax_j(α s_j)`` over the row's ``n`` KGC scores (detached) for drawn candidates,
  ``1/|E|`` for the others. ``l = logsumexp_P(ln w + sim) - logsumexp_N(ln w + sim)``
  negated; rows without a positive contribute nothing (finite, no NaN) and the loss of a
  modality is the mean over the rows that have one; eq. 11 averages the modalities that
  contributed.

``faithful: true`` reproduces the released script where it departs from the paper:

- eq. 10: positives and negatives are pooled over the whole batch (one ratio per
  modality) instead of one ratio per row;
- eq. 12: the mixture is the unnormalised sum of the modality softmaxes instead of their
  mean (``/3``). This shifts every row's ``log p`` by a constant, so the hard Gumbel
  sample is the same; the straight-through ``y`` is the same too (softmax is shift
  invariant); it is kept for completeness;
- eq. 6: the positive entity's relation-gated branch is not layer-normalised (the notes
  say the script's positive branch skips one of the candidate branch's LayerNorms without
  naming it; we take the gated one);
- the pre-sample is shared by the batch in both modes.

Ablations (sec. 4.6): ``no_kca``: image and text similarities are cosines of one Linear
of the token-averaged raw features (no cross-modal attention; KCA parameters do not
exist); ``no_css``: the contrastive loss is dropped (:meth:`auxiliary_loss` returns
None), the sampler learns from the KGC loss only; ``no_rel``: no relation gates (the gated
branches use ``M`` itself) and no relation in eq. 7, so every representation is
relation-free. ``modalities`` switches structure / text / image similarities on or off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import ConfigError
from pipeline.features import Features
from pipeline.graph import KnowledgeGraph
from pipeline.models.base import KGCModel
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives
from pipeline.samplers.kca import LEAKY_SLOPE, CrossModalAttention
from pipeline.samplers.known_positives import KnownPositives

MODALITIES = ("structure", "text", "image")
ABLATIONS = ("none", "no_kca", "no_css", "no_rel")
LOG_MASK = math.log(1e-38)  # eq. 13: log of the mask value at known positives and drawn columns
COSINE_DELTA = 1e-8  # eq. 8
GUMBEL_TAU = 1.0
FALLBACK_TRIES = 1000
UNAVAILABLE = -1e4  # finite "log 0" for a modality a candidate lacks (keeps gradients NaN-free)


def exploration_factor(eps0: float, step: int) -> float:
    """Eq. 15: ``ϵ = ϵ0 / (1 + ln(iter))`` with ``iter = step + 1``."""
    return eps0 / (1.0 + math.log(step + 1))


def presample_count(presample_size: float | int, num_entities: int) -> int:
    """``P``: an int count, or a float in (0, 1] read as a fraction of ``|E|`` (rounded up)."""
    if isinstance(presample_size, bool) or not isinstance(presample_size, (int, float)):
        raise ConfigError(f"sampler.mmrns.presample_size must be a number, got {presample_size!r}")
    if isinstance(presample_size, float):
        if not 0 < presample_size <= 1:
            raise ConfigError(f"sampler.mmrns.presample_size as a fraction must be in (0, 1], got {presample_size}")
        return max(1, math.ceil(presample_size * num_entities))
    if not 1 <= presample_size <= num_entities:
        raise ConfigError(f"sampler.mmrns.presample_size must be in [1, {num_entities}], got {presample_size}")
    return presample_size


class _StraightThroughSelect(torch.autograd.Function):
    """``(hard + soft - soft.detach()) @ table`` with ``hard = one_hot(index)``, as a gather.

    Forward: ``table[index]`` ``[B, n, d]`` exactly. Backward: ``soft`` gets
    ``grad @ table^T`` ``[B, n, P]``; ``table`` gets the one-hot scatter of ``grad``.
    """

    @staticmethod
    def forward(ctx: Any, soft: torch.Tensor, index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, table)
        return table[index]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        index, table = ctx.saved_tensors
        grad_soft = grad @ table.T if ctx.needs_input_grad[0] else None
        grad_table = None
        if ctx.needs_input_grad[2]:
            grad_table = torch.zeros_like(table).index_add_(0, index.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return grad_soft, None, grad_table


def relation_vectors(model: KGCModel, ids: torch.Tensor) -> torch.Tensor:
    """``[R, d_r]``: the model's relation representations of ``ids [R]`` as flat real vectors
    (GC-OTE's are ``[K, s, s + 1]`` blocks; complex ones are split into real and imaginary parts)."""
    relations = model.relation_representations(ids)
    if relations.is_complex():
        relations = torch.view_as_real(relations)
    return relations.reshape(len(ids), -1)


def bucket_widths(sizes: torch.Tensor) -> torch.Tensor:
    """Group sizes ``[G]`` rounded up to a power of two (the padded block width of :func:`grouped_cosine`)."""
    return torch.pow(2, torch.ceil(torch.log2(sizes.clamp_min(1).double()))).long()


def relation_groups(relations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct relations ``[G]`` of a batch's relation column ``[B]`` and each row's group ``[B]``.

    Groups are ordered by :func:`bucket_widths`, so :func:`grouped_cosine` needs no re-gather.
    """
    distinct, group = torch.unique(relations, return_inverse=True)
    order = torch.argsort(bucket_widths(torch.bincount(group, minlength=len(distinct))), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return distinct[order], rank[group]


def grouped_cosine(candidates: torch.Tensor, queries: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Eq. 8 ``[B, P]``: cosine of ``queries [B, x]`` to ``candidates [G, P, x]`` of row ``b``'s group ``group[b]``.

    ``G`` = distinct relations of the batch (or 1 when relation-free). Rows are batched by
    group into zero-padded ``[groups, width, x]`` blocks, one ``bmm`` per width class
    (group sizes rounded up to a power of two): at most ~log2(B) matmuls and at most twice
    the multiply-adds of the unpadded products, never a ``[B, P, x]`` gather.
    """
    if candidates.shape[0] == 1:
        group = torch.zeros_like(group)
    norms = torch.linalg.vector_norm(candidates, dim=-1)[group]  # [B, P]
    if candidates.shape[0] == 1:
        dots = queries @ candidates[0].T
    else:
        sizes = torch.bincount(group, minlength=candidates.shape[0])  # [G]
        width = bucket_widths(sizes)  # [G]
        present = sizes.nonzero().squeeze(1)
        by_width = present[torch.argsort(width[present], stable=True)]  # [G'] groups sorted by width
        slot = torch.full_like(sizes, -1)
        slot[by_width] = torch.arange(len(by_width), device=group.device)
        row_order = torch.argsort(slot[group], stable=True)  # rows sorted by their group's slot
        row_slot = slot[group][row_order]  # [B]
        group_sizes = sizes[by_width]
        rank = torch.arange(len(group), device=group.device) - (torch.cumsum(group_sizes, 0) - group_sizes)[row_slot]
        block_widths, bucket_groups = torch.unique_consecutive(width[by_width], return_counts=True)
        bucket_rows = torch.stack([chunk.sum() for chunk in torch.split(group_sizes, bucket_groups.tolist())])
        # split (one backward node) rather than slicing per bucket (one full-size zero gradient each)
        if not torch.equal(by_width, torch.arange(len(sizes), device=by_width.device)):  # see relation_groups
            candidates = candidates.index_select(0, by_width)
        candidate_blocks = torch.split(candidates, bucket_groups.tolist())
        query_blocks = torch.split(queries[row_order], bucket_rows.tolist())
        row_slots, row_ranks = torch.split(row_slot, bucket_rows.tolist()), torch.split(rank, bucket_rows.tolist())
        parts, first_group = [], 0
        for bucket, bucket_width in enumerate(block_widths.tolist()):
            local = row_slots[bucket] - first_group, row_ranks[bucket]
            count = len(candidate_blocks[bucket])
            block = queries.new_zeros(count, bucket_width, queries.shape[1]).index_put(local, query_blocks[bucket])
            parts.append(torch.bmm(block, candidate_blocks[bucket].transpose(1, 2))[local])  # [rows, P]
            first_group += count
        dots = torch.cat(parts)[torch.argsort(row_order)]  # back to row order
    scale = torch.linalg.vector_norm(queries, dim=-1, keepdim=True) * norms
    return dots / (scale + COSINE_DELTA)


@dataclass
class _StepContext:
    """What :meth:`MMRNSSampler.auxiliary_loss` needs from the preceding :meth:`sample`."""

    negatives: Negatives
    similarities: dict[str, tuple[torch.Tensor, torch.Tensor]]  # modality -> (sim [B, P], valid [B, P])
    known: torch.Tensor  # [B, P] bool: known TRAIN answer of the row's query (or the row's own entity)
    own: torch.Tensor  # [B, P] bool: the candidate is the row's own positive entity
    positions: torch.Tensor  # [B, n] column of each draw in the pre-sample
    drawn: torch.Tensor  # [B, n] bool: slot drawn from the pre-sample (False: fallback)


@SAMPLERS.register("mmrns")
class MMRNSSampler(NegativeSampler):
    """The MMRNS sampler (see the module docstring for the mathematics and the decisions)."""

    def __init__(
        self,
        graph: KnowledgeGraph,
        num_negatives: int,
        seed: int,
        *,
        entity_dim: int,
        relation_dim: int,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        visual_features: torch.Tensor,
        visual_mask: torch.Tensor,
        presample_size: float | int = 0.1,
        eps0: float = 1.0,
        beta: float = 0.005,
        attention_dim: int = 50,
        structure_hidden: int = 100,
        adversarial_temperature: float = 0.5,
        faithful: bool = False,
        ablation: str = "none",
        modalities: Sequence[str] = MODALITIES,
        kgc_grad_to_sampler: bool = True,
    ):
        """Features: ``text_features [E, Tt, D_t]``, ``visual_features [E, Ti, D_i]`` (any float
        dtype, kept as given; zeros where the mask is False), masks ``[E]`` bool."""
        super().__init__(graph, num_negatives, seed)
        if ablation not in ABLATIONS:
            raise ConfigError(f"sampler.mmrns.ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ConfigError(f"sampler.mmrns.modalities must be a non-empty subset of {list(MODALITIES)}, got {modalities!r}")
        for name, values, mask in (("text", text_features, text_mask), ("visual", visual_features, visual_mask)):
            if values.dim() != 3 or values.shape[0] != graph.num_entities or mask.shape != (graph.num_entities,):
                raise ConfigError(
                    f"{name} features must be [E={graph.num_entities}, T, D] with a mask [E], "
                    f"got {tuple(values.shape)} and {tuple(mask.shape)}"
                )
        if not eps0 > 0 or not beta >= 0 or not adversarial_temperature > 0:
            raise ConfigError(f"sampler.mmrns: need eps0 > 0, beta >= 0, adversarial_temperature > 0; got {eps0}, {beta}, "
                              f"{adversarial_temperature}")
        self.presample = presample_count(presample_size, graph.num_entities)
        if self.presample < num_negatives:
            raise ConfigError(f"sampler.mmrns.presample_size gives {self.presample} candidates < {num_negatives} negatives")
        self.eps0, self.beta, self.alpha = float(eps0), float(beta), float(adversarial_temperature)
        self.faithful, self.ablation, self.kgc_grad_to_sampler = bool(faithful), ablation, bool(kgc_grad_to_sampler)
        present = {"structure": True, "text": bool(text_mask.any()), "image": bool(visual_mask.any())}
        self.modalities = tuple(m for m in MODALITIES if m in modalities and present[m])  # computed
        self.absent_modalities = tuple(m for m in MODALITIES if m in modalities and not present[m])  # no entity has it
        self.uses_relation = ablation != "no_rel"
        self.known_positives = KnownPositives(graph.train, graph.num_entities, graph.num_relations)
        self.register_buffer("text_features", text_features, persistent=False)
        self.register_buffer("text_mask", text_mask.bool(), persistent=False)
        self.register_buffer("visual_features", visual_features, persistent=False)
        self.register_buffer("visual_mask", visual_mask.bool(), persistent=False)

        relation_in = relation_dim if self.uses_relation else 0
        self.structure_mlp = nn.Sequential(
            nn.Linear(relation_in + entity_dim, structure_hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(structure_hidden, entity_dim),
        )
        visual_shape, text_shape = tuple(visual_features.shape[1:]), tuple(text_features.shape[1:])
        if ablation == "no_kca":
            self.kca = None
            self.visual_pooled = nn.Linear(visual_shape[1], attention_dim)
            self.text_pooled = nn.Linear(text_shape[1], attention_dim)
        else:
            self.kca = CrossModalAttention(visual_shape, text_shape, relation_in or None, attention_dim)
        initialisation = torch.Generator().manual_seed(seed)
        for module in self.modules():  # Xavier-normal weights (sec. 4.3.2), zero biases
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight, generator=initialisation)
                nn.init.zeros_(module.bias)
        self._context: _StepContext | None = None

    # -- construction from params.yaml --------------------------------------------------
    @classmethod
    def from_params(
        cls,
        graph: KnowledgeGraph,
        params: dict[str, Any],
        model: KGCModel,
        num_negatives: int,
        seed: int,
        text: Features | None,
        visual: Features | None,
    ) -> MMRNSSampler:
        """Build from the ``sampler.mmrns`` section of params.yaml for ``model``'s representation
        widths; ``text``/``visual`` from :func:`pipeline.features.load_features` (None: no cache,
        the modality is missing for every entity; the default shapes [4, 384] / [24, 383] are used)."""
        known = {
            "presample_size", "eps0", "beta", "attention_dim", "structure_hidden", "adversarial_temperature",
            "faithful", "ablation", "modalities", "kgc_grad_to_sampler",
        }
        unknown = set(params) - known
        if unknown:
            raise ConfigError(f"sampler.mmrns: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        probe = torch.zeros(1, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad():
            entity_dim = model.entity_representations(probe).shape[-1]
            relation_dim = relation_vectors(model, probe).shape[-1]
        text_values, text_mask = _feature_tensors(text, graph.num_entities, (4, 384))
        visual_values, visual_mask = _feature_tensors(visual, graph.num_entities, (24, 383))
        return cls(
            graph, num_negatives, seed, entity_dim=entity_dim, relation_dim=relation_dim,
            text_features=text_values, text_mask=text_mask, visual_features=visual_values, visual_mask=visual_mask,
            **params,
        )

    # -- representations and similarities ------------------------------------------------
    def similarities(
        self, positives: torch.Tensor, candidates: torch.Tensor, corrupt_head: torch.Tensor, model: KGCModel
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Eq. 8 per active modality: ``(sim [B, P], valid [B, P])`` of each candidate to the row's positive."""
        own = torch.where(corrupt_head, positives[:, 0], positives[:, 2])  # [B]
        if self.uses_relation:
            relation_ids, group = relation_groups(positives[:, 1])  # [R_b], [B]
        else:
            relation_ids, group = positives[:1, 1], torch.zeros_like(own)
        relations = relation_vectors(model, relation_ids)  # [R_b, d_r]
        row_relations = relations[group]  # [B, d_r]
        result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if "structure" in self.modalities:
            table = model.entity_representations(candidates)  # [P, d]
            mine = model.entity_representations(own)  # [B, d]
            candidate_structure = self._structure(table.unsqueeze(0), relations.unsqueeze(1))  # [R_b | 1, P, d]
            own_structure = self._structure(mine, row_relations)  # [B, d]
            sim = grouped_cosine(candidate_structure, own_structure, group)
            result["structure"] = (sim, torch.ones_like(sim, dtype=torch.bool))
        wanted = {m: m in self.modalities for m in ("text", "image")}
        if any(wanted.values()):
            candidate_image, candidate_text = self._multimodal(candidates, relations, paired=False, **wanted)
            own_image, own_text = self._multimodal(own, row_relations, paired=True, **wanted)
            for modality, mask, cand, mine in (
                ("text", self.text_mask, candidate_text, own_text),
                ("image", self.visual_mask, candidate_image, own_image),
            ):
                if cand is not None:
                    valid = mask[own].unsqueeze(1) & mask[candidates].unsqueeze(0)  # [B, P]
                    result[modality] = (grouped_cosine(cand, mine, group), valid)
        return result

    def _structure(self, entities: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        """Eq. 7 ``t ⊙ sigmoid(MLP([r; t]))`` for broadcastable ``entities [..., d]``, ``relations [..., d_r]``."""
        first = self.structure_mlp[0]
        d_r = first.in_features - entities.shape[-1]
        hidden = F.linear(entities, first.weight[:, d_r:], first.bias)
        if d_r:
            hidden = hidden + F.linear(relations, first.weight[:, :d_r])
        gate = self.structure_mlp[2](self.structure_mlp[1](hidden))
        return entities * torch.sigmoid(gate)

    def _multimodal(
        self, entities: torch.Tensor, relations: torch.Tensor, *, paired: bool, text: bool, image: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image, text) representations: ``[R, N, a]`` (``paired=False``) or ``[N, a]`` (entity i under relation i)."""
        visual = self.visual_features[entities].float()  # [N, Ti, D_i]
        words = self.text_features[entities].float()  # [N, Tt, D_t]
        if self.kca is None:  # no_kca: one Linear of the token-averaged features, relation-free
            shape = (lambda x: x) if paired else (lambda x: x.unsqueeze(0))
            return (
                shape(self.visual_pooled(visual.mean(1))) if image else None,
                shape(self.text_pooled(words.mean(1))) if text else None,
            )
        gates = self.kca.gates(relations if self.uses_relation else None)
        normalise = not (paired and self.faithful)
        return self.kca(self.kca.encode(visual, words), gates, paired=paired, visual=image, text=text, normalise_gated=normalise)

    # -- sampling --------------------------------------------------------------------------
    def log_probabilities(self, similarities: dict[str, tuple[torch.Tensor, torch.Tensor]], step: int) -> torch.Tensor:
        """Eq. 12 ``log p [B, P]`` (finite; ``UNAVAILABLE``-level where no modality is available)."""
        eps = exploration_factor(self.eps0, step)
        terms, available = [], []
        for sim, valid in similarities.values():
            row_has = valid.any(1, keepdim=True)  # [B, 1]
            logits = (sim / eps).masked_fill(~valid, UNAVAILABLE)
            terms.append(torch.log_softmax(logits, dim=1).masked_fill(~valid, UNAVAILABLE))
            available.append(row_has)
        stacked = torch.stack(terms)  # [M, B, P]
        row_available = torch.stack(available)  # [M, B, 1]
        stacked = stacked.masked_fill(~row_available, UNAVAILABLE)
        log_p = torch.logsumexp(stacked, dim=0)
        count = row_available.sum(0)  # [B, 1]
        if not self.faithful:
            log_p = log_p - count.clamp_min(1).float().log()
        return torch.where(count > 0, log_p, torch.zeros_like(log_p))  # no modality for the row: uniform

    def sample(self, positives: torch.Tensor, model: KGCModel, step: int) -> Negatives:
        device = positives.device
        batch, n = len(positives), self.num_negatives
        corrupt_head = torch.full((batch,), step % 2 == 1, dtype=torch.bool, device=device)
        candidates = torch.randperm(self.num_entities, generator=self.generator)[: self.presample].to(device)  # [P]
        noise = torch.rand((n, batch, self.presample), generator=self.generator).to(device)
        gumbel = -torch.log(-torch.log(noise.clamp_min(torch.finfo(noise.dtype).tiny)))  # [n, B, P]

        own_entity = torch.where(corrupt_head, positives[:, 0], positives[:, 2])
        own = candidates.unsqueeze(0) == own_entity.unsqueeze(1)  # [B, P]
        known = self.known_positives.corruptions_known(positives, candidates.expand(batch, -1), corrupt_head) | own
        similarities = self.similarities(positives, candidates, corrupt_head, model)
        log_p = self.log_probabilities(similarities, step) if similarities else torch.zeros(known.shape, device=device)
        logits = log_p + LOG_MASK * known  # eq. 13 before the noise
        eligible = ~known
        if similarities:  # a candidate with no available modality is not drawn (p = 0)
            has_any = torch.stack([v for _, v in similarities.values()]).any(0)
            row_any = has_any.any(1, keepdim=True)
            eligible &= has_any | ~row_any
        soft, positions, drawn = [], [], []
        for k in range(n):
            scores = logits + gumbel[k]
            slot_drawn = eligible.any(1)  # [B]
            choice = scores.masked_fill(~eligible, -math.inf).argmax(1)  # [B]
            soft.append(torch.softmax(scores / GUMBEL_TAU, dim=1))
            positions.append(choice)
            drawn.append(slot_drawn)
            hit = F.one_hot(choice, self.presample).bool() & slot_drawn.unsqueeze(1)
            eligible = eligible & ~hit
            logits = logits + LOG_MASK * hit  # without replacement (eq. 13)
        soft_draws = torch.stack(soft, 1)  # [B, n, P]
        position = torch.stack(positions, 1)  # [B, n]
        from_presample = torch.stack(drawn, 1)  # [B, n]
        if not self.kgc_grad_to_sampler:
            soft_draws = soft_draws.detach()
        table = model.entity_representations(candidates)  # [P, d]
        representations = _StraightThroughSelect.apply(soft_draws, position, table)  # [B, n, d]
        ids = candidates[position]
        if not bool(from_presample.all()):
            ids = self._fill_exhausted(positives, corrupt_head, own_entity, ids, ~from_presample)
            plain = model.entity_representations(ids)
            representations = torch.where(from_presample.unsqueeze(-1), representations, plain)
        negatives = Negatives(ids=ids, corrupt_head=corrupt_head, representations=representations)
        self._context = _StepContext(negatives, similarities, known, own, position, from_presample)
        return negatives

    def _fill_exhausted(
        self, positives: torch.Tensor, corrupt_head: torch.Tensor, own: torch.Tensor, ids: torch.Tensor, missing: torch.Tensor
    ) -> torch.Tensor:
        """Fill ``missing [B, n]`` slots with uniform entities that are not known answers nor already drawn."""
        ids = ids.clone()
        for k in range(ids.shape[1]):
            pending = missing[:, k].nonzero().squeeze(1)
            for _ in range(FALLBACK_TRIES):
                if len(pending) == 0:
                    break
                draw = torch.randint(self.num_entities, (len(pending),), generator=self.generator).to(ids.device)
                taken = self.known_positives.corruptions_known(positives[pending], draw.unsqueeze(1), corrupt_head[pending])[:, 0]
                taken |= (draw == own[pending]) | (ids[pending, :k] == draw.unsqueeze(1)).any(1)
                ids[pending[~taken], k] = draw[~taken]
                pending = pending[taken]
            if len(pending):
                raise ConfigError(
                    f"MMRNS: row {int(pending[0])} has fewer than {ids.shape[1]} entities that are not known answers"
                )
        return ids

    # -- contrastive loss ----------------------------------------------------------------
    def auxiliary_loss(
        self, positives: torch.Tensor, negatives: Negatives, negative_scores: torch.Tensor, model: KGCModel
    ) -> torch.Tensor | None:
        """``β L_con`` (eqs. 9-11, 14) for the negatives of the preceding :meth:`sample`; None for ``no_css``."""
        if self.ablation == "no_css":
            return None
        context = self._context
        if context is None or context.negatives is not negatives:
            raise RuntimeError("MMRNSSampler.auxiliary_loss needs the Negatives of the preceding sample() call")
        batch, presample = context.known.shape
        # eq. 9: self-adversarial weights of the drawn candidates, 1/|E| elsewhere (log space).
        log_weight = torch.full((batch, presample), -math.log(self.num_entities), device=negative_scores.device)
        adversarial = torch.log_softmax(self.alpha * negative_scores.detach(), dim=1)  # [B, n]
        rows = torch.arange(batch, device=log_weight.device).unsqueeze(1).expand_as(context.positions)
        log_weight[rows[context.drawn], context.positions[context.drawn]] = adversarial[context.drawn]
        losses = []
        for sim, valid in context.similarities.values():
            positive = context.known & ~context.own & valid
            negative = ~context.known & valid
            logit = log_weight + sim
            if self.faithful:  # pooled over the batch
                positive, negative, logit = positive.reshape(1, -1), negative.reshape(1, -1), logit.reshape(1, -1)
            has_positive = positive.any(1) & negative.any(1)  # [rows]
            if not bool(has_positive.any()):
                continue
            numerator = torch.logsumexp(logit.masked_fill(~positive, UNAVAILABLE * 1e5), dim=1)
            denominator = torch.logsumexp(logit.masked_fill(~negative, UNAVAILABLE * 1e5), dim=1)
            per_row = torch.where(has_positive, denominator - numerator, torch.zeros_like(numerator))
            losses.append(per_row.sum() / has_positive.sum())
        self._context = None  # release the step's tensors
        if not losses:
            return negative_scores.new_zeros(())
        return self.beta * torch.stack(losses).mean()


def _feature_tensors(
    features: Features | None, num_entities: int, default_shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [E, T, D], mask [E])`` of a feature cache, or all-missing zeros (a broadcast view, no memory)."""
    if features is None:
        missing = torch.zeros(num_entities, dtype=torch.bool)
        return torch.zeros(1, *default_shape).expand(num_entities, *default_shape), missing
    values = torch.from_numpy(np.array(features.values))  # read the memory map into memory (stored dtype)
    return values, torch.from_numpy(np.asarray(features.mask, dtype=bool))
