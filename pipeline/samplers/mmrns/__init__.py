"""MMRNS (Xu et al., ACM MM 2022): the sampler and its parts.

- :mod:`.sampler`: :class:`MMRNSSampler`, one training step's pre-sample, similarities,
  draws and contrastive loss (the mathematics and every decision in its docstring);
- :mod:`.kca`: knowledge-guided cross-modal attention (eqs. 1-6);
- :mod:`.structure`: the structural branch (eq. 7) and its fused relation-gated cosine;
- :mod:`.groups`: a batch's rows grouped by relation, grouped cosines (eq. 8);
- :mod:`.draws`: masked straight-through Gumbel draws and Gumbel-top-k (eq. 13);
- :mod:`.contrastive`: the contrastive loss (eqs. 9-11).
"""
from pipeline.samplers.mmrns.sampler import (  # noqa: F401  (registers "mmrns")
    ABLATIONS,
    KGC_GRADIENTS,
    MODALITIES,
    MMRNSSampler,
    exploration_factor,
    presample_count,
    relation_vectors,
)

__all__ = ["ABLATIONS", "KGC_GRADIENTS", "MODALITIES", "MMRNSSampler", "exploration_factor", "presample_count", "relation_vectors"]
