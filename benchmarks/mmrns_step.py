"""Time per training step and peak memory of MMRNS and Uniform at the released script's setting.

Setting (issue 6): the MKG-W graph (``data/mkg-w`` when the download stage has run, else
random triples of its sizes: |E| = 15000, |R| = 169, 34196 train triples), text
features [E, 4, 384], image features [E, 24, 383] (float32, random unless cache
directories are given), TransE d = 200, batch 400, n = 20, pre-sample 1500, the
self-adversarial negative-sampling loss, one Adam with two parameter groups
(:func:`pipeline.training.build_optimizer`). A step is
sample + KGC loss + auxiliary loss + backward + Adam. Each sampler runs in a fresh
process, so the peak RSS (``ru_maxrss``) is its own; the figures are the median step time
of ``--steps`` steps (wall clock, and CPU time summed over threads) and the process's peak
RSS. The released script needs 33.5 s per step and 15 GiB on this 2-core CPU (issue 6).
Measure on a quiet machine: with other processes competing for the two cores, PyTorch's
OpenMP threads wait on each other and both figures grow several-fold.

    python benchmarks/mmrns_step.py [--steps 21] [--data DIR | --random-graph] [--text-cache DIR] [--visual-cache DIR]

A random graph (``--random-graph``) spreads a batch over ~150 distinct relations (MKG-W:
~57), the worst case for the per-relation deduplication.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.graph import KnowledgeGraph, load_graph  # noqa: E402
from pipeline.losses import NegativeSamplingLoss  # noqa: E402
from pipeline.models import MODELS  # noqa: E402
from pipeline.samplers import SAMPLERS  # noqa: E402
from pipeline.samplers.mmrns import MMRNSSampler  # noqa: E402
from pipeline.training import GradientDensifier, TrainSettings, build_optimizer  # noqa: E402

ENTITIES, RELATIONS, TRAIN_TRIPLES = 15000, 169, 34196
BATCH, NEGATIVES, PRESAMPLE, DIM, GAMMA = 400, 20, 1500, 200, 3.0


def features(
    cache: str | None, shape: tuple[int, int], entities: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A feature cache as tensors, or random features (an eighth of the entities missing)."""
    if cache:
        from pipeline.features import load_features

        loaded = load_features(cache)
        return torch.from_numpy(loaded.values[:]).float(), torch.from_numpy(loaded.mask.copy())
    mask = torch.rand(entities, generator=generator) > 0.125
    return torch.randn(entities, *shape, generator=generator).mul_(mask.view(-1, 1, 1)), mask


def benchmark_graph(data: str | None, generator: torch.Generator) -> KnowledgeGraph:
    """The canonical MKG-W graph when ``data`` names one, else random triples of MKG-W's sizes."""
    if data:
        return load_graph(data)
    train = torch.stack(
        [
            torch.randint(ENTITIES, (TRAIN_TRIPLES,), generator=generator),
            torch.randint(RELATIONS, (TRAIN_TRIPLES,), generator=generator),
            torch.randint(ENTITIES, (TRAIN_TRIPLES,), generator=generator),
        ],
        dim=1,
    )
    return KnowledgeGraph(ENTITIES, RELATIONS, train, train[:100], train[:100])


def run(name: str, steps: int, data: str | None, text_cache: str | None, visual_cache: str | None) -> dict:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    graph = benchmark_graph(data, generator)
    train = graph.train
    model = MODELS.get("TransE")(graph.num_entities, graph.num_relations, DIM, GAMMA)
    if name == "mmrns":
        text, text_mask = features(text_cache, (4, 384), graph.num_entities, generator)
        visual, visual_mask = features(visual_cache, (24, 383), graph.num_entities, generator)
        sampler = MMRNSSampler(
            graph, NEGATIVES, 0, entity_dim=DIM, relation_dim=DIM, text_features=text, text_mask=text_mask,
            visual_features=visual, visual_mask=visual_mask, presample_size=PRESAMPLE, eps0=10.0, beta=0.01,
        )
    else:
        sampler = SAMPLERS.get(name)(graph, NEGATIVES, 0)
    loss_fn = NegativeSamplingLoss(0.5, True)
    settings = TrainSettings(steps=steps, batch_size=BATCH, lr=1e-4, sampler_lr=1e-4, valid_every=steps, patience=0, seed=0)
    optimizer = build_optimizer(model, sampler, settings)
    densify_gradients = GradientDensifier(optimizer)
    times, cpu_times = [], []
    for step in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        positives = train[torch.randint(len(train), (BATCH,), generator=generator)]
        negatives = sampler.sample(positives, model, step)
        scores = model.score_negatives(positives, negatives.as_model_input(), negatives.corrupt_head)
        loss = loss_fn(model.score_triples(positives), scores)
        auxiliary = sampler.auxiliary_loss(positives, negatives, scores, model)
        if auxiliary is not None:
            loss = loss + auxiliary
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        densify_gradients()
        optimizer.step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "sampler": name, "median_step_s": statistics.median(times), "median_step_cpu_s": statistics.median(cpu_times),
        "peak_rss_gib": peak_kib / 2**20, "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--data", help="canonical dataset dir (default: data/mkg-w if present, else random triples)")
    parser.add_argument("--random-graph", action="store_true", help="random triples of MKG-W's sizes")
    parser.add_argument("--text-cache")
    parser.add_argument("--visual-cache")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one sampler in this process
    args = parser.parse_args()
    default_data = ROOT / "data" / "mkg-w"
    data = args.data or (str(default_data) if (default_data / "train.parquet").is_file() else None)
    data = None if args.random_graph else data
    if args.only:
        print(json.dumps(run(args.only, args.steps, data, args.text_cache, args.visual_cache)))
        return
    print(f"threads: {torch.get_num_threads()}  graph: {data or 'random, MKG-W sizes'}  B={BATCH} n={NEGATIVES} "
          f"P={PRESAMPLE} d={DIM} TransE  features: {args.visual_cache or 'random'} / {args.text_cache or 'random'}")
    for name in ("mmrns", "uniform"):
        command = [sys.executable, __file__, "--only", name, "--steps", str(args.steps)]
        for flag, value in (("--data", data), ("--text-cache", args.text_cache), ("--visual-cache", args.visual_cache)):
            if value:
                command += [flag, value]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{name:8s} median {result['median_step_s']:.3f} s/step (CPU {result['median_step_cpu_s']:.3f} s, all threads)  "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB  ({result['steps']} steps)")
    print("released script: 33.5 s/step, 15 GiB (issue 6)")


if __name__ == "__main__":
    main()
