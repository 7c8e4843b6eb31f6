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

So the relation-gated branches, whose coefficients ``C`` depend on (relation, entity), cost
``[R, N, K, J]`` (96 numbers per pair) instead of ``[R, N, K, a]``; ``S`` and ``U`` are
computed once per entity. This is the same mathematics as the direct form (tested against
it) and what makes per-relation evaluation over a 1500-entity pre-sample cheap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.1


@dataclass(frozen=True)
class TokenFactors:
    """Per-entity factors of ``Linear(flatten(LayerNorm(C ê)))`` for one modality's output."""

    tokens: torch.Tensor  # [N, J, a] ê
    gram: torch.Tensor  # [N, J, J] S = ê^c ê^c^T / a
    normalised: torch.Tensor  # [N, J, K, a] U with the LayerNorm scale γ (centred tokens)



@dataclass(frozen=True)
class Encoded:
    """Relation-free part of KCA for ``N`` entities."""

    cross: torch.Tensor  # [N, Ti, Tt] M
    visual: TokenFactors  # tokens: image (J = Ti), slots: sentences (K = Tt)
    text: TokenFactors  # tokens: sentences (J = Tt), slots: image tokens (K = Ti)

    def split(self, count: int) -> tuple[Encoded, Encoded]:
        """The first ``count`` entities and the rest (``split``: one backward node per tensor)."""
        parts = [x.split([count, len(x) - count]) for x in (self.cross, *vars(self.visual).values(), *vars(self.text).values())]
        return tuple(  # type: ignore[return-value]
            Encoded(cross, TokenFactors(*visual), TokenFactors(*text))
            for cross, *rest in zip(*parts)
            for visual, text in [(rest[:3], rest[3:])]
        )


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

    def encode(self, visual: torch.Tensor, text: torch.Tensor) -> Encoded:
        """Eqs. 1-2 and the per-entity factors, for ``visual [N, Ti, D_i]`` and ``text [N, Tt, D_t]``."""
        image = F.leaky_relu(self.visual_projection(visual), LEAKY_SLOPE)  # [N, Ti, a]
        words = F.leaky_relu(self.text_projection(text), LEAKY_SLOPE)  # [N, Tt, a]
        cross = image @ words.transpose(1, 2)  # [N, Ti, Tt]
        return Encoded(cross, self._factors(image, self.visual_output), self._factors(words, self.text_output))

    def _factors(self, tokens: torch.Tensor, output: nn.Linear) -> TokenFactors:
        """Factors for ``tokens [N, J, a]`` and the output Linear(K a, a)."""
        blocks = output.weight.view(self.attention_dim, -1, self.attention_dim)  # [a_out, K, a]
        centred = tokens - tokens.mean(-1, keepdim=True)
        gram = centred @ centred.transpose(1, 2) / self.attention_dim  # [N, J, J]
        normalised = torch.einsum("nja,oka->njko", centred * self.norm.weight, blocks)
        return TokenFactors(tokens, gram, normalised)

    def _attend(self, factors: TokenFactors, coefficients: torch.Tensor, output: nn.Linear, normalise: bool) -> torch.Tensor:
        """``sum_k W_k LN(C ê)_k`` without bias and β, for ``C [R, N, K, J]`` -> ``[R, N, a]``.

        ``normalise=False``: ``sum_k W_k (C ê)_k``, no LayerNorm.
        """
        if not normalise:
            return torch.einsum("rnkj,nja->rnka", coefficients, factors.tokens).flatten(2) @ output.weight.T
        spread = torch.einsum("rnkj,njl->rnkl", coefficients, factors.gram)
        variance = (spread * coefficients).sum(-1).clamp_min(0)  # [R, N, K]
        scaled = coefficients * torch.rsqrt(variance + self.norm.eps).unsqueeze(-1)
        return torch.einsum("rnkj,njko->rno", scaled, factors.normalised)

    def _attend_gated(self, factors: TokenFactors, cross: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """:meth:`_attend` for every entity under every relation, ``C[r, n] = cross[n] ⊙ gate[r]``.

        ``cross [N, K, J]`` (slot-major M), ``gate [R, K, J]`` -> ``[R, N, a]``. Same value as
        ``_attend(factors, cross[None] * gate[:, None], output, True)``, reorganised so that the only
        ``[N, R, K, J]`` tensor is the final coefficient: the variance is a GEMM of per-entity
        ``Q[n, k, j, l] = M_kj M_kl S_jl`` with per-relation ``g_kj g_kl``, and the gate
        multiplies per-entity ``V[n, k, j] = M_kj U_jk``.
        """
        entities, slots, tokens = cross.shape
        gate = gate.contiguous()
        quadratic = cross.unsqueeze(-1) * cross.unsqueeze(-2) * factors.gram.unsqueeze(1)  # [N, K, J, J]
        gate_pairs = gate.unsqueeze(-1) * gate.unsqueeze(-2)  # [R, K, J, J]
        variance = torch.bmm(
            quadratic.view(entities, slots, -1).transpose(0, 1), gate_pairs.view(len(gate), slots, -1).permute(1, 2, 0)
        )  # [K, N, R]
        inverse = torch.rsqrt(variance.clamp_min(0) + self.norm.eps).permute(1, 2, 0)  # [N, R, K]
        weighted = cross.unsqueeze(-1) * factors.normalised.transpose(1, 2)  # [N, K, J, a] V
        coefficients = inverse.unsqueeze(-1) * gate.unsqueeze(0)  # [N, R, K, J]
        out = torch.bmm(coefficients.reshape(entities, len(gate), -1), weighted.reshape(entities, slots * tokens, -1))
        return out.transpose(0, 1)  # [R, N, a]

    def _constant(self, output: nn.Linear, normalised_branches: int) -> torch.Tensor:
        """``bias + normalised_branches * sum_k W_k β`` ``[a]``."""
        blocks = output.weight.view(self.attention_dim, -1, self.attention_dim)
        return output.bias + normalised_branches * torch.einsum("oka,a->o", blocks, self.norm.bias)

    def gates(self, relations: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Eq. 5 gates ``(g_i, g_t)``, each ``[R, Ti, Tt]``, for ``relations [R, d_r]``; None without relation."""
        if self.visual_gate is None or relations is None:
            return None
        shape = (-1, self.image_tokens, self.text_tokens)
        return torch.sigmoid(self.visual_gate(relations)).view(shape), torch.sigmoid(self.text_gate(relations)).view(shape)

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
        outputs ``[R, N, a]`` (``R = 1`` without gates). ``paired=True``: entity ``i`` under
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
        for wanted, factors, output, slot_cross, slot_gate, normalise_plain in (
            (visual, encoded.visual, self.visual_output, cross.transpose(1, 2), visual_gate.transpose(-1, -2), normalise_visual_plain),
            (text, encoded.text, self.text_output, cross, text_gate, True),  # [., Ti, Tt]
        ):
            if not wanted:
                outputs.append(None)
                continue
            plain = slot_cross.softmax(-1)  # branch 1 (softmax over Ti) / branch 4 (over Tt)
            relation_free = self._attend(factors, plain.unsqueeze(0), output, normalise_plain)[0]  # [N, a]
            if paired or gates is None:
                guided = self._attend(factors, slot_cross.unsqueeze(0) * expand(slot_gate), output, True)
            else:  # every candidate under every relation of the batch
                guided = self._attend_gated(factors, slot_cross, slot_gate)  # [R, N, a]
            value = relation_free + guided + self._constant(output, 1 + int(normalise_plain))
            outputs.append(value[0] if paired else value)
        return outputs[0], outputs[1]
