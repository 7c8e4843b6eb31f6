"""The crawl stage's library: gather entity descriptions and images from the web (DBpedia,
Wikidata, Wikimedia Commons) or from local files, verify and store the images
content-addressed (see :mod:`pipeline.media`), and record everything in a resumable
manifest. Modules: :mod:`.http` (polite client), :mod:`.sources` (lookups),
:mod:`.images` (verification, normalisation, store), :mod:`.manifest` (SQLite manifest),
:mod:`.driver` (the crawl itself)."""
from pipeline.crawl.driver import CrawlConfig, CrawlSummary, crawl, read_entities
from pipeline.crawl.manifest import Manifest

__all__ = ["CrawlConfig", "CrawlSummary", "Manifest", "crawl", "read_entities"]
