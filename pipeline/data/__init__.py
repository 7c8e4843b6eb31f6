"""Benchmark import: manifests, fetching (mirror, embedded copy or pinned sources), raw readers, and the
canonical dataset directory read by :func:`pipeline.graph.load_graph`."""
from pipeline.data.build import import_dataset
from pipeline.data.fetch import DEFAULT_SOURCE_URL, unpack_embedded
from pipeline.data.manifest import Manifest, load_manifest

__all__ = ["DEFAULT_SOURCE_URL", "Manifest", "import_dataset", "load_manifest", "unpack_embedded"]
