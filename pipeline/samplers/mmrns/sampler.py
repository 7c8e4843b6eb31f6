"""MMRNS: relation-enhanced multimodal negative sampling (Xu et al., ACM MM 2022, section 3).

Shapes: ``B`` batch, ``P`` pre-sampled candidates, ``n`` negatives per positive, ``G``
distinct relations in the batch, ``d`` entity width, ``a`` attention width (50).

Per training step (``step`` 0-based):

1. Pre-sample (sec. 4.3.2): one uniform set of ``P`` candidates shared by the batch (the
   paper only says "we randomly sample a subset of entities first"; the script shares it,
   and sharing lets every per-candidate computation run once). ``P = ceil(|E|/10)`` by
   default (``presample_scope: relation``, a variant: one pool per relation group, below).
   Even steps corrupt tails, odd steps heads (the script alternates batches).
2. Representations of the candidates and of each row's *positive entity* (the entity
   being replaced: the tail for tail corruption, the head for head corruption): KCA
   (eqs. 1-6, :mod:`~pipeline.samplers.mmrns.kca`) for image and text, encoded once for
   candidates and positives together, and the structural branch (eq. 7,
   :mod:`~pipeline.samplers.mmrns.structure`) on the KGC model's own representations.
   Everything relation-gated depends only on (relation, candidate), so it is computed once
   per distinct relation of the batch (``[G, P, .]``) and compared with each row's positive
   by relation group (:mod:`~pipeline.samplers.mmrns.groups`): never ``[B, P, 24, a]`` or
   ``[B, P, d]``.
3. Cosine similarities (eq. 8, δ = 1e-8) of every candidate to the row's positive, per
   modality: ``[B, P]`` matrices.
4. Sampling log-probabilities (eq. 12): ``log p = log(sum_m softmax(sim_m / ϵ) / M)``,
   ``ϵ = ϵ0 / (1 + ln(iter))`` with ``iter = step + 1`` (eq. 15; step 0 uses ϵ0).
5. Masked Gumbel-softmax (eq. 13, :mod:`~pipeline.samplers.mmrns.draws`): ``log mask =
   ln(1e-38)`` at the row's known TRAIN answers among the candidates (the sorted-key
   :class:`~pipeline.samplers.known_positives.KnownPositives` index, no dense ``[B, |E|]``
   mask) and at the positive entity itself; ``n`` straight-through draws without
   replacement, τ = 1. A known positive is never drawn, even when ``ln(1e-38)`` would not
   outweigh the noise. The negatives' representations are ``one_hot @ E[candidates]``
   (a gather with the matching backward), so the KGC loss reaches the sampler.
6. Contrastive loss (eqs. 9-11, :mod:`~pipeline.samplers.mmrns.contrastive`) in
   :meth:`MMRNSSampler.auxiliary_loss`, returned as ``β L_con`` (eq. 14: the loop adds it
   to ``L_kgc``).

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
  zero *image* is never compared as content. Padding sentences are zero, as in the script.

``faithful: true`` reproduces the released script where it departs from the paper:

- eq. 10: positives and negatives are pooled over the whole batch (one ratio per
  modality) instead of one ratio per row, and the row's own entity counts as a positive;
- eq. 12: the mixture is the unnormalised sum of the modality softmaxes instead of their
  mean (a constant shift of every row's ``log p``: same draws, same straight-through ``y``);
- eq. 6: on the positive's path the text-guided *visual* branch (1) is not
  layer-normalised (text is);
- eq. 8: the norms in the cosine are constants for the gradient, δ = 1e-10;
- eq. 9: the drawn candidates' weights are ``softmax(α s) / |E|``;
- the pre-sample is shared by the batch in both modes.

Ablations (sec. 4.6): ``no_kca``: image and text similarities are cosines of one Linear
of the token-averaged raw features (no cross-modal attention; KCA parameters do not
exist); ``no_css``: the contrastive loss is dropped (:meth:`auxiliary_loss` returns
None), the sampler learns from the KGC loss only; ``no_rel``: no relation gates (the gated
branches use ``M`` itself) and no relation in eq. 7, so every representation is
relation-free. ``modalities`` switches structure / text / image similarities on or off.

Variants (not in the paper; each a key of ``sampler.mmrns``; the constructor's defaults are the
paper's, params.yaml's are the best configuration found on VALID: ``none``, score similarity,
eps0 10, warm start 6000):

- ``kgc_gradient``: ``minimise`` (published: the KGC loss trains the sampler through the
  straight-through sample, which favours *easy* negatives), ``none`` (the sampler learns
  from the contrastive loss only; the draws need no gradient and use Gumbel-top-k),
  ``maximise`` (gradient reversal through the straight-through path: the sampler ascends
  the KGC loss, i.e. learns toward negatives the model scores high; the model's
  representations are detached inside the sampler, so the reversed gradient never trains
  the model).
- ``uniform_mix`` λ: ``p' = (1 - λ) p + λ / P`` before the mask.
- ``score_similarity``: the model's own (detached) score of each candidate for the row's
  query, standardised per row, as one more similarity in eq. 12.
- ``contrastive_temperature`` T (eq. 10 ``exp(sim / T)``) and ``contrastive_weights``
  (``paper`` | ``script``, eq. 9).
- ``presample_scope``: ``batch`` (the paper: one pre-sample shared by the batch) or
  ``relation``: one uniform pool per relation group of the batch, ``P_g = max(presample_min,
  ceil(P s_g / B))`` entities for a group of ``s_g`` rows, each candidate represented under its
  pool's relation only (:mod:`~pipeline.samplers.mmrns.pools`): the relation-gated work is
  ``sum_g P_g`` pairs instead of ``G P``, and the groups' negatives come from different pools.
- ``warm_start`` k: the first k steps draw uniform negatives from the whole graph (head or
  tail 50/50 per row, as the Uniform sampler) and train no sampler parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.autograd.profiler import record_function

from pipeline.errors import ConfigError
from pipeline.features import Features
from pipeline.graph import KnowledgeGraph
from pipeline.models.base import KGCModel
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives
from pipeline.samplers.known_positives import KnownPositives
from pipeline.samplers.mmrns.contrastive import WEIGHTS, contrastive_loss, contrastive_weights
from pipeline.samplers.mmrns.draws import LOG_MASK, Draws, gumbel_noise, gumbel_top_k, straight_through_sample
from pipeline.samplers.mmrns.groups import CosineForm, RowGroups, grouped_cosine, relation_groups
from pipeline.samplers.mmrns.kca import CrossModalAttention, Encoded
from pipeline.samplers.mmrns.pools import RelationPools
from pipeline.samplers.mmrns.structure import StructuralGate

MODALITIES = ("structure", "text", "image")
ABLATIONS = ("none", "no_kca", "no_css", "no_rel")
KGC_GRADIENTS = ("minimise", "none", "maximise")
SCOPES = ("batch", "relation")
FALLBACK_TRIES = 1000
UNAVAILABLE = -1e4  # finite "log 0" for a modality a candidate lacks (keeps gradients NaN-free)
CHUNK_ELEMENTS = 2**21  # [groups, P, width] elements per chunk of relation groups (stays in cache)
SCRIPT_COSINE = CosineForm(delta=1e-10, norm_gradient=False)


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


def relation_vectors(model: KGCModel, ids: torch.Tensor) -> torch.Tensor:
    """``[R, d_r]``: the model's relation representations of ``ids [R]`` as flat real vectors
    (GC-OTE's are ``[K, s, s + 1]`` blocks; complex ones are split into real and imaginary parts)."""
    relations = model.relation_representations(ids)
    if relations.is_complex():
        relations = torch.view_as_real(relations)
    return relations.reshape(len(ids), -1)


@dataclass
class _StepContext:
    """What :meth:`MMRNSSampler.auxiliary_loss` needs from the preceding :meth:`sample`."""

    negatives: Negatives
    similarities: dict[str, tuple[torch.Tensor, torch.Tensor]]  # modality -> (sim [B, P], valid [B, P])
    known: torch.Tensor  # [B, P] bool: known TRAIN answer of the row's query (or the row's own entity)
    own: torch.Tensor  # [B, P] bool: the candidate is the row's own positive entity
    draws: Draws


@dataclass
class _CandidateEncoding:
    """The pre-sample's relation-free KCA encode, shared by the :meth:`MMRNSSampler.similarities`
    calls of one step over different rows."""

    encoded: Encoded | None = None


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
        kgc_gradient: str = "minimise",
        uniform_mix: float = 0.0,
        score_similarity: bool = False,
        contrastive_temperature: float = 1.0,
        contrastive_weights: str = "paper",
        warm_start: int = 0,
        presample_scope: str = "batch",
        presample_min: int = 50,
    ):
        """Features: ``text_features [E, Tt, D_t]``, ``visual_features [E, Ti, D_i]`` (any float
        dtype, kept as given; zeros where the mask is False), masks ``[E]`` bool."""
        super().__init__(graph, num_negatives, seed)
        for key, value, allowed in (
            ("ablation", ablation, ABLATIONS), ("kgc_gradient", kgc_gradient, KGC_GRADIENTS),
            ("contrastive_weights", contrastive_weights, WEIGHTS), ("presample_scope", presample_scope, SCOPES),
        ):
            if value not in allowed:
                raise ConfigError(f"sampler.mmrns.{key} must be one of {', '.join(allowed)}, got {value!r}")
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ConfigError(f"sampler.mmrns.modalities must be a non-empty subset of {list(MODALITIES)}, got {modalities!r}")
        for name, values, mask in (("text", text_features, text_mask), ("visual", visual_features, visual_mask)):
            if values.dim() != 3 or values.shape[0] != graph.num_entities or mask.shape != (graph.num_entities,):
                raise ConfigError(
                    f"{name} features must be [E={graph.num_entities}, T, D] with a mask [E], "
                    f"got {tuple(values.shape)} and {tuple(mask.shape)}"
                )
        if not (eps0 > 0 and beta >= 0 and adversarial_temperature > 0 and contrastive_temperature > 0):
            raise ConfigError(
                "sampler.mmrns: need eps0 > 0, beta >= 0, adversarial_temperature > 0, contrastive_temperature > 0; "
                f"got {eps0}, {beta}, {adversarial_temperature}, {contrastive_temperature}"
            )
        if not 0 <= uniform_mix <= 1 or not (isinstance(warm_start, int) and warm_start >= 0):
            raise ConfigError(f"sampler.mmrns: need 0 <= uniform_mix <= 1 and an integer warm_start >= 0; got {uniform_mix}, {warm_start!r}")
        self.presample = presample_count(presample_size, graph.num_entities)
        if self.presample < num_negatives:
            raise ConfigError(f"sampler.mmrns.presample_size gives {self.presample} candidates < {num_negatives} negatives")
        if presample_scope == "relation" and (faithful or not (isinstance(presample_min, int) and 1 <= presample_min)):
            raise ConfigError(
                "sampler.mmrns.presample_scope: relation needs faithful: false (the script shares one pre-sample) "
                f"and an integer presample_min >= 1; got faithful {faithful}, presample_min {presample_min!r}"
            )
        self.presample_scope, self.presample_min = presample_scope, presample_min
        self.eps0, self.beta, self.alpha = float(eps0), float(beta), float(adversarial_temperature)
        self.faithful, self.ablation, self.kgc_gradient = bool(faithful), ablation, kgc_gradient
        self.uniform_mix, self.score_similarity, self.warm_start = float(uniform_mix), bool(score_similarity), warm_start
        self.contrastive_temperature, self.contrastive_weights = float(contrastive_temperature), contrastive_weights
        self.cosine_form = SCRIPT_COSINE if self.faithful else CosineForm()
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
        self.structure = StructuralGate(entity_dim, relation_in, structure_hidden)
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
        self.groups_per_chunk = max(1, CHUNK_ELEMENTS // (self.presample * max(entity_dim, structure_hidden)))
        self._context: _StepContext | None = None
        self._warm_negatives: Negatives | None = None  # the last warm-start step's draws (no sampler loss)

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
            "faithful", "ablation", "modalities", "kgc_gradient", "uniform_mix", "score_similarity",
            "contrastive_temperature", "contrastive_weights", "warm_start", "presample_scope", "presample_min",
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
        self, positives: torch.Tensor, candidates: torch.Tensor | RelationPools, corrupt_head: torch.Tensor,
        model: KGCModel, shared: _CandidateEncoding | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Eq. 8 per active modality: ``(sim [B, W], valid [B, W])`` of each candidate to the row's
        positive, for ``candidates [P]`` shared by the rows (``W = P``) or the rows' relation pools
        (``W`` their padded width; padding is not valid).

        ``shared``: holds the candidates' relation-free KCA encode between calls over the same
        candidates (filled by the first call, reused by the next)."""
        own = torch.where(corrupt_head, positives[:, 0], positives[:, 2])  # [B]
        pools = candidates if isinstance(candidates, RelationPools) else None
        if pools is not None:
            relation_ids, groups = pools.relation_ids, pools.groups
        elif self.uses_relation:
            relation_ids, groups = relation_groups(positives[:, 1], self.groups_per_chunk)  # [G], rows by group
        else:
            relation_ids, groups = positives[:1, 1], RowGroups.single(len(own), own.device)
        relations = relation_vectors(model, relation_ids)  # [G, d_r]
        if self.kgc_gradient == "maximise":  # the reversed gradient must not train the model
            relations = relations.detach()
        gates_for = relations if self.uses_relation else None
        row_relations = relations[groups.group] if self.uses_relation else None  # [B, d_r]
        ids = candidates if pools is None else pools.ids  # [P] or [S]
        row_ids = candidates.unsqueeze(0) if pools is None else pools.row_ids  # [1, P] or [B, W]
        slots = torch.ones_like(row_ids, dtype=torch.bool) if pools is None else pools.row_valid
        result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if "structure" in self.modalities:
            with record_function("mmrns.structure"):
                entities = model.entity_representations(torch.cat([ids, own]))
                if self.kgc_gradient == "maximise":
                    entities = entities.detach()
                table, mine = entities.split([len(ids), len(own)])  # [P or S, d], [B, d]
                queries = self.structure.paired(mine, row_relations)
                if pools is None:
                    sim = self.structure.cosine(table, gates_for, queries, groups, self.cosine_form)
                else:  # each candidate under its own pool's relation only
                    paired = self.structure.paired(table, None if gates_for is None else gates_for[pools.pool])
                    sim = grouped_cosine(pools.pad(paired), queries, groups, self.cosine_form)
                result["structure"] = (sim, slots.expand_as(sim))
        wanted = {m: m in self.modalities for m in ("text", "image")}
        if any(wanted.values()):
            sims = self._multimodal(ids, own, gates_for, row_relations, groups, pools, shared or _CandidateEncoding(), **wanted)
            for modality, mask in (("text", self.text_mask), ("image", self.visual_mask)):
                if sims[modality] is not None:
                    valid = mask[own].unsqueeze(1) & mask[row_ids] & slots  # [B, W]
                    result[modality] = (sims[modality], valid)
        if self.score_similarity:
            scores = self._score_similarity(positives, row_ids, slots, corrupt_head, model)
            result["score"] = (scores, slots.expand_as(scores))
        return result

    def _contrastive_rows_with_grad(
        self, positives: torch.Tensor, candidates: torch.Tensor | RelationPools, corrupt_head: torch.Tensor,
        model: KGCModel, rows: torch.Tensor,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`similarities` of every row, differentiable only in ``rows [B]`` (bool). A shared
        pre-sample is encoded once (with autograd) for both sets of rows; relation pools are split
        by pool: the pools of ``rows`` with autograd (all their rows), the others without."""
        if not (torch.is_grad_enabled() and bool(rows.any())):
            with torch.no_grad():
                return self.similarities(positives, candidates, corrupt_head, model)
        pools = candidates if isinstance(candidates, RelationPools) else None
        if pools is not None:  # whole pools: no candidate is encoded in both calls
            group = pools.groups.group
            rows = torch.zeros(pools.groups.num_groups, dtype=torch.bool, device=rows.device).index_fill_(0, group[rows], True)[group]
        index, rest = rows.nonzero().squeeze(1), (~rows).nonzero().squeeze(1)
        for_rows = (lambda r: candidates) if pools is None else (lambda r: pools.select(r, self.groups_per_chunk))  # noqa: E731
        shared = _CandidateEncoding() if pools is None else None  # pools: each call encodes its own candidates
        result = self.similarities(positives[index], for_rows(index), corrupt_head[index], model, shared)
        if len(rest) == 0:
            return result
        with torch.no_grad():
            others = self.similarities(positives[rest], for_rows(rest), corrupt_head[rest], model, shared)
        width = candidates.width if pools is not None else len(candidates)
        merged = {}
        for name, (sim, valid) in result.items():
            other_sim, other_valid = others[name]
            full_sim = sim.new_zeros(len(rows), width)
            full_sim[rest, : other_sim.shape[1]] = other_sim
            full_sim = full_sim.index_put((index.unsqueeze(1), torch.arange(sim.shape[1], device=sim.device)), sim)
            full_valid = valid.new_zeros(len(rows), width)
            full_valid[rest, : other_valid.shape[1]] = other_valid
            full_valid[index, : valid.shape[1]] = valid
            merged[name] = (full_sim, full_valid)
        return merged

    def _multimodal(
        self, candidates: torch.Tensor, own: torch.Tensor, relations: torch.Tensor | None, row_relations: torch.Tensor | None,
        groups: RowGroups, pools: RelationPools | None, shared: _CandidateEncoding, *, text: bool, image: bool,
    ) -> dict[str, torch.Tensor | None]:
        """Eq. 8 ``[B, W]`` for ``image`` and ``text`` (None where switched off): KCA of the candidates
        ``[P]`` under each row's relation (``pools``: ``[S]``, each under its pool's relation)
        against KCA of the row's own entity under it."""
        arrange = (lambda x: x.reshape(1, -1, x.shape[-1])) if pools is None else (lambda x: pools.pad(x.reshape(-1, x.shape[-1])))
        cosine = lambda cand, mine: None if mine is None else grouped_cosine(arrange(cand), mine, groups, self.cosine_form)  # noqa: E731
        if self.kca is None:  # no_kca: one Linear of the token-averaged features, relation-free
            entities = torch.cat([candidates, own])
            visual, words = self.visual_features[entities].float(), self.text_features[entities].float()  # [P + B, T, D]
            result = {}
            for name, wanted, layer, values in (("image", image, self.visual_pooled, visual), ("text", text, self.text_pooled, words)):
                pooled_candidates, pooled_own = layer(values.mean(1)).split([len(candidates), len(own)]) if wanted else (None, None)
                result[name] = cosine(pooled_candidates, pooled_own)
            return result
        with record_function("mmrns.encode"):
            if shared.encoded is None:  # one encode (one backward node) for candidates and own entities
                shared.encoded, encoded_own = self.encode(torch.cat([candidates, own])).split(len(candidates))
            else:
                encoded_own = self.encode(own)
            encoded_candidates = shared.encoded
        with record_function("mmrns.gated"):
            own_image, own_text = self.kca(
                encoded_own, self.kca.gates(row_relations), paired=True, visual=image, text=text,
                normalise_visual_plain=not self.faithful,
            )
            if relations is None or pools is not None:  # relation-free [1, P, a], or each pool candidate under its relation [S, a]
                gates = None if relations is None else tuple(g[pools.pool] for g in self.kca.gates(relations))
                candidate_image, candidate_text = self.kca(encoded_candidates, gates, paired=gates is not None, visual=image, text=text)
                return {"image": cosine(candidate_image, own_image), "text": cosine(candidate_text, own_text)}
            sim_image, sim_text = self.kca.candidate_cosine(
                encoded_candidates, self.kca.gates(relations), (own_image, own_text), groups, self.cosine_form
            )
        return {"image": sim_image, "text": sim_text}

    def encode(self, entities: torch.Tensor) -> Encoded:
        """KCA's relation-free part (eqs. 1-2) for ``entities [N]``."""
        return self.kca.encode(entities, self.visual_features, self.text_features, self.visual_mask)

    @torch.no_grad()
    def _score_similarity(
        self, positives: torch.Tensor, row_ids: torch.Tensor, slots: torch.Tensor, corrupt_head: torch.Tensor,
        model: KGCModel,
    ) -> torch.Tensor:
        """``[B, W]``: the model's score of each candidate (``row_ids [1 or B, W]``) in the corrupted
        slot, standardised per row over its pre-sample (``slots [., W]``: not padding)."""
        side = "head" if bool(corrupt_head[0]) else "tail"  # one side per step
        scores = model.score_all(positives, side)
        scores, slots = scores.gather(1, row_ids.expand(len(scores), -1)), slots.expand(len(scores), -1)
        count = slots.sum(1, keepdim=True)
        mean = (scores * slots).sum(1, keepdim=True) / count
        spread = (((scores - mean) * slots).square().sum(1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
        return ((scores - mean) / spread.clamp_min(1e-6)).masked_fill(~slots, 0)

    # -- sampling --------------------------------------------------------------------------
    def log_probabilities(self, similarities: dict[str, tuple[torch.Tensor, torch.Tensor]], step: int) -> torch.Tensor:
        """Eq. 12 ``log p [B, P]`` (finite; ``UNAVAILABLE``-level where no modality is available),
        mixed with ``uniform_mix`` of the uniform distribution over the pre-sample."""
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
        log_p = torch.where(count > 0, log_p, torch.zeros_like(log_p))  # no modality for the row: uniform
        if self.uniform_mix > 0:  # p' = (1 - λ) p + λ / P
            uniform = torch.full_like(log_p, math.log(self.uniform_mix / log_p.shape[1]))
            log_p = uniform if self.uniform_mix == 1 else torch.logaddexp(log_p + math.log1p(-self.uniform_mix), uniform)
        return log_p

    def sample(self, positives: torch.Tensor, model: KGCModel, step: int) -> Negatives:
        if step < self.warm_start:
            return self._uniform(positives)
        device = positives.device
        batch, n = len(positives), self.num_negatives
        corrupt_head = torch.full((batch,), step % 2 == 1, dtype=torch.bool, device=device)
        own_entity = torch.where(corrupt_head, positives[:, 0], positives[:, 2])
        straight_through = self.kgc_gradient != "none"
        if self.presample_scope == "relation":
            candidates = pools = RelationPools.draw(
                positives[:, 1], self.presample, self.presample_min, self.num_entities, self.generator, self.groups_per_chunk
            )
            row_ids, slots = pools.row_ids, pools.row_valid  # [B, W]
            own = (row_ids == own_entity.unsqueeze(1)) & slots
            known = (self.known_positives.corruptions_known(positives, row_ids, corrupt_head) & slots) | own
        else:
            candidates = torch.randperm(self.num_entities, generator=self.generator)[: self.presample].to(device)  # [P]
            row_ids, slots = candidates.unsqueeze(0), None
            own = row_ids == own_entity.unsqueeze(1)  # [B, P]
            known = self.known_positives.answers_among(positives, candidates, corrupt_head) | own
        noise = gumbel_noise((n, batch, row_ids.shape[1]), self.generator, device) if straight_through else None
        if straight_through or self.faithful:
            similarities = self.similarities(positives, candidates, corrupt_head, model)
        else:  # only rows with a contrastive positive give the sampler a gradient: the rest without autograd
            similarities = self._contrastive_rows_with_grad(positives, candidates, corrupt_head, model, (known & ~own).any(1))
        with record_function("mmrns.draws"):
            log_p = self.log_probabilities(similarities, step) if similarities else torch.zeros(known.shape, device=device)
            logits = log_p + LOG_MASK * known  # eq. 13 before the noise
            eligible = ~known if slots is None else ~known & slots
            if similarities:  # a candidate with no available modality is not drawn (p = 0)
                has_any = torch.stack([v for _, v in similarities.values()]).any(0)
                row_any = has_any.any(1, keepdim=True)
                eligible &= has_any | ~row_any
            if straight_through:
                sign = -1.0 if self.kgc_gradient == "maximise" else 1.0
                table, rows = self._candidate_table(model, candidates, batch)
                representations, draws = straight_through_sample(logits, eligible, noise, table, rows, sign)  # [B, n, d]
            else:
                draws = gumbel_top_k(logits, eligible, n, self.generator)
                representations = None
        ids = row_ids.expand(batch, -1).gather(1, draws.positions)
        if not bool(draws.drawn.all()):
            ids = self._fill_exhausted(positives, corrupt_head, own_entity, ids, ~draws.drawn)
            if representations is not None:
                plain = model.entity_representations(ids)
                representations = torch.where(draws.drawn.unsqueeze(-1), representations, plain)
        negatives = Negatives(ids=ids, corrupt_head=corrupt_head, representations=representations)
        self._context = _StepContext(negatives, similarities, known, own, draws)
        return negatives

    def _candidate_table(self, model: KGCModel, candidates: torch.Tensor | RelationPools, batch: int) -> tuple[torch.Tensor, RowGroups]:
        """The model's representations of the pre-sample ``[Q, W, d]`` (``Q = 1``: shared) and the
        ``batch`` rows grouped by the pre-sample they draw from."""
        if isinstance(candidates, RelationPools):
            return candidates.pad(model.entity_representations(candidates.ids)), candidates.groups
        return model.entity_representations(candidates).unsqueeze(0), RowGroups.single(batch, candidates.device)

    def _uniform(self, positives: torch.Tensor) -> Negatives:
        """Warm start: uniform entities, head or tail 50/50 per row (the Uniform sampler's draws)."""
        batch = len(positives)
        corrupt_head = (torch.rand(batch, generator=self.generator) < 0.5).to(positives.device)
        ids = torch.randint(self.num_entities, (batch, self.num_negatives), generator=self.generator).to(positives.device)
        self._context = None
        self._warm_negatives = Negatives(ids=ids, corrupt_head=corrupt_head)
        return self._warm_negatives

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
        """``β L_con`` (eqs. 9-11, 14) for the negatives of the preceding :meth:`sample`; None for
        ``no_css`` and for warm-start steps."""
        context = self._context
        if self.ablation == "no_css" or negatives is self._warm_negatives:
            self._context = self._warm_negatives = None
            return None
        if context is None or context.negatives is not negatives:
            raise RuntimeError("MMRNSSampler.auxiliary_loss needs the Negatives of the preceding sample() call")
        batch, presample = context.known.shape
        weights = "script" if self.faithful else self.contrastive_weights
        log_weight = contrastive_weights(
            negative_scores, context.draws.positions, context.draws.drawn, presample, self.num_entities, self.alpha, weights,
        )
        own = torch.zeros_like(context.own) if self.faithful else context.own  # the script counts the own entity
        terms = [value for name, value in context.similarities.items() if name != "score"]
        loss = contrastive_loss(terms, context.known, own, log_weight, self.contrastive_temperature, pooled=self.faithful)
        self._context = None  # release the step's tensors
        return negative_scores.new_zeros(()) if loss is None else self.beta * loss


def _feature_tensors(
    features: Features | None, num_entities: int, default_shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [E, T, D], mask [E])`` of a feature cache, or all-missing zeros (a broadcast view, no memory)."""
    if features is None or not np.any(features.mask):  # nothing to read: no [E, T, D] zeros in memory
        shape = default_shape if features is None else tuple(features.values.shape[1:])
        missing = torch.zeros(num_entities, dtype=torch.bool)
        return torch.zeros(1, *shape).expand(num_entities, *shape), missing
    values = torch.from_numpy(np.array(features.values))  # read the memory map into memory (stored dtype)
    return values, torch.from_numpy(np.asarray(features.mask, dtype=bool))
