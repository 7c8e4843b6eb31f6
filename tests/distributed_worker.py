"""One rank of the data-parallel tests (tests/test_distributed.py), started by the test with
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and the small runs the
test rebuilds in its own process for the single-process reference.

    python tests/distributed_worker.py train SAMPLER STEPS OUT      # fit; rank 0 writes OUT/last.pt, OUT/replicas_equal
    python tests/distributed_worker.py evaluate OUT                # rank 0 writes OUT/metrics.pt
    python tests/distributed_worker.py die|hang OUT                # rank 1 exits / stops answering at step 2
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from pipeline.distributed import all_gather_rows, join, leave
from pipeline.errors import PipelineError
from pipeline.evaluation import evaluate
from pipeline.graph import KnowledgeGraph
from pipeline.losses import NegativeSamplingLoss
from pipeline.models import build_model
from pipeline.samplers import NegativeSampler, build_sampler
from pipeline.samplers.mmrns import MMRNSSampler
from pipeline.training import TrainSettings, fit

ENTITIES, RELATIONS, NEGATIVES, SAMPLER_SEED, TIMEOUT = 400, 3, 4, 11, 20.0
PRESAMPLE = 20  # MMRNS candidates per rank and step
SHARED = {"dim": 8, "gamma": 3.0, "regularization": 1e-3}
SETTINGS = TrainSettings(steps=6, batch_size=16, lr=0.01, sampler_lr=0.01, valid_every=3, patience=100, seed=5, log_every=1)
EVAL_BATCH_SIZES = (7, 64)  # 7: batches shared out unevenly (3 / 2 / ...); 64: one batch, rank 1 idle


def small_graph() -> KnowledgeGraph:
    """400 entities, 3 relations, 1200 distinct train triples, 30 valid, 30 test. A step's
    entity rows (8 per rank x (2 + 4 negatives), MMRNS also 2 x 20 candidates + 8) are fewer
    than 400 / 2: the embedding table's gradient travels as gathered rows, the relations' dense."""
    generator = torch.Generator().manual_seed(0)
    triples = torch.unique(torch.stack([torch.randint(ENTITIES, (1400,), generator=generator), torch.randint(RELATIONS, (1400,), generator=generator),
                                        torch.randint(ENTITIES, (1400,), generator=generator)], 1), dim=0)
    triples = triples[torch.randperm(len(triples), generator=generator)]
    return KnowledgeGraph(ENTITIES, RELATIONS, triples[:1200], triples[1200:1230], triples[1230:1260])


def build(sampler_name: str) -> tuple[KnowledgeGraph, torch.nn.Module, NegativeSampler]:
    """Graph, TransE (seeded by SETTINGS.seed) and the sampler (seeded by SAMPLER_SEED), as a fresh process builds them."""
    graph = small_graph()
    torch.manual_seed(SETTINGS.seed)
    model = build_model("TransE", graph, SHARED)
    if sampler_name == "mmrns":  # small MMRNS on random features (as tests/test_mmrns.py), all three modalities
        generator = torch.Generator().manual_seed(1)
        text_mask, visual_mask = torch.rand(ENTITIES, generator=generator) > 0.2, torch.rand(ENTITIES, generator=generator) > 0.2
        sampler = MMRNSSampler(
            graph, NEGATIVES, SAMPLER_SEED, entity_dim=SHARED["dim"], relation_dim=SHARED["dim"], presample_size=PRESAMPLE,
            text_features=torch.randn(ENTITIES, 4, 9, generator=generator) * text_mask.view(-1, 1, 1), text_mask=text_mask,
            visual_features=torch.randn(ENTITIES, 24, 10, generator=generator) * visual_mask.view(-1, 1, 1), visual_mask=visual_mask,
            attention_dim=6, structure_hidden=10,
        )
    else:
        sampler = build_sampler(sampler_name, {}, graph, model, NEGATIVES, SAMPLER_SEED)
    return graph, model, sampler


def loss_function() -> NegativeSamplingLoss:
    return NegativeSamplingLoss(0.5, True)


def main() -> None:
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[-1])
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    world = join(rank, size, 0, torch.device("cpu"), TIMEOUT if mode != "hang" else 5.0)
    try:
        if mode == "evaluate":
            graph, model, _ = build("uniform")
            results = {(split, size): evaluate(model, graph, split, batch_size=size, world=world)
                       for split in ("valid", "test") for size in EVAL_BATCH_SIZES}
            if world.is_main:
                torch.save(results, out / "metrics.pt")
            return
        sampler_name, steps = (sys.argv[2], int(sys.argv[3])) if mode == "train" else ("uniform", 6)
        graph, model, sampler = build(sampler_name)
        if mode in ("die", "hang") and rank == 1:
            draw = sampler.sample

            def sample(positives, model, step):  # this rank fails at step 2
                if step == 2:
                    if mode == "die":
                        os._exit(3)
                    time.sleep(300)
                return draw(positives, model, step)

            sampler.sample = sample
        settings = dataclasses.replace(SETTINGS, steps=steps)
        fit(model, sampler, loss_function(), graph, settings, out, lambda m: evaluate(m, graph, "valid", world=world)["realistic"]["both"],
            {"name": "TransE", "shared": SHARED, "options": {}}, {"sampler": sampler_name}, progress=False, world=world)
        flat = torch.cat([p.detach().flatten() for p in (*model.parameters(), *sampler.parameters())]).unsqueeze(0)
        replicas = all_gather_rows(world, flat)  # every rank's parameters
        if world.is_main:
            (out / "replicas_equal").write_text(str(all(torch.equal(replicas[0], other) for other in replicas[1:])))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        leave(world)


if __name__ == "__main__":
    main()
