"""Knowledge-guided cross-modal attention (KCA, paper section 3.2, eqs. 1-6).

Shapes: ``N`` entities, ``Ti = 24`` image tokens, ``Tt = 4`` text sentences, ``a`` the
attention width (50), ``R`` relations, ``d_r`` the relation representation width.

Per entity (eqs. 1-2)::

    ê_i = LeakyReLU_0.1(e_i W_i + b_i)   [Ti, a]      ê_t = LeakyReLU_0.1(e_t W_t + b_t)   [Tt, a]
    M   = ê_i ê_t^T                                    [Ti, Tt]

Per relation ``r`` (eq. 5): gates ``g_i = sigmoid(r W_i^r + b_i^r)`` and
``g_t = sigmoid(r W_t^r + b_t^r)``, each reshaped ``[Ti, Tt]``. The four branches:

1. text-guided visual (eq. 3):       ``softmax(M^T, over Ti) ê_i``   ``[Tt, a]``
2. relation-text-guided visual (4):  ``(M ⊙ g_i)^T ê_i``             ``[Tt, a]`` (no softmax, as eq. 4)
3. relation-image-guided textual:    ``(M ⊙ g_t) ê_t``               ``[Ti, a]``
4. image-guided textual:             ``softmax(M, over Tt) ê_t``     ``[Ti, a]``

and (eq. 6) ``e_kca^i = Norm(1) + Norm(2)``, ``e_kca^t = Norm(4) + Norm(3)``. Not in the
paper, from the released script: one LayerNorm(a) shared by all branches, and each
modality's ``[K, a]`` result is flattened and mapped by a Linear(K a, a) to one vector
``[a]`` per entity (K = Tt for the visual, Ti for the textual representation), so the
cosine of eq. 8 compares vectors.

Every branch is ``Linear(flatten(LayerNorm(C ê)))`` for a coefficient matrix ``C [K, J]``
over ``J`` tokens ``ê [J, a]``. Because row ``k`` of ``C ê`` is a combination of the ``J``
token vectors, LayerNorm and the Linear factor through per-entity quantities (``ê^c``: the
tokens centred over their ``a`` features, ``γ, β``: LayerNorm's affine, ``W_k [a, a]``: the
Linear's block for slot ``k``)::

    mean_k = sum_j C_kj mean(ê_j)        var_k = C_k^T S C_k,   S = ê^c ê^c^T / a   [J, J]
    Linear(flatten(LN(C ê))) = sum_{k,j} C_kj / sqrt(var_k + ϵ_LN) · U_jk + sum_k W_k β + bias,
    U_jk = (ê^c_j ⊙ γ) W_k                                                           [J, K, a]

So the relation-gated branches of every candidate under every relation of a batch
(:meth:`CrossModalAttention.candidate_cosine`), whose coefficients ``C`` depend on (relation,
entity), cost ``[R, N, K, J]`` (96 numbers per pair) instead of ``[R, N, K, a]``; ``S`` and
``U`` are computed once per entity. This is the same mathematics as the direct form (tested
against it) and what makes per-relation evaluation over a 1500-entity pre-sample cheap. An
entity under one relation (:meth:`CrossModalAttention.forward`) and the relation-free branch take
the direct form ``Linear(flatten(LN(C ê)))``, cheaper than ``U`` alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.samplers.mmrns.groups import CosineForm, RowGroups, cosine_backward, norm_gradient

LEAKY_SLOPE = 0.1
#: Coefficients ``[n, G, K J]`` per chunk of entities in :func:`gated_cosine` (about 1 MB: in cache).
GATED_CHUNK_ELEMENTS = 2**18
#: Feature values per chunk of rows in :func:`gathered_linear` (8 MiB at float32).
GATHER_CHUNK_ELEMENTS = 2**21


@dataclass(frozen=True)
class TokenFactors:
    """Per-entity factors of ``Linear(flatten(LayerNorm(C ê)))`` for one modality's output."""

    gram: torch.Tensor  # [N, J, J] S = ê^c ê^c^T / a
    normalised: torch.Tensor  # [N, J, K, a] U with the LayerNorm scale γ (centred tokens)


