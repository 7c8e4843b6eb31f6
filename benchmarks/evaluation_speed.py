"""Wall time and memory of one full filtered test evaluation on MKG-W (issue 7).

One evaluation = 4274 test triples, head and tail queries against all 15000 entities,
filter = train + valid + test, optimistic / pessimistic / realistic ranks, overall, per
direction and per relation category: exactly :func:`pipeline.evaluation.evaluate` as the
``evaluate`` stage and validation during training call it. Models are randomly initialised
(the time does not depend on training). Prints the median of ``--repeats`` runs, the peak
extra memory (RSS above the level before the run, sampled every 2 ms), and the speed-up
over the reference figures measured on this machine (PyKEEN 1.11: 44-102 s; the authors'
released script: 207 s).

    python benchmarks/evaluation_speed.py [--data data/mkg-w] [--models TransE,DistMult,ComplEx]

Without ``data/mkg-w`` the canonical dataset is built in a temporary directory from the
mirror in ``$MMRNS_DATA_MIRROR``, else from the copy embedded in ``datasets/mkg-w/``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data import import_dataset, load_manifest  # noqa: E402
from pipeline.evaluation import evaluate, graph_filter  # noqa: E402
from pipeline.graph import KnowledgeGraph, load_graph  # noqa: E402
from pipeline.models import KGCModel, build_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYKEEN_SECONDS = (44.0, 102.0)  # PyKEEN 1.11, same evaluation, same machine
AUTHORS_SECONDS = 207.0  # the authors' released script
TARGET_SECONDS, TARGET_GIB = 3.0, 1.5  # issue 7, for TransE and DistMult
SHARED = {"dim": 200, "gamma": 3.0, "regularization": 5e-5}  # the paper's MKG-W settings
CONFIGURATIONS = {  # label -> (registered model, model options)
    "TransE": ("TransE", {"p": 2}),
    "TransE-L1": ("TransE", {"p": 1}),
    "DistMult": ("DistMult", {}),
    "ComplEx": ("ComplEx", {}),
    "RotatE": ("RotatE", {}),
    "PairRE": ("PairRE", {}),
    "GC-OTE": ("GC-OTE", {}),
}


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.process = interval, psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_gib(self) -> float:
        return (self.peak - self.baseline) / 2**30


def load_mkg_w(data: Path) -> KnowledgeGraph:
    if (data / "train.parquet").is_file():
        return load_graph(data)
    mirror = os.environ.get("MMRNS_DATA_MIRROR") or None
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "mkg-w"
        import_dataset(load_manifest(REPO / "datasets" / "mkg-w.yaml"), out, mirror=mirror, embedded=REPO / "datasets" / "mkg-w")
        return load_graph(out)


def measure(model: KGCModel, graph: KnowledgeGraph, repeats: int, batch_size: int) -> tuple[list[float], list[float]]:
    """Wall seconds and peak extra GiB of each of ``repeats`` full test evaluations."""
    seconds, gib = [], []
    for _ in range(repeats):
        with PeakRSS() as memory:
            start = time.perf_counter()
            evaluate(model, graph, "test", batch_size=batch_size)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        gib.append(memory.extra_gib)
    return seconds, gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "mkg-w")
    parser.add_argument("--models", default="TransE,DistMult,ComplEx", help=f"comma-separated, from {', '.join(CONFIGURATIONS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graph = load_mkg_w(args.data)
    start = time.perf_counter()
    graph_filter(graph)
    filter_ms = (time.perf_counter() - start) * 1000
    print(
        f"MKG-W: {graph.num_entities} entities, {len(graph.test)} test triples x 2 directions; "
        f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}; "
        f"filter index built once per graph in {filter_ms:.0f} ms; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings need an otherwise idle machine)"
    )
    header = f"{'model':<10} {'median s':>9} {'runs s':>20} {'peak extra GiB':>15} {'vs PyKEEN 44-102 s':>20} {'vs authors 207 s':>17}  target"
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for label in args.models.split(","):
        name, options = CONFIGURATIONS[label]
        model = build_model(name, graph, SHARED, options).to(device)
        seconds, gib = measure(model, graph, args.repeats, args.batch_size)
        median, peak = statistics.median(seconds), max(gib)
        runs = "/".join(f"{s:.2f}" for s in seconds)
        pykeen = f"{PYKEEN_SECONDS[0] / median:.0f}-{PYKEEN_SECONDS[1] / median:.0f}x faster"
        target = "ok" if median <= TARGET_SECONDS and peak <= TARGET_GIB else f"MISSES {TARGET_SECONDS} s / {TARGET_GIB} GiB"
        print(f"{label:<10} {median:>9.2f} {runs:>20} {peak:>15.3f} {pykeen:>20} {AUTHORS_SECONDS / median:>11.0f}x faster  {target}")


if __name__ == "__main__":
    main()
