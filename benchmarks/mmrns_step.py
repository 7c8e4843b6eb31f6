"""Time per training step and peak memory of MMRNS and Uniform at the released script's setting.

Setting: the MKG-W graph (``data/mkg-w`` when the download stage has run, else random
triples of its sizes: |E| = 15000, |R| = 169, 34196 train triples; ``--random-graph``
forces these), text features [E, 4, 384], image features [E, 24, 383] (float16 as the
extract stages store them, random unless cache directories are given), TransE d = 200, batch 400, n = 20, pre-sample 1500,
eps0 10, beta 0.01 (the script's), the self-adversarial negative-sampling loss, one Adam
with two parameter groups (:func:`pipeline.training.build_optimizer`). A step is sample +
KGC loss + auxiliary loss + backward + Adam. Configurations:

- ``mmrns``: the published sampler (both modalities, KGC gradient into the sampler);
- ``mmrns-detached``: draws without the KGC gradient (``kgc_gradient: none``, Gumbel-top-k);
- ``mmrns-relation``, ``mmrns-relation-detached``: the same with one pre-sample per relation group
  (``presample_scope: relation``, ``presample_min`` 50; a variant, not the published math);
- ``uniform``: the Uniform sampler, same model, loss and optimizer;
- ``floor`` (printed after Uniform): :func:`matmul_floor`, the time of the matrix products the
  published math needs at this graph's distinct relations per batch, each run alone as one plain
  GEMM: a practical lower bound of the published step on this machine (everything else it does
  only adds to it); ``floor-detached``: the same for ``mmrns-detached``, whose gradients reach
  only the relation groups with a row whose query has another known answer in the pre-sample.

Each configuration runs in a fresh process (its peak RSS, ``ru_maxrss``, is its own) and
prints ``NAME median X s/step (CPU Y s) peak RSS Z GiB``, its ratio to Uniform's median from
the same run, and a breakdown of the median step (torch profiler over the last steps;
``encode``: relation-free KCA, ``gated``: relation-gated KCA, ``structure``: eq. 7 and its
cosine, ``draws``: eq. 12-13 and the straight-through select, ``backward``: ``loss.backward``).
A random graph spreads a batch over ~150 distinct relations (MKG-W: ~57), the worst case for
the per-relation deduplication. Measure on a quiet machine: with other processes competing
for the two cores, PyTorch's threads wait on each other and every figure grows.

    python benchmarks/mmrns_step.py [--steps 21] [--threads 2] [--data DIR | --random-graph]
        [--text-cache DIR] [--visual-cache DIR] [--configs mmrns,mmrns-detached,uniform]
        [--presample 750,1500,3000] [--batch 200,400,800]

``--presample`` / ``--batch`` sweep one setting for the MMRNS configurations (one line each).
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
from pipeline.samplers.known_positives import KnownPositives  # noqa: E402
from pipeline.samplers.mmrns import MMRNSSampler  # noqa: E402
from pipeline.training import GradientDensifier, TrainSettings, build_optimizer  # noqa: E402

ENTITIES, RELATIONS, TRAIN_TRIPLES = 15000, 169, 34196
BATCH, NEGATIVES, PRESAMPLE, DIM, GAMMA = 400, 20, 1500, 200, 3.0
CONFIGS = {
    "mmrns": {"kgc_gradient": "minimise"},
    "mmrns-detached": {"kgc_gradient": "none"},
    "mmrns-relation": {"kgc_gradient": "minimise", "presample_scope": "relation"},
    "mmrns-relation-detached": {"kgc_gradient": "none", "presample_scope": "relation"},
    "uniform": None,
}
PARTS = ("mmrns.encode", "mmrns.gated", "mmrns.structure", "mmrns.draws")
PROFILED_STEPS = 3


def features(
    cache: str | None, shape: tuple[int, int], entities: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A feature cache as tensors in its stored dtype, or random float16 features (the extract stages'
    default storage; an eighth of the entities missing)."""
    if cache:
        from pipeline.features import load_features

        loaded = load_features(cache)
        return torch.from_numpy(loaded.values[:]), torch.from_numpy(loaded.mask.copy())
    mask = torch.rand(entities, generator=generator) > 0.125
    values = torch.empty(entities, *shape, dtype=torch.float16)
    for start in range(0, entities, 1000):  # float32 in slices: never the whole table at float32
        part = slice(start, start + 1000)
        values[part] = torch.randn(len(values[part]), *shape, generator=generator).mul_(mask[part].view(-1, 1, 1))
    return values, mask


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


