"""Crawl throughput against the loopback fake services (tests/fake_services.py).

Crawls N entities (each: a DBpedia abstract, a Wikidata P18 file behind a Commons
redirect, a distinct 320x240 JPEG) with the params.yaml crawl settings, except: endpoints
on the loopback server, no per-host rate limit (all "hosts" are 127.0.0.1). Prints
entities/s and image items/s (download + verify + resize + store).

    python benchmarks/crawl_throughput.py --entities 2000 --concurrency 8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fake_services import FakeServices, image_bytes  # noqa: E402
from pipeline.crawl import CrawlConfig, crawl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    services = FakeServices(lifetime=3600).start()
    names = [f"Entity_{i}" for i in range(args.entities)]
    for i, name in enumerate(names):
        services.abstracts[f"http://dbpedia.org/resource/{name}"] = f"{name} is an entity. It has an image."
        services.p18[f"Q{i + 1}"] = [f"{name}.jpg"]
        services.files[f"{name}.jpg"] = image_bytes((320, 240), (i % 256, (i // 256) % 256, 90))
    entities = pd.DataFrame({"id": range(len(names)), "key": [f"http://dbpedia.org/resource/{n}" for n in names],
                             "label": names, "dbpedia": [f"http://dbpedia.org/resource/{n}" for n in names],
                             "wikidata": [f"http://www.wikidata.org/entity/Q{i + 1}" for i in range(len(names))]})
    params = yaml.safe_load((REPO / "params.yaml").read_text())["crawl"]
    params["endpoints"] = services.endpoints()
    params["http"].update(concurrency=args.concurrency, requests_per_second_per_host=0)
    config = CrawlConfig.from_params(params)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = crawl(entities, Path(tmp) / "manifest.sqlite", Path(tmp) / "images", config, progress=False)
            seconds = time.perf_counter() - start
    finally:
        services.stop()
    images = summary.counts.get("images", {}).get("done", 0)
    print(summary.line())
    print(f"{args.entities} entities in {seconds:.1f} s: {args.entities / seconds:.1f} entities/s, "
          f"{images / seconds:.1f} images/s (concurrency {args.concurrency})")


if __name__ == "__main__":
    main()
