"""KBGAN (Cai & Wang, NAACL 2018): a generator KGE model proposes negatives, trained by
REINFORCE on the discriminator's (the KGC model's) score of them.

Per step, for positives ``[B, 3]``:

1. Side: row ``b`` corrupts its head with probability ``p_r`` (Bernoulli, as KBGAN's
   corrupter; ``head_probability: uniform`` gives 1/2).
2. Candidates: ``Ns`` uniform entities per row, ``C [B, Ns]`` (``candidates``, KBGAN 20).
3. Generator: logits ``l = g(C) / tau [B, Ns]``, the generator model's scores of the
   corrupted triples (DistMult d 50 by default, as KBGAN; ``tau`` = ``temperature``), policy
   ``pi = softmax(l)``; ``n`` negatives drawn from ``pi`` with replacement, ``ids [B, n]``.
4. Discriminator: the KGC model scores the negatives, ``s [B, n]``, and trains with
   ``train.loss`` (KBGAN: the margin loss for TransE).
5. Generator update (:meth:`auxiliary_loss`): reward ``R = s`` (detached; KBGAN's
   ``-distance``), baseline ``b`` = exponential moving average of the batch mean reward
   (``b <- beta b + (1 - beta) mean(R)``, ``beta`` = ``baseline_decay``, first batch: its
   mean), surrogate ``L_G = -mean_{b,i} (R_bi - b) log pi(ids_bi)``. Its gradient reaches
   only the generator (``R`` is detached), whose parameters are this sampler's and train in
   the optimizer's sampler group (``train.sampler_lr``); they never join the KGC model.

``pretrained``: a checkpoint (``best.pt``/``last.pt`` of a run, e.g. DistMult + Uniform)
whose model becomes the generator (its own name and width; ``generator_model`` and
``generator_dim`` are then unused), as KBGAN pre-trains both players. State (checkpointed):
the generator's parameters, the baseline, the random generator.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.models import build_model
from pipeline.models.base import KGCModel
from pipeline.samplers.base import SAMPLERS, NegativeSampler, Negatives
from pipeline.samplers.bernoulli import side_probabilities


def check_number(name: str, value: object, low: float, high: float | None = None, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"sampler.kbgan.{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")


@SAMPLERS.register("kbgan")
class KBGANSampler(NegativeSampler):
    """A generator model's softmax over uniform candidates, trained by REINFORCE; see the
    module docstring."""

    def __init__(
        self,
        graph: KnowledgeGraph,
        num_negatives: int,
        seed: int,
        generator_model: str = "DistMult",
        generator_dim: int = 50,
        candidates: int = 20,
        temperature: float = 1.0,
        baseline_decay: float = 0.99,
        head_probability: str = "bernoulli",
        pretrained: str | None = None,
    ):
        super().__init__(graph, num_negatives, seed)
        check_number("generator_dim", generator_dim, 1, integer=True)
        check_number("candidates", candidates, 1, integer=True)
        check_number("temperature", temperature, 1e-6)
        check_number("baseline_decay", baseline_decay, 0.0, 1.0)
        self.candidates, self.temperature, self.baseline_decay = candidates, float(temperature), float(baseline_decay)
        self.register_buffer(
            "probabilities", side_probabilities(graph.train, graph.num_relations, head_probability, "sampler.kbgan.head_probability"), persistent=False
        )
        # The generator's initialisation draws from its own seeded generator, not the global RNG,
        # so adding KBGAN leaves the KGC model's initialisation and the batch order unchanged.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator_model = self.load_generator(graph, pretrained) if pretrained else build_model(
                generator_model, graph, {"dim": generator_dim, "gamma": 3.0, "regularization": 0.0}
            )
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))
        self.pending: torch.Tensor | None = None  # log pi of the last sample's draws [B, n]

    @staticmethod
    def load_generator(graph: KnowledgeGraph, path: str) -> KGCModel:
        from pipeline.training import load_model  # the training loop imports the samplers

        if not Path(path).is_file():
            raise ConfigError(f"sampler.kbgan.pretrained: no checkpoint at {path}")
        return load_model(path, graph).train()

    def sample(self, positives: torch.Tensor, model: KGCModel, step: int) -> Negatives:
        batch, device = len(positives), positives.device
        coins = torch.rand(batch, generator=self.generator).to(device)
        corrupt_head = coins < self.probabilities[positives[:, 1]]
        candidates = torch.randint(self.num_entities, (batch, self.candidates), generator=self.generator).to(device)
        log_policy = torch.log_softmax(self.generator_model.score_negatives(positives, candidates, corrupt_head) / self.temperature, -1)
        choice = torch.multinomial(log_policy.detach().exp().cpu(), self.num_negatives, replacement=True, generator=self.generator).to(device)
        self.pending = log_policy.gather(1, choice)  # [B, n], differentiable in the generator
        return Negatives(ids=candidates.gather(1, choice), corrupt_head=corrupt_head)

    def auxiliary_loss(
        self, positives: torch.Tensor, negatives: Negatives, negative_scores: torch.Tensor, model: KGCModel
    ) -> torch.Tensor:
        """REINFORCE surrogate ``-mean (R - b) log pi`` for the generator; updates the baseline."""
        if self.pending is None or self.pending.shape != negative_scores.shape:
            raise RuntimeError("KBGANSampler.auxiliary_loss needs the log-probabilities of the sample just drawn")
        reward = negative_scores.detach().float()
        if not bool(self.baseline_ready):
            self.baseline.fill_(reward.mean())
            self.baseline_ready.fill_(True)
        advantage = reward - self.baseline
        loss = -(advantage * self.pending).mean()
        self.baseline.mul_(self.baseline_decay).add_((1 - self.baseline_decay) * reward.mean())
        self.pending = None
        return loss