def run(config: str, steps: int, threads: int, data: str | None, text_cache: str | None, visual_cache: str | None,
        presample: int, batch: int) -> dict:
    """Time ``steps`` training steps of one configuration in this process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    graph = benchmark_graph(data, generator)
    train = graph.train
    model = MODELS.get("TransE")(graph.num_entities, graph.num_relations, DIM, GAMMA)
    if CONFIGS[config] is not None:
        text, text_mask = features(text_cache, (4, 384), graph.num_entities, generator)
        visual, visual_mask = features(visual_cache, (24, 383), graph.num_entities, generator)
        sampler = MMRNSSampler(
            graph, NEGATIVES, 0, entity_dim=DIM, relation_dim=DIM, text_features=text, text_mask=text_mask,
            visual_features=visual, visual_mask=visual_mask, presample_size=presample, eps0=10.0, beta=0.01,
            **CONFIGS[config],
        )
    else:
        sampler = SAMPLERS.get(config)(graph, NEGATIVES, 0)
    loss_fn = NegativeSamplingLoss(0.5, True)
    settings = TrainSettings(steps=steps, batch_size=batch, lr=1e-4, sampler_lr=1e-4, valid_every=steps, patience=0, seed=0)
    optimizer = build_optimizer(model, sampler, settings)
    densify_gradients = GradientDensifier(optimizer)
    times, cpu_times, backward_times, parts = [], [], [], {part: [] for part in PARTS}
    for step in range(steps + PROFILED_STEPS):
        profiled = step >= steps
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled else None
        if profiler:
            profiler.__enter__()
        start, cpu_start = time.perf_counter(), time.process_time()
        positives = train[torch.randint(len(train), (batch,), generator=generator)]
        negatives = sampler.sample(positives, model, step)
        scores = model.score_negatives(positives, negatives.as_model_input(), negatives.corrupt_head)
        loss = loss_fn(model.score_triples(positives), scores)
        auxiliary = sampler.auxiliary_loss(positives, negatives, scores, model)
        if auxiliary is not None:
            loss = loss + auxiliary
        optimizer.zero_grad(set_to_none=True)
        backward_start = time.perf_counter()
        loss.backward()
        backward_time = time.perf_counter() - backward_start
        densify_gradients()
        optimizer.step()
        if profiler:
            profiler.__exit__(None, None, None)
            totals = {event.key: event.cpu_time_total / 1e6 for event in profiler.key_averages()}
            for part in PARTS:
                parts[part].append(totals.get(part, 0.0))
            backward_times.append(backward_time)
        else:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    breakdown = {part.split(".")[1]: statistics.median(values) for part, values in parts.items()}
    breakdown["backward"] = statistics.median(backward_times)
    return {
        "config": config, "median_step_s": statistics.median(times), "median_step_cpu_s": statistics.median(cpu_times),
        "peak_rss_gib": peak_kib / 2**20, "steps": steps, "breakdown": breakdown, "presample": presample, "batch": batch,
    }


def batch_groups(graph: KnowledgeGraph, batch: int, presample: int, draws: int = 50) -> tuple[float, float]:
    """Mean over ``draws`` random batches (half corrupting heads, half tails) of ``G``, the distinct
    relations of a batch, and ``G_c``, those with a row whose query has another known answer in a
    uniform pre-sample of ``presample`` entities (the rows the contrastive loss differentiates; the
    sampler's own test, :meth:`KnownPositives.answers_among`)."""
    generator = torch.Generator().manual_seed(0)
    known = KnownPositives(graph.train, graph.num_entities, graph.num_relations)
    groups, contrastive = [], []
    for k in range(draws):
        positives = graph.train[torch.randint(len(graph.train), (batch,), generator=generator)]
        candidates = torch.randperm(graph.num_entities, generator=generator)[:presample]
        corrupt_head = torch.full((batch,), k % 2 == 1)
        own = candidates == torch.where(corrupt_head, positives[:, 0], positives[:, 2]).unsqueeze(1)  # [B, P]
        rows = (known.answers_among(positives, candidates, corrupt_head) & ~own).any(1)
        groups.append(len(torch.unique(positives[:, 1])))
        contrastive.append(len(torch.unique(positives[rows, 1])))
    return statistics.mean(groups), statistics.mean(contrastive)


def matmul_floor(groups: float, contrastive_groups: float | None, batch: int, presample: int, threads: int) -> dict:
    """The matrix products an MMRNS step cannot avoid (exact math, one pre-sample per batch) at
    ``groups`` distinct relations per batch, timed as GEMMs of the same shapes on this machine:
    structure (eq. 7's second layer over ``[G, P]``), relation-gated KCA per modality
    (coefficients x values and the LayerNorm variance over ``[P, G]``), each forward over all ``G``
    groups and its two gradients over the groups that get one: all of them and the
    straight-through gradient ``[B n, d] x [d, P]`` for the published step
    (``contrastive_groups=None``), only the ``G_c`` groups with a contrastive positive without
    the KGC gradient."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    g = round(groups)
    graded = g if contrastive_groups is None else round(contrastive_groups)
    hidden, attention = 100, 50
    shapes = [(g * presample, hidden, DIM)] + [(graded * presample, hidden, DIM)] * 2  # forward, grad of W2, grad of the hidden layer
    for slots, tokens in ((4, 24), (24, 4)):  # visual (K = Tt, J = Ti), text (K = Ti, J = Tt)
        shapes += [(presample * g, slots * tokens, attention)] + [(presample * graded, slots * tokens, attention)] * 2
        shapes += [(slots * presample, tokens * tokens, g)] + [(slots * presample, tokens * tokens, graded)] * 2
    if contrastive_groups is None:
        shapes.append((batch * NEGATIVES, DIM, presample))
    shapes = [shape for shape in shapes if min(shape) > 0]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    seconds = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
        timings = []
        for _ in range(4):  # the first warms up; the fastest of the others counts
            start = time.perf_counter()
            a @ b
            timings.append(time.perf_counter() - start)
        seconds += min(timings[1:])
    return {"gflop": flops / 1e9, "seconds": seconds}


def measure(args: argparse.Namespace, config: str, data: str | None, presample: int, batch: int) -> dict:
    """One configuration in a fresh process."""
    command = [sys.executable, __file__, "--only", config, "--steps", str(args.steps), "--threads", str(args.threads),
               "--presample", str(presample), "--batch", str(batch)]
    for flag, value in (("--data", data), ("--text-cache", args.text_cache), ("--visual-cache", args.visual_cache)):
        if value:
            command += [flag, value]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def line(result: dict, uniform: float | None) -> str:
    parts = result["breakdown"]
    shown = "  ".join(f"{name} {seconds:.3f}" for name, seconds in parts.items() if seconds > 0 or name == "backward")
    ratio = f"  {result['median_step_s'] / uniform:.1f}x uniform" if uniform else ""
    return (f"{result['config']:15s} median {result['median_step_s']:.3f} s/step (CPU {result['median_step_cpu_s']:.3f} s)  "
            f"peak RSS {result['peak_rss_gib']:.2f} GiB{ratio}  P={result['presample']} B={result['batch']}  [{shown}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", help="canonical dataset dir (default: data/mkg-w if present, else random triples)")
    parser.add_argument("--random-graph", action="store_true", help="random triples of MKG-W's sizes")
    parser.add_argument("--text-cache")
    parser.add_argument("--visual-cache")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--presample", default=str(PRESAMPLE), help="comma-separated pre-sample sizes (sweep)")
    parser.add_argument("--batch", default=str(BATCH), help="comma-separated batch sizes (sweep)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    args = parser.parse_args()
    default_data = ROOT / "data" / "mkg-w"
    data = args.data or (str(default_data) if (default_data / "train.parquet").is_file() else None)
    data = None if args.random_graph else data
    presamples, batches = [int(v) for v in args.presample.split(",")], [int(v) for v in args.batch.split(",")]
    if args.only:
        result = run(args.only, args.steps, args.threads, data, args.text_cache, args.visual_cache, presamples[0], batches[0])
        print(json.dumps(result))
        return
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; valid: {', '.join(CONFIGS)}")
    print(f"threads: {args.threads}  graph: {data or 'random, MKG-W sizes'}  n={NEGATIVES} d={DIM} TransE  "
          f"features: {args.visual_cache or 'random'} / {args.text_cache or 'random'}  steps: {args.steps} (median)")
    uniform = {b: measure(args, "uniform", data, presamples[0], b) for b in batches}
    for b in batches:
        print(line(uniform[b], None), flush=True)
    groups, contrastive = batch_groups(benchmark_graph(data, torch.Generator().manual_seed(0)), batches[0], presamples[0])
    base = uniform[batches[0]]["median_step_s"]
    for name, graded, what in (("floor", None, "the published step's"), ("floor-detached", contrastive, "the detached step's")):
        floor = matmul_floor(groups, graded, batches[0], presamples[0], args.threads)
        print(f"{name:15s} median {floor['seconds']:.3f} s/step  {floor['seconds'] / base:.1f}x uniform  "
              f"({what} unavoidable matrix products: {floor['gflop']:.1f} GFLOP at G = {groups:.1f} distinct relations per batch"
              f"{f', G_c = {contrastive:.1f} of them with a contrastive positive' if graded is not None else ''}, timed as plain GEMMs here)", flush=True)
    for config in configs:
        if config == "uniform":
            continue
        for b in batches:
            for presample in presamples:
                print(line(measure(args, config, data, presample, b), uniform[b]["median_step_s"]), flush=True)


if __name__ == "__main__":
    main()
