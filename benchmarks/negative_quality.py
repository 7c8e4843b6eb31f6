"""What a trained run's sampler draws: how hard its negatives are and how many are false.

Loads a run's ``last.pt`` (model and sampler state, written by the ``train`` stage) and the
params file it ran with, draws ``--batches`` training batches of negatives with the run's
sampler and with Uniform *on the same model*, and prints for each sampler:

- ``false negatives``: % of drawn corruptions that are VALID or TEST triples (true facts the
  model is pushed to score low) and % that are TRAIN triples;
- ``hardness``: mean fraction of all entities the model scores *below* the negative for
  its query (1.0: the negative outscores every other candidate; Uniform ≈ 0.5);
- ``score``: mean KGC score of the negatives and of the positives;
- ``distinct``: distinct negative entities per batch / (B n).

    python benchmarks/negative_quality.py --run /tmp/run --params run.yaml [--data data/mkg-w]
        [--features features/mkg-w] [--batches 10]

(``--run`` is the ``--out`` directory given to ``python -m stages train``.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.features import load_features  # noqa: E402
from pipeline.graph import KnowledgeGraph, load_graph  # noqa: E402
from pipeline.models.base import KGCModel  # noqa: E402
from pipeline.samplers import SAMPLERS, NegativeSampler, build_sampler  # noqa: E402
from pipeline.training import load_model, read_checkpoint  # noqa: E402


def triple_keys(triples: torch.Tensor, graph: KnowledgeGraph) -> torch.Tensor:
    """One int64 key per triple ``[..., 3]``."""
    h, r, t = triples.unbind(-1)
    return (h * graph.num_relations + r) * graph.num_entities + t


def corrupted(positives: torch.Tensor, ids: torch.Tensor, corrupt_head: torch.Tensor) -> torch.Tensor:
    """The negative triples ``[B, n, 3]``."""
    triples = positives.unsqueeze(1).expand(-1, ids.shape[1], -1).clone()
    column = torch.where(corrupt_head, 0, 2)
    triples[torch.arange(len(ids)), :, column] = ids
    return triples


@torch.no_grad()
def describe(sampler: NegativeSampler, model: KGCModel, graph: KnowledgeGraph, batches: list[torch.Tensor], step: int) -> dict:
    heldout = torch.unique(triple_keys(torch.cat([graph.valid, graph.test]), graph))
    train = torch.unique(triple_keys(graph.train, graph))
    totals = dict(heldout=0.0, train=0.0, hardness=0.0, score=0.0, positive=0.0, distinct=0.0, count=0)
    for offset, positives in enumerate(batches):
        negatives = sampler.sample(positives, model, step + offset)
        ids = negatives.ids
        keys = triple_keys(corrupted(positives, ids, negatives.corrupt_head), graph)
        scores = model.score_negatives(positives, ids, negatives.corrupt_head)  # [B, n]
        below = torch.empty_like(scores)
        for side, rows in (("head", negatives.corrupt_head), ("tail", ~negatives.corrupt_head)):
            if rows.any():
                every = model.score_all(positives[rows], side)  # [b, E]
                below[rows] = (every.unsqueeze(1) < scores[rows].unsqueeze(2)).float().mean(2)
        totals["heldout"] += torch.isin(keys, heldout).float().sum().item()
        totals["train"] += torch.isin(keys, train).float().sum().item()
        totals["hardness"] += below.sum().item()
        totals["score"] += scores.sum().item()
        totals["positive"] += model.score_triples(positives).mean().item() * ids.numel()
        totals["distinct"] += len(torch.unique(ids)) / ids.numel()
        totals["count"] += ids.numel()
    count = totals.pop("count")
    return {
        "false negatives (valid/test) %": 100 * totals["heldout"] / count,
        "TRAIN triples %": 100 * totals["train"] / count,
        "hardness": totals["hardness"] / count,
        "negative score": totals["score"] / count,
        "positive score": totals["positive"] / count,
        "distinct per batch": totals["distinct"] / len(batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="The train stage's --out directory (holds last.pt).")
    parser.add_argument("--params", type=Path, required=True, help="The params file the run used.")
    parser.add_argument("--data", type=Path, default=Path("data/mkg-w"))
    parser.add_argument("--features", type=Path, default=Path("features/mkg-w"))
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()

    params = yaml.safe_load(args.params.read_text())
    train, sampler_params = params["train"], params["sampler"]
    graph = load_graph(args.data)
    checkpoint = read_checkpoint(args.run / "last.pt")
    model = load_model(args.run / "last.pt", graph)
    name = sampler_params["name"]
    caches = {"text": None, "visual": None}
    if hasattr(SAMPLERS.get(name), "from_params"):
        caches = {kind: load_features(args.features / kind) if (args.features / kind).is_dir() else None for kind in caches}
    options = sampler_params.get(name.lower()) or {}
    trained = build_sampler(name, options, graph, model, train["num_negatives"], sampler_params["seed"], **caches)
    trained.load_state_dict(checkpoint["sampler"])
    uniform = build_sampler("uniform", {"exclude_positives": False}, graph, model, train["num_negatives"], sampler_params["seed"])
    generator = torch.Generator().manual_seed(0)
    batches = [graph.train[torch.randint(len(graph.train), (train["batch_size"],), generator=generator)] for _ in range(args.batches)]
    step = int(checkpoint["step"])
    print(f"run {args.run} (step {step}, sampler {name}), {args.batches} batches of {train['batch_size']} x {train['num_negatives']}")
    for label, sampler in ((name, trained), ("uniform", uniform)):
        figures = describe(sampler, model, graph, batches, step)
        print(f"{label:>10}  " + "  ".join(f"{key} {value:.4g}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
