"""The structural branch of MMRNS (eq. 7) and its cosine to the row's positive (eq. 8).

Eq. 7 ``e_s = t ⊙ sigmoid(MLP([r; t]))`` with ``MLP = Linear(d_r + d, H) - LeakyReLU(0.1) -
Linear(H, d)`` (hidden ``H = 100``, the script's). The first layer factors as
``W [r; t] + b = (W_t t + b) + W_r r``: one ``[P, H]`` product for the candidates and one
``[G, H]`` for the batch's distinct relations, so the ``[G, P, .]`` work starts with a sum.

:func:`gated_structure_cosine` computes the ``[B, P]`` cosines of every candidate under each
row's relation to the row's own (relation-gated) positive without keeping the ``[G, P, d]``
candidate representations: a custom autograd function walks the relation groups chunk by
chunk (each chunk's elementwise chain stays in cache), keeps only the hidden activations and
the gate of each chunk, and in backward skips every chunk whose rows receive no gradient
(e.g. rows without a contrastive positive when the KGC loss does not reach the sampler).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.samplers.mmrns.groups import CosineForm, RowGroups, cosine_backward, norm_gradient
from pipeline.samplers.mmrns.kca import LEAKY_SLOPE


class StructuralGate(nn.Module):
    """Eq. 7's MLP over ``[r; t]`` (``relation_dim = 0``: over ``t`` alone, the no_rel ablation)."""

    def __init__(self, entity_dim: int, relation_dim: int, hidden: int):
        super().__init__()
        self.relation_dim = relation_dim
        self.mlp = nn.Sequential(nn.Linear(relation_dim + entity_dim, hidden), nn.LeakyReLU(LEAKY_SLOPE), nn.Linear(hidden, entity_dim))

    def first_layer(self, entities: torch.Tensor, relations: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W_t t + b [.., H], W_r r [.., H] or None)`` for ``entities [.., d]``, ``relations [.., d_r]``."""
        first = self.mlp[0]
        entity_part = F.linear(entities, first.weight[:, self.relation_dim :], first.bias)
        if not self.relation_dim or relations is None:
            return entity_part, None
        return entity_part, F.linear(relations, first.weight[:, : self.relation_dim])

    def paired(self, entities: torch.Tensor, relations: torch.Tensor | None) -> torch.Tensor:
        """``e_s [N, d]`` of entity ``i`` under relation ``i`` (``entities [N, d]``, ``relations [N, d_r]``)."""
        entity_part, relation_part = self.first_layer(entities, relations)
        hidden = entity_part if relation_part is None else entity_part + relation_part
        return entities * torch.sigmoid(self.mlp[2](self.mlp[1](hidden)))

    def cosine(
        self, table: torch.Tensor, relations: torch.Tensor | None, queries: torch.Tensor, groups: RowGroups,
        form: CosineForm = CosineForm(),
    ) -> torch.Tensor:
        """``[B, P]``: cosine of ``queries [B, d]`` to every candidate of ``table [P, d]`` under the
        relation of the row's group (``relations [G, d_r]``; None: relation-free, ``G = 1``)."""
        entity_part, relation_part = self.first_layer(table, relations)
        if relation_part is None:
            relation_part = entity_part.new_zeros(1, entity_part.shape[1])
        second = self.mlp[2]
        inputs = (entity_part, relation_part, second.weight, second.bias, table, queries)
        keep = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
        return _GatedStructureCosine.apply(*inputs, groups, form, keep)


