"""Time per training step of every registered negative sampler, relative to Uniform, in one run.

Setting: the canonical MKG-W graph (``data/mkg-w``; ``--data`` for another), TransE d 200
(p 2, gamma 3), batch 400, n 20, Adam with the sampler's own group
(:func:`pipeline.training.build_optimizer`); each sampler with its ``params.yaml`` options and
the loss its Table 2 row uses (:func:`pipeline.table2.overrides`: margin for Bernoulli, KBGAN,
NSCaching; the self-adversarial NS loss for Uniform, SANS, MMRNS; NS-KGE its own). A step is the training loop's: :func:`pipeline.training.step_loss` (sample, score,
losses) + backward + densify + Adam. Each sampler runs in a fresh process (own peak RSS); the
figures are the median wall-clock step time of ``--steps`` steps, the construction time
(neighbourhoods, caches, ...) and the peak RSS. MMRNS runs without feature caches unless
``--features DIR`` (``text/``, ``visual/``) is given; ``benchmarks/mmrns_step.py`` measures it
at the released script's setting.

    python benchmarks/sampler_step.py [--data data/mkg-w] [--steps 21] [--threads 1] [--samplers ...]
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

BATCH, NEGATIVES, SHARED = 400, 20, {"dim": 200, "gamma": 3.0, "regularization": 0.0}


def run(name: str, data: Path, steps: int, threads: int, features: Path | None) -> dict:
    """One sampler in this process: median step seconds, construction seconds, peak RSS."""
    import torch
    import yaml

    from pipeline.features import load_features
    from pipeline.graph import load_graph
    from pipeline.losses import build_loss
    from pipeline.models import build_model
    from pipeline.samplers import build_sampler
    from pipeline.table2 import Cell, overrides
    from pipeline.training import GradientDensifier, TrainSettings, build_optimizer, step_loss

    torch.set_num_threads(threads)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    graph = load_graph(data)
    torch.manual_seed(0)
    model = build_model("TransE", graph, SHARED)
    caches = {kind: load_features(features / kind) if features and (features / kind).is_dir() else None for kind in ("text", "visual")}
    start = time.perf_counter()
    sampler = build_sampler(name, params["sampler"].get(name) or {}, graph, model, NEGATIVES, 0, **caches)
    construction = time.perf_counter() - start
    recipe = overrides(Cell("mkg-w", "TransE", name))  # the loss of the sampler's Table 2 row
    loss_fn = build_loss(recipe["train.loss"], SHARED["gamma"], 0.5, recipe["train.self_adversarial"])
    optimizer = build_optimizer(model, sampler, TrainSettings(steps=steps, batch_size=BATCH, lr=1e-3, sampler_lr=1e-4, valid_every=steps, patience=1, seed=0))
    densify = GradientDensifier(optimizer)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        positives = graph.train[torch.randint(len(graph.train), (BATCH,), generator=generator)]
        loss = step_loss(model, sampler, loss_fn, positives, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        densify()
        optimizer.step()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"sampler": name, "step_s": statistics.median(times), "construction_s": construction, "peak_rss_gib": peak, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "mkg-w")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steady on a shared machine)")
    parser.add_argument("--samplers", nargs="+", help="default: every registered sampler")
    parser.add_argument("--features", type=Path, help="feature caches (text/, visual/) for MMRNS")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: one sampler in this process
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run(args.only, args.data, args.steps, args.threads, args.features)))
        return
    from pipeline.samplers import SAMPLERS

    names = args.samplers or SAMPLERS.names()
    names = ["uniform"] + [name for name in names if name != "uniform"]
    print(f"{args.data}: TransE d {SHARED['dim']}, batch {BATCH}, n {NEGATIVES}, {args.steps} steps per sampler, "
          f"{args.threads} thread(s), params.yaml options")
    print(f"{'sampler':<10} {'s/step':>8} {'x Uniform':>9} {'build s':>8} {'peak GiB':>8}")
    reference = None
    for name in names:
        command = [sys.executable, __file__, "--only", name, "--data", str(args.data), "--steps", str(args.steps), "--threads", str(args.threads)]
        if args.features:
            command += ["--features", str(args.features)]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            print(f"{name:<10} failed: {finished.stderr.strip().splitlines()[-1]}")
            continue
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        reference = reference or result["step_s"]
        print(f"{name:<10} {result['step_s']:>8.4f} {result['step_s'] / reference:>9.2f} {result['construction_s']:>8.2f} {result['peak_rss_gib']:>8.2f}")


if __name__ == "__main__":
    main()
