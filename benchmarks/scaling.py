"""How training step time, evaluation time and peak memory grow with the graph, on 1 and 2 processes.

Synthetic graphs (uniformly random triples, 169 relations as MKG-W): ``|E|`` from MKG-W's
15000 to 1M entities with 1x to 50x MKG-W's 34196 train triples (valid and test in MKG-W's
proportions; ``--sizes E:multiple,...``). TransE d 200, batch 400 (the global batch: 200 per
rank with 2 processes), n 20, self-adversarial NS loss, Adam: one step is
:class:`pipeline.training.TrainStep`, the train stage's own step, with its gradient
synchronisation. Samplers:

- ``uniform``;
- ``mmrns`` (published configuration, KGC gradient into the sampler) with random float16 text
  ``[E, 4, 384]`` and image ``[E, 24, 383]`` features in memory, as the extract stages store
  them. Its pre-sample ``P = |E|/10`` would grow with the graph (linear step time, an
  ``[n, B, P]`` float32 noise buffer: 3.2 GB at 1M entities): here it is capped,
  ``P = min(|E|/10, --presample-cap)`` (default 1500, MKG-W's), i.e.
  ``sampler.mmrns.presample_size: 1500`` (a count) in params.yaml. The uncapped step is
  printed as the linear projection ``t(P) = t(cap) P / cap``.

Each (sampler, size, processes) runs in fresh processes: one process, or 2 gloo ranks on this
machine started with torchrun's variables (:func:`stages.launch.rank_environment`), 1 thread
each. Printed: median step seconds after one warm-up step (rank 0's wall time; in brackets the
part spent in :class:`pipeline.distributed.GradientSync`: with one process densifying the
gradients, with two also exchanging them) and global triples/s; filtered ranking of ``--eval-triples`` valid triples (head and tail queries against
all entities, sharded over the ranks) as seconds per 1000 queries and extrapolated to the
graph's test split; peak RSS of each rank beside the analytical estimate of
:func:`estimate_gib`. A configuration whose estimate exceeds ``--budget-gib`` (default: 70% of
the memory available now, at most 16 GiB) is not run: its estimate is printed, marked
``estimated``. The last lines give the largest graph whose estimate fits this machine's memory.

    python benchmarks/scaling.py [--sizes 15000:1,100000:5,300000:20,1000000:50] [--samplers uniform,mmrns]
        [--processes 1,2] [--steps 3] [--eval-triples 128] [--presample-cap 1500] [--budget-gib G]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.graph import KnowledgeGraph  # noqa: E402
from stages.launch import free_port, rank_environment  # noqa: E402

ENTITIES, RELATIONS, TRAIN, VALID, TEST = 15000, 169, 34196, 4276, 4274  # MKG-W
BATCH, NEGATIVES, DIM, GAMMA = 400, 20, 200, 3.0
TEXT, IMAGE = (4, 384), (24, 383)
GIB = 2**30
RUNTIME_GIB = 0.45  # python + torch + the pipeline imported, nothing allocated (measured: 0.4-0.5 GiB)
MMRNS_WORKING_GIB_PER_CANDIDATE = 1.0 / 1500  # per-step tensors of MMRNS, ~linear in P (README: ~1 GiB at P 1500)


def eval_batch(entities: int) -> int:
    """Queries per all-entity scoring call: ``[b, E]`` float32 scores of at most 256 MB (1024 at MKG-W's size)."""
    return max(16, min(1024, 2**26 // entities))


def presample(entities: int, cap: int) -> int:
    return min(math.ceil(entities / 10), cap)


def estimate_gib(sampler: str, entities: int, train: int, cap: int) -> float:
    """Analytical peak RSS of one rank (GiB): the runtime; entity and relation tables with their
    dense gradient buffer and Adam's two moments (16 bytes per parameter); the graph's triples
    with the filter index (~100 bytes per triple); the scores of one evaluation batch and its
    comparisons (~6 bytes per score); for MMRNS the float16 features (21456 bytes per entity)
    and its per-step working set (~linear in P)."""
    triples = train * (1 + (VALID + TEST) / TRAIN)
    total = RUNTIME_GIB * GIB + 16 * (entities + RELATIONS) * DIM + 100 * triples + 6 * eval_batch(entities) * entities
    if sampler == "mmrns":
        total += 2 * (TEXT[0] * TEXT[1] + IMAGE[0] * IMAGE[1]) * entities + MMRNS_WORKING_GIB_PER_CANDIDATE * presample(entities, cap) * GIB
    return total / GIB


def synthetic_graph(entities: int, train: int, eval_triples: int, seed: int = 0) -> KnowledgeGraph:
    """Random triples: ``train`` train, valid = ``eval_triples`` of them (the ranked queries), test MKG-W's share."""
    generator = torch.Generator().manual_seed(seed)
    test = round(train * TEST / TRAIN)

    def triples(count: int) -> torch.Tensor:
        return torch.stack([torch.randint(entities, (count,), generator=generator), torch.randint(RELATIONS, (count,), generator=generator),
                            torch.randint(entities, (count,), generator=generator)], 1)

    return KnowledgeGraph(entities, RELATIONS, triples(train), triples(eval_triples), triples(test))


def random_features(entities: int, shape: tuple[int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[E, T, D]`` float16 features (an eighth of the entities without) filled from a repeated
    random block of 1024 entities (fast at 1M entities; the memory is real), and the mask ``[E]``."""
    block = torch.randn(1024, *shape, generator=generator).half()
    values = torch.empty(entities, *shape, dtype=torch.float16)
    for start in range(0, entities, len(block)):
        part = values[start : start + len(block)]
        part.copy_(block[: len(part)])
    mask = torch.rand(entities, generator=generator) > 0.125
    values[~mask] = 0
    return values, mask


def worker(sampler_name: str, entities: int, train: int, steps: int, eval_triples: int, cap: int) -> dict:
    """One rank (torchrun's variables) or the single process: time the steps and the evaluation."""
    from pipeline.distributed import join, leave
    from pipeline.evaluation import evaluate, graph_filter
    from pipeline.losses import NegativeSamplingLoss
    from pipeline.models import build_model
    from pipeline.samplers import SAMPLERS
    from pipeline.samplers.mmrns import MMRNSSampler
    from pipeline.training import BatchStream, TrainSettings, TrainStep

    torch.set_num_threads(1)
    size = int(os.environ.get("WORLD_SIZE", 1))
    world = join(int(os.environ.get("RANK", 0)), size, 0, torch.device("cpu"), 600.0)
    try:
        graph = synthetic_graph(entities, train, eval_triples)
        torch.manual_seed(0)
        model = build_model("TransE", graph, {"dim": DIM, "gamma": GAMMA, "regularization": 0.0})
        if sampler_name == "mmrns":
            generator = torch.Generator().manual_seed(1)
            text, text_mask = random_features(entities, TEXT, generator)
            image, image_mask = random_features(entities, IMAGE, generator)
            sampler = MMRNSSampler(graph, NEGATIVES, 7, entity_dim=DIM, relation_dim=DIM, text_features=text, text_mask=text_mask,
                                   visual_features=image, visual_mask=image_mask, presample_size=presample(entities, cap))
        else:
            sampler = SAMPLERS.get(sampler_name)(graph, NEGATIVES, 7)
        settings = TrainSettings(steps=steps, batch_size=BATCH, lr=1e-3, sampler_lr=1e-4, valid_every=steps, patience=1, seed=0)
        train_step = TrainStep(model, sampler, NegativeSamplingLoss(0.5, True), settings, world)
        batches = BatchStream(len(graph.train), BATCH, settings.seed)
        times, sync_times, synchronise = [], [], train_step.synchronise

        def timed_synchronise(loss: float) -> float:  # the gradient exchange's share of a step
            started = time.perf_counter()
            loss = synchronise(loss)
            sync_times.append(time.perf_counter() - started)
            return loss

        train_step.synchronise = timed_synchronise
        for step in range(steps + 1):  # step 0: warm-up (Adam's state, the densified gradient buffers)
            started = time.perf_counter()
            train_step(graph.train[batches.next()], step)
            times.append(time.perf_counter() - started)
        graph_filter(graph)  # built once per graph (validation reuses it): not timed
        started = time.perf_counter()
        evaluate(model, graph, "valid", batch_size=eval_batch(entities), world=world)
        eval_seconds = time.perf_counter() - started
        return {"step_s": statistics.median(times[1:]), "sync_s": statistics.median(sync_times[1:]), "eval_s": eval_seconds,
                "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rank": world.rank}
    finally:
        leave(world)


def measure(args: argparse.Namespace, sampler: str, entities: int, train: int, processes: int) -> list[dict]:
    """One configuration in fresh processes: each rank's result."""
    command = [sys.executable, __file__, "--worker", sampler, str(entities), str(train), "--steps", str(args.steps),
               "--eval-triples", str(args.eval_triples), "--presample-cap", str(args.presample_cap)]
    port = free_port()
    environments = [rank_environment(rank, processes, port) for rank in range(processes)] if processes > 1 else [dict(os.environ, OMP_NUM_THREADS="1")]
    ranks = [subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True) for environment in environments]
    outputs = [rank.communicate()[0] for rank in ranks]
    if any(rank.returncode for rank in ranks):
        raise SystemExit(f"{sampler} |E|={entities} on {processes} processes failed (exit codes {[rank.returncode for rank in ranks]})")
    return sorted((json.loads(output.strip().splitlines()[-1]) for output in outputs), key=lambda result: result["rank"])


def largest_fitting(sampler: str, processes: int, memory_gib: float, cap: int, triples_per_entity: float) -> int:
    """The largest ``|E|`` (to 1%) whose estimate for ``processes`` ranks fits ``memory_gib``."""
    low, high = 1000, 10**9
    while high > low * 1.01:
        middle = int(math.sqrt(low * high))
        fits = processes * estimate_gib(sampler, middle, int(middle * triples_per_entity), cap) <= memory_gib
        low, high = (middle, high) if fits else (low, middle)
    return low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="15000:1,100000:5,300000:20,1000000:50", help="entities:multiple of MKG-W's train triples, ...")
    parser.add_argument("--samplers", default="uniform,mmrns")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--eval-triples", type=int, default=128, help="valid triples ranked (x2 queries)")
    parser.add_argument("--presample-cap", type=int, default=1500)
    parser.add_argument("--budget-gib", type=float, help="largest estimated memory of a configuration that is run (all ranks)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # internal: sampler entities train
    args = parser.parse_args()
    if args.worker:
        sampler, entities, train = args.worker
        print(json.dumps(worker(sampler, int(entities), int(train), args.steps, args.eval_triples, args.presample_cap)))
        return
    available = psutil.virtual_memory().available / GIB
    budget = args.budget_gib or min(16.0, 0.7 * available)
    sizes = [(int(e), round(float(m) * TRAIN)) for e, m in (item.split(":") for item in args.sizes.split(","))]
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.1f} GiB "
          f"({available:.1f} available), load average {os.getloadavg()[0]:.2f}; budget {budget:.1f} GiB; 1 thread per process; "
          f"TransE d {DIM}, batch {BATCH} (global), n {NEGATIVES}; {args.steps} timed steps; {2 * args.eval_triples} ranked queries")
    capped_step = None  # the last 1-process MMRNS step with the capped pre-sample (about the same at every |E|)
    header = (f"{'sampler':8s} {'|E|':>9s} {'train':>10s} {'P':>5s} procs {'step s':>8s} {'(sync)':>8s} {'triples/s':>9s} {'eval s/1k q':>11s} "
              f"{'test eval s':>11s}  peak GiB per rank (estimate)")
    print(header)
    for sampler in args.samplers.split(","):
        for entities, train in sizes:
            test_queries = 2 * round(train * TEST / TRAIN)
            p = presample(entities, args.presample_cap) if sampler == "mmrns" else 0
            single = None
            for processes in (int(n) for n in args.processes.split(",")):
                estimate = estimate_gib(sampler, entities, train, args.presample_cap)
                row = f"{sampler:8s} {entities:9,d} {train:10,d} {p or '-':>5} {processes:5d}"
                if processes * estimate > budget:
                    print(f"{row} {'-':>8s} {'-':>8s} {'-':>9s} {'-':>11s} {'-':>11s}  {estimate:.2f} estimated (x{processes} > budget {budget:.1f}: not run)")
                    continue
                results = measure(args, sampler, entities, train, processes)
                step, evaluation = results[0]["step_s"], max(r["eval_s"] for r in results)
                per_thousand = evaluation / (2 * args.eval_triples) * 1000
                peaks = "+".join(f"{r['peak_gib']:.2f}" for r in results)
                speedup = f"  {single / step:.2f}x the 1-process step" if single and processes > 1 else ""
                single = step if processes == 1 else single
                capped_step = step if processes == 1 and sampler == "mmrns" else capped_step
                print(f"{row} {step:8.3f} {results[0]['sync_s']:8.3f} {BATCH / step:9,.0f} {per_thousand:11.2f} {per_thousand * test_queries / 1000:11.0f}  {peaks} ({estimate:.2f}){speedup}", flush=True)
            if sampler == "mmrns" and math.ceil(entities / 10) > args.presample_cap and capped_step:
                uncapped = math.ceil(entities / 10)
                print(f"{'':8s} uncapped P = |E|/10 = {uncapped:,d}: step ~{capped_step * uncapped / args.presample_cap:.1f} s on 1 process "
                      f"(linear projection of the capped step), Gumbel noise [n, B, P] {NEGATIVES * BATCH * uncapped * 4 / GIB:.2f} GiB")
    total = psutil.virtual_memory().total / GIB
    ratio = sizes[-1][1] / sizes[-1][0]
    for sampler in args.samplers.split(","):
        limits = ", ".join(f"{n} process{'es' if n > 1 else ''}: |E| {largest_fitting(sampler, n, total, args.presample_cap, ratio):,d}"
                           for n in (int(n) for n in args.processes.split(",")))
        print(f"largest graph in this machine's {total:.0f} GiB ({ratio:.2f} train triples per entity, estimate): {sampler}: {limits}")


if __name__ == "__main__":
    main()