class _GatedStructureCosine(torch.autograd.Function):
    """``sim[b, p] = <q_b, e_gp> / (|q_b| |e_gp| + δ)`` with ``e_gp = t_p ⊙ σ(W2 φ(a_p + c_g) + b2)``, ``g`` = b's group.

    Inputs: ``a [P, H]``, ``c [G, H]``, ``W2 [d, H]``, ``b2 [d]``, ``t [P, d]``, ``q [B, d]``.
    Keeps ``φ(a + c)`` ``[G, P, H]`` and ``σ(.)`` ``[G, P, d]`` per chunk for backward.
    """

    @staticmethod
    def forward(
        ctx: Any, entity_part: torch.Tensor, relation_part: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        table: torch.Tensor, queries: torch.Tensor, groups: RowGroups, form: CosineForm, keep: bool,
    ) -> torch.Tensor:
        query_norms = torch.linalg.vector_norm(queries, dim=-1)  # [B]
        sim = queries.new_empty(len(queries), len(table))
        saved = []
        for chunk in groups.chunks:
            hidden = torch.add(entity_part.unsqueeze(0), relation_part[chunk.first : chunk.last].unsqueeze(1))  # [g, P, H]
            hidden = F.leaky_relu_(hidden, LEAKY_SLOPE)
            gate = torch.addmm(bias, hidden.flatten(0, 1), weight.T).view(len(hidden), len(table), -1).sigmoid_()  # [g, P, d]
            candidates = gate * table
            norms = torch.linalg.vector_norm(candidates, dim=-1)  # [g, P]
            dots = chunk.dots(candidates, chunk.query_block(queries))  # [m, P]
            sim[chunk.rows] = dots / (query_norms[chunk.rows].unsqueeze(1) * norms[chunk.local] + form.delta)
            if keep:  # for backward; a no-grad forward holds one chunk at a time
                saved.append((hidden, gate, norms))
        ctx.groups, ctx.form, ctx.chunk_tensors = groups, form, saved
        ctx.save_for_backward(weight, table, queries, query_norms, sim)
        return sim

    @staticmethod
    def backward(ctx: Any, grad_sim: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, table, queries, query_norms, sim = ctx.saved_tensors
        groups: RowGroups = ctx.groups
        form: CosineForm = ctx.form
        grad_entity = torch.zeros(table.shape[0], weight.shape[1], dtype=table.dtype, device=table.device)
        grad_relation = torch.zeros(groups.num_groups, weight.shape[1], dtype=table.dtype, device=table.device)
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        grad_table, grad_queries = torch.zeros_like(table), torch.zeros_like(queries)
        grad_query_norms = torch.zeros_like(query_norms)
        active = grad_sim.ne(0).any(1)  # [B] rows that receive a gradient
        for chunk, (hidden, gate, norms) in zip(groups.chunks, ctx.chunk_tensors):
            if not bool(active[chunk.rows].any()):
                continue
            rows_grad, row_norms = grad_sim[chunk.rows], query_norms[chunk.rows].unsqueeze(1)
            grad_dots, grad_denominator = cosine_backward(rows_grad, sim[chunk.rows], row_norms, norms[chunk.local], form)
            grad_query_norms[chunk.rows] = (grad_denominator * norms[chunk.local]).sum(1)
            grad_norms = torch.zeros_like(norms).index_add_(0, chunk.local, grad_denominator * row_norms)  # [g, P]
            candidates = gate * table
            grad_candidates, grad_queries[chunk.rows] = chunk.dots_backward(grad_dots, candidates, chunk.query_block(queries))
            grad_candidates += norm_gradient(candidates, norms, grad_norms)  # [g, P, d]
            grad_table += (grad_candidates * gate).sum(0)
            grad_gate = torch.ops.aten.sigmoid_backward(grad_candidates.mul_(table), gate).flatten(0, 1)  # [g P, d]
            grad_bias += grad_gate.sum(0)
            flat_hidden = hidden.flatten(0, 1)
            grad_weight.addmm_(grad_gate.T, flat_hidden)
            grad_hidden = torch.ops.aten.leaky_relu_backward(grad_gate @ weight, flat_hidden, LEAKY_SLOPE, True)  # φ' from φ's output
            grad_entity += grad_hidden.view_as(hidden).sum(0)
            grad_relation[chunk.first : chunk.last] = grad_hidden.view_as(hidden).sum(1)
        grad_queries += norm_gradient(queries, query_norms, grad_query_norms)
        ctx.chunk_tensors = None
        return grad_entity, grad_relation, grad_weight, grad_bias, grad_table, grad_queries, None, None, None