@dataclass(frozen=True)
class Encoded:
    """Relation-free part of KCA (eqs. 1-2) for ``N`` entities."""

    cross: torch.Tensor  # [N, Ti, Tt] M
    image: torch.Tensor  # [N, Ti, a] ê_i
    words: torch.Tensor  # [N, Tt, a] ê_t

    def split(self, count: int) -> tuple[Encoded, Encoded]:
        """The first ``count`` entities and the rest (``split``: one backward node per tensor)."""
        parts = [x.split([count, len(x) - count]) for x in (self.cross, self.image, self.words)]
        return Encoded(*(part[0] for part in parts)), Encoded(*(part[1] for part in parts))


class CrossModalAttention(nn.Module):
    """KCA for one (image, text) pair per entity, optionally guided by relation gates."""

    def __init__(
        self,
        visual_shape: tuple[int, int],
        text_shape: tuple[int, int],
        relation_dim: int | None,
        attention_dim: int = 50,
    ):
        """``visual_shape = (Ti, D_i)``, ``text_shape = (Tt, D_t)``; ``relation_dim=None`` removes the gates (no_rel)."""
        super().__init__()
        (self.image_tokens, visual_dim), (self.text_tokens, text_dim) = visual_shape, text_shape
        self.attention_dim = attention_dim
        self.visual_projection = nn.Linear(visual_dim, attention_dim)  # eq. 1, W_i
        self.text_projection = nn.Linear(text_dim, attention_dim)  # eq. 1, W_t
        pairs = self.image_tokens * self.text_tokens
        self.visual_gate = nn.Linear(relation_dim, pairs) if relation_dim else None  # eq. 5, W_i^r
        self.text_gate = nn.Linear(relation_dim, pairs) if relation_dim else None  # eq. 5, W_t^r
        self.norm = nn.LayerNorm(attention_dim)  # eq. 6, shared (script)
        self.visual_output = nn.Linear(self.text_tokens * attention_dim, attention_dim)
        self.text_output = nn.Linear(self.image_tokens * attention_dim, attention_dim)

    def encode(self, entities: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, has_image: torch.Tensor) -> Encoded:
        """Eqs. 1-2 for ``entities [N]``, rows of the feature tables ``visual [E, Ti, D_i]`` and
        ``text [E, Tt, D_t]`` (stored dtype; :func:`gathered_linear` casts a chunk at a time).
        Entities without an image (``has_image [E]`` False) have zero image features, whose
        projection is the bias (not computed)."""
        bias = self.visual_projection.bias
        with_image = has_image[entities]  # [N]
        projected = bias.expand(len(entities), self.image_tokens, len(bias))  # [N, Ti, a]
        if bool(with_image.any()):
            projected = projected.index_put((with_image,), gathered_linear(visual, entities[with_image], self.visual_projection))
        image = F.leaky_relu(projected, LEAKY_SLOPE)  # [N, Ti, a]
        words = F.leaky_relu(gathered_linear(text, entities, self.text_projection), LEAKY_SLOPE)  # [N, Tt, a]
        return Encoded(image @ words.transpose(1, 2), image, words)

    def _factors(self, tokens: torch.Tensor, output: nn.Linear) -> TokenFactors:
        """Factors for ``tokens [N, J, a]`` and the output Linear(K a, a)."""
        blocks = output.weight.view(self.attention_dim, -1, self.attention_dim)  # [a_out, K, a]
        centred = tokens - tokens.mean(-1, keepdim=True)
        gram = centred @ centred.transpose(1, 2) / self.attention_dim  # [N, J, J]
        normalised = torch.einsum("nja,oka->njko", centred * self.norm.weight, blocks)
        return TokenFactors(gram, normalised)

    def _gated_inputs(self, factors: TokenFactors, cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entity inputs of the relation-gated branch for ``cross [N, K, J]`` (slot-major M):
        ``Q [N, K, J, J]`` with ``Q_kjl = M_kj M_kl S_jl`` (the LayerNorm variance is ``g_k^T Q_k g_k``)
        and ``V [N, K J, a]`` with ``V_kj = M_kj U_jk`` (the output is ``sum_kj g_kj / sqrt(var_k) V_kj``)."""
        entities, slots, tokens = cross.shape
        quadratic = cross.unsqueeze(-1) * cross.unsqueeze(-2) * factors.gram.unsqueeze(1)  # [N, K, J, J]
        weighted = (cross.unsqueeze(-1) * factors.normalised.transpose(1, 2)).reshape(entities, slots * tokens, -1)
        return quadratic, weighted

    def _shift(self, output: nn.Linear) -> torch.Tensor:
        """``sum_k W_k β`` ``[a]``: what the LayerNorm shift β of one branch adds to the output."""
        return torch.einsum("oka,a->o", output.weight.view(self.attention_dim, -1, self.attention_dim), self.norm.bias)

    def gates(self, relations: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Eq. 5 gates ``(g_i, g_t)``, each ``[R, Ti, Tt]``, for ``relations [R, d_r]``; None without relation."""
        if self.visual_gate is None or relations is None:
            return None
        shape = (-1, self.image_tokens, self.text_tokens)
        return torch.sigmoid(self.visual_gate(relations)).view(shape), torch.sigmoid(self.text_gate(relations)).view(shape)

    def candidate_cosine(
        self,
        encoded: Encoded,
        gates: tuple[torch.Tensor, torch.Tensor],
        queries: tuple[torch.Tensor | None, torch.Tensor | None],
        groups: RowGroups,
        form: CosineForm,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Eq. 8 ``[B, N]`` for image and text: every candidate of ``encoded`` (``N``) under the
        relation of each row's group (``gates`` ``[G, Ti, Tt]`` each) against the row's own
        representation (``queries``: ``[B, a]`` or None for a modality switched off)."""
        cross = encoded.cross  # [N, Ti, Tt]
        outputs = []
        for query, tokens, output, slot_cross, slot_gate in (
            (queries[0], encoded.image, self.visual_output, cross.transpose(1, 2), gates[0].transpose(-1, -2)),
            (queries[1], encoded.words, self.text_output, cross, gates[1]),
        ):
            if query is None:
                outputs.append(None)
                continue
            base = output(self.norm(slot_cross.softmax(-1) @ tokens).flatten(-2)) + self._shift(output)  # [N, a]: plain branch, bias, gated β
            factors = self._factors(tokens, output)
            quadratic, weighted = self._gated_inputs(factors, slot_cross)
            outputs.append(gated_cosine(quadratic, weighted, slot_gate, base, query, groups, form, self.norm.eps))
        return outputs[0], outputs[1]

    def forward(
        self,
        encoded: Encoded,
        gates: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        paired: bool,
        visual: bool = True,
        text: bool = True,
        normalise_visual_plain: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Eq. 6 visual and textual representations.

        ``gates`` from :meth:`gates`. ``paired=False``: every entity under every relation,
        outputs ``[R, N, a]`` (``R = 1`` without gates; with gates :meth:`candidate_cosine`
        compares them without building them). ``paired=True``: entity ``i`` under
        relation ``i`` (gates ``[N, Ti, Tt]``), outputs ``[N, a]``. ``normalise_visual_plain=False``
        skips the LayerNorm of the text-guided visual branch (1), as the released script does on
        the positive's path. A modality switched off returns None.
        """
        cross = encoded.cross  # [N, Ti, Tt]
        if gates is None:
            visual_gate = text_gate = torch.ones_like(cross[:1])  # [1, Ti, Tt]: M itself (no_rel)
        else:
            visual_gate, text_gate = gates
        expand = (lambda g: g.unsqueeze(0)) if paired else (lambda g: g.unsqueeze(1))  # -> [1, N, ...] / [R, 1, ...]
        outputs = []
        for wanted, tokens, output, slot_cross, slot_gate, normalise_plain in (
            (visual, encoded.image, self.visual_output, cross.transpose(1, 2), visual_gate.transpose(-1, -2), normalise_visual_plain),
            (text, encoded.words, self.text_output, cross, text_gate, True),  # [., Ti, Tt]
        ):
            if not wanted:
                outputs.append(None)
                continue
            plain = slot_cross.softmax(-1) @ tokens  # branch 1 (softmax over Ti) / branch 4 (over Tt), [N, K, a]
            guided = (slot_cross.unsqueeze(0) * expand(slot_gate)) @ tokens  # branches 2 / 3, [R or 1, N, K, a]
            value = output(((self.norm(plain) if normalise_plain else plain) + self.norm(guided)).flatten(-2))
            outputs.append(value[0] if paired else value)
        return outputs[0], outputs[1]


def gated_cosine(
    quadratic: torch.Tensor, weighted: torch.Tensor, gate: torch.Tensor, base: torch.Tensor, queries: torch.Tensor,
    groups: RowGroups, form: CosineForm, eps: float,
) -> torch.Tensor:
    """``[B, N]``: cosine of ``queries [B, a]`` to ``x_gn = base_n + sum_kj g_gkj / sqrt(g_gk^T Q_nk g_gk + ϵ) V_nkj``
    (``quadratic Q [N, K, J, J]``, ``weighted V [N, K J, a]``, ``gate [G, K, J]``, ``base [N, a]``),
    ``g`` the row's relation group in ``groups``. Fused: the ``[n, G, K J]`` coefficients of a chunk
    of entities stay in cache, and the rows meet their group's outputs in one padded ``bmm`` per
    chunk of groups (no ``[N, B, a]`` gather)."""
    keep = torch.is_grad_enabled() and any(x.requires_grad for x in (quadratic, weighted, gate, base, queries))
    return _GatedAttentionCosine.apply(quadratic, weighted, gate, base, queries, groups, form, eps, keep)


class _GatedAttentionCosine(torch.autograd.Function):
    """Forward and backward of :func:`gated_cosine`: the outputs ``x [N, G, a]`` a chunk of
    entities at a time, then every row against its group's outputs; keeps the inverse standard
    deviations ``[N, G, K]`` and the outputs for backward."""

    @staticmethod
    def forward(
        ctx: Any, quadratic: torch.Tensor, weighted: torch.Tensor, gate: torch.Tensor, base: torch.Tensor,
        queries: torch.Tensor, groups: RowGroups, form: CosineForm, eps: float, keep: bool,
    ) -> torch.Tensor:
        entities, slots, tokens, _ = quadratic.shape
        flat = quadratic.reshape(entities, slots, tokens * tokens)  # [N, K, J J]
        pairs = (gate.unsqueeze(-1) * gate.unsqueeze(-2)).flatten(2).permute(1, 2, 0).contiguous()  # [K, J J, G]
        inverse = queries.new_empty(entities, len(gate), slots)  # [N, G, K]
        output = queries.new_empty(entities, len(gate), queries.shape[1])  # [N, G, a]
        for part in _entity_chunks(entities, gate):
            inverse[part] = torch.bmm(flat[part].transpose(0, 1), pairs).clamp_min_(0).add_(eps).rsqrt_().permute(1, 2, 0)
            coefficients = (inverse[part].unsqueeze(-1) * gate).flatten(2)  # [n, G, K J]
            torch.baddbmm(base[part].unsqueeze(1), coefficients, weighted[part], out=output[part])
        query_norms = torch.linalg.vector_norm(queries, dim=-1)  # [B]
        by_group = output.transpose(0, 1)  # [G, N, a]
        norms = torch.linalg.vector_norm(by_group, dim=-1)  # [G, N]
        sim = queries.new_empty(len(queries), entities)
        for chunk in groups.chunks:
            dots = chunk.dots(by_group[chunk.first : chunk.last], chunk.query_block(queries))  # [m, N]
            sim[chunk.rows] = dots / (query_norms[chunk.rows].unsqueeze(1) * norms[chunk.first : chunk.last][chunk.local] + form.delta)
        ctx.form, ctx.groups = form, groups
        if keep:
            ctx.save_for_backward(flat, weighted, gate, pairs, queries, query_norms, sim, inverse, output, norms)
        return sim

    @staticmethod
    def backward(ctx: Any, grad_sim: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weighted, gate, pairs, queries, query_norms, sim, inverse, output, norms = ctx.saved_tensors
        form: CosineForm = ctx.form
        groups: RowGroups = ctx.groups
        entities, slots, _ = flat.shape
        by_group = output.transpose(0, 1)  # [G, N, a]
        grad_by_group, grad_norms = torch.empty_like(by_group), torch.zeros_like(norms)
        grad_queries, grad_query_norms = torch.zeros_like(queries), torch.zeros_like(query_norms)
        for chunk in groups.chunks:
            span = slice(chunk.first, chunk.last)
            row_norms, candidate_norms = query_norms[chunk.rows].unsqueeze(1), norms[span][chunk.local]  # [m, 1], [m, N]
            grad_dots, grad_denominator = cosine_backward(grad_sim[chunk.rows], sim[chunk.rows], row_norms, candidate_norms, form)
            grad_query_norms[chunk.rows] = (grad_denominator * candidate_norms).sum(1)
            grad_by_group[span], grad_queries[chunk.rows] = chunk.dots_backward(grad_dots, by_group[span], chunk.query_block(queries))
            grad_norms[span].index_add_(0, chunk.local, grad_denominator * row_norms)
        grad_output = grad_by_group.add_(norm_gradient(by_group, norms, grad_norms)).transpose(0, 1).contiguous()  # [N, G, a]
        grad_base = grad_output.sum(1)
        grad_flat, grad_weighted = torch.empty_like(flat), torch.empty_like(weighted)
        grad_gate, grad_pairs = torch.zeros_like(gate), torch.zeros_like(pairs)  # [G, K, J], [K, J J, G]
        for part in _entity_chunks(entities, gate):
            part_inverse, part_grad = inverse[part], grad_output[part]
            coefficients = (part_inverse.unsqueeze(-1) * gate).flatten(2)  # [n, G, K J]
            torch.bmm(coefficients.transpose(1, 2), part_grad, out=grad_weighted[part])
            grad_coefficients = torch.bmm(part_grad, weighted[part].transpose(1, 2)).view(*part_inverse.shape, -1)  # [n, G, K, J]
            grad_gate += (grad_coefficients * part_inverse.unsqueeze(-1)).sum(0)
            grad_variance = (grad_coefficients * gate).sum(-1).mul_(part_inverse.pow(3)).mul_(-0.5)  # d (v + ϵ)^-1/2 / dv
            by_slot = grad_variance.permute(2, 0, 1)  # [K, n, G]; v > 0 (a Schur product of PSD forms), clamp inactive
            grad_flat[part] = torch.bmm(by_slot, pairs.transpose(1, 2)).transpose(0, 1)
            grad_pairs.baddbmm_(flat[part].transpose(0, 1).transpose(1, 2), by_slot)
        square = grad_pairs.permute(2, 0, 1).unflatten(-1, (gate.shape[-1], gate.shape[-1]))  # [G, K, J, J]
        grad_gate += ((square + square.transpose(-1, -2)) * gate.unsqueeze(-2)).sum(-1)
        grad_queries += norm_gradient(queries, query_norms, grad_query_norms)
        return grad_flat.view(entities, slots, gate.shape[-1], -1), grad_weighted, grad_gate, grad_base, grad_queries, None, None, None, None


def _entity_chunks(entities: int, gate: torch.Tensor) -> list[slice]:
    """Slices of the entities with about ``GATED_CHUNK_ELEMENTS`` coefficients ``[n, G, K J]`` each."""
    size = max(1, GATED_CHUNK_ELEMENTS // max(1, gate[0].numel() * len(gate)))
    return [slice(first, min(entities, first + size)) for first in range(0, entities, size)]


def gathered_linear(table: torch.Tensor, ids: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(table[ids].float())`` ``[M, T, a]`` for a feature table ``[E, T, D]`` (any dtype, no
    gradient) and ``ids [M]``, without the ``[M, T, D]`` float32 copy: rows are gathered, cast and
    projected a chunk at a time (the image copy is 55 MB for a 1500-entity pre-sample, 283 MB for
    7.7k relation-pool candidates, and allocating it page-faults every step), and the weight's gradient regathers them."""
    return _GatheredLinear.apply(layer.weight, layer.bias, table, ids)


class _GatheredLinear(torch.autograd.Function):
    """Forward and backward of :func:`gathered_linear`; saves only ``ids``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, bias: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        tokens, width = table.shape[1:]
        output = weight.new_empty(len(ids), tokens, len(weight))
        for part in _row_chunks(len(ids), tokens * width):
            rows = table[ids[part]].to(device=weight.device, dtype=weight.dtype).view(-1, width)  # [m T, D]
            torch.addmm(bias, rows, weight.T, out=output[part].view(-1, len(weight)))
        ctx.table = table
        ctx.save_for_backward(ids, weight)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ids, weight = ctx.saved_tensors
        table = ctx.table
        width = table.shape[-1]
        grad_weight = torch.zeros_like(weight)  # [a, D]
        grad_output = grad_output.contiguous()
        for part in _row_chunks(len(ids), table.shape[1] * width):
            rows = table[ids[part]].to(device=weight.device, dtype=weight.dtype).view(-1, width)
            grad_weight.addmm_(grad_output[part].view(-1, len(weight)).T, rows)
        ctx.table = None
        return grad_weight, grad_output.sum((0, 1)), None, None


def _row_chunks(rows: int, per_row: int) -> list[slice]:
    """Slices of ``rows`` with about ``GATHER_CHUNK_ELEMENTS`` values each."""
    size = max(1, GATHER_CHUNK_ELEMENTS // per_row)
    return [slice(first, min(rows, first + size)) for first in range(0, rows, size)]
