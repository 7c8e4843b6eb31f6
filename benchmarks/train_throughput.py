"""Training throughput of the real loop (`pipeline.training.fit`) on a benchmark graph.

For each model: ``--repeats`` fresh processes each train ``--steps`` steps with the Uniform
sampler and the self-adversarial NS loss at the paper's settings (batch 400, n 20, d 200),
and report the median positive triples/s (time in training steps; validation is a no-op
here) and the largest peak RSS of the process, with their ratios to the reference figures
measured on this machine (issue 7): PyKEEN 1.11 TransE 21.8k triples/s at 4.4 GiB peak,
the authors' script 4.9k triples/s.

    python benchmarks/train_throughput.py --data data/mkg-w
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYKEEN_TRIPLES_PER_SECOND, PYKEEN_PEAK_GIB, AUTHORS_TRIPLES_PER_SECOND = 21_800, 4.4, 4_900
TARGET_TRIPLES_PER_SECOND, TARGET_PEAK_GIB = 44_000, 2.0


def measure(data: Path, model_name: str, steps: int, threads: int | None) -> dict:
    """One run in this process: ``{"triples_per_second", "peak_gib"}``."""
    sys.path.insert(0, str(REPO))
    import torch

    from pipeline.graph import load_graph
    from pipeline.losses import NegativeSamplingLoss
    from pipeline.models import build_model
    from pipeline.samplers import SAMPLERS
    from pipeline.training import TrainSettings, fit

    if threads:
        torch.set_num_threads(threads)
    graph = load_graph(data)
    torch.manual_seed(0)
    shared = {"dim": 200, "gamma": 3.0, "regularization": 5e-5}
    model = build_model(model_name, graph, shared)
    sampler = SAMPLERS.get("uniform")(graph, 20, 0)
    settings = TrainSettings(steps=steps, batch_size=400, lr=1e-3, sampler_lr=1e-4, valid_every=steps, patience=1, seed=0, log_every=100)
    with tempfile.TemporaryDirectory() as directory:
        result = fit(
            model, sampler, NegativeSamplingLoss(0.5, True), graph, settings, directory,
            validate=lambda m: {"mrr": 0.0, "hits@10": 0.0},
            model_config={"name": model_name, "shared": shared, "options": {}},
            fingerprint={"benchmark": model_name}, progress=False,
        )
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"triples_per_second": result.triples_per_second, "peak_gib": peak_kib / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "mkg-w", help="canonical dataset directory")
    parser.add_argument("--models", nargs="+", default=["TransE", "DistMult", "ComplEx"])
    parser.add_argument("--steps", type=int, default=4000, help="training steps per run (the first ~1000 include warm-up; 4000 measure the steady state)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per model (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.data, args.child, args.steps, args.threads)))
        return

    print(f"train throughput on {args.data}: batch 400, n 20, d 200, uniform sampler, NS loss; "
          f"{args.steps} steps x {args.repeats} runs per model, threads={args.threads or 'torch default'}")
    header = f"{'model':<10} {'triples/s (median)':>18} {'runs':>26} {'vs PyKEEN':>10} {'vs authors':>10} {'peak GiB':>9} {'PyKEEN/peak':>11}"
    print(header)
    for model_name in args.models:
        runs = []
        for _ in range(args.repeats):
            command = [sys.executable, __file__, "--data", str(args.data), "--steps", str(args.steps), "--child", model_name]
            if args.threads:
                command += ["--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
        speed = statistics.median(run["triples_per_second"] for run in runs)
        peak = max(run["peak_gib"] for run in runs)
        listed = "/".join(f"{run['triples_per_second'] / 1000:.1f}k" for run in runs)
        print(f"{model_name:<10} {speed:>18,.0f} {listed:>26} {speed / PYKEEN_TRIPLES_PER_SECOND:>9.2f}x "
              f"{speed / AUTHORS_TRIPLES_PER_SECOND:>9.2f}x {peak:>9.2f} {PYKEEN_PEAK_GIB / peak:>10.2f}x")
        if model_name == "TransE":
            verdict = "meets" if speed >= TARGET_TRIPLES_PER_SECOND and peak <= TARGET_PEAK_GIB else "MISSES"
            print(f"{'':<10} target (issue 7): >= {TARGET_TRIPLES_PER_SECOND:,} triples/s and <= {TARGET_PEAK_GIB} GiB -> {verdict}")


if __name__ == "__main__":
    main()
