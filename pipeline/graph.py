"""The canonical knowledge graph every training-side component reads.

A canonical dataset directory (written by the download stage, see ``pipeline.data``) holds:

- ``entities.parquet``: ``id`` (0..E-1), ``key``, ``label`` and external URIs
  (``dbpedia``, ``wikidata``, ``yago``, ``freebase`` where the sources give them);
- ``relations.parquet``: ``id`` (0..R-1), ``key``, ``label``;
- ``train.parquet``, ``valid.parquet``, ``test.parquet``: int64 ``head``, ``relation``, ``tail``;
- ``test_1-1.parquet``, ``test_1-n.parquet``, ``test_n-1.parquet``, ``test_n-n.parquet``:
  the test triples of each relation category, same columns;
- ``report.json``: counts and data defects.

Triples in memory are int64 tensors ``[N, 3]`` with columns (head, relation, tail).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import DataError
from pipeline.tables import read_table

SPLITS = ("train", "valid", "test")
CATEGORIES = ("1-1", "1-n", "n-1", "n-n")
TRIPLE_COLUMNS = ["head", "relation", "tail"]


def category_file(category: str) -> str:
    """File name of the test subset of one relation category, e.g. ``test_1-n.parquet``."""
    return f"test_{category}.parquet"


@dataclass(frozen=True)
class KnowledgeGraph:
    """Entities, relations and the three splits of one benchmark, as tensors."""

    num_entities: int
    num_relations: int
    train: torch.Tensor  # [N_train, 3] int64 (head, relation, tail)
    valid: torch.Tensor  # [N_valid, 3]
    test: torch.Tensor  # [N_test, 3]
    test_categories: dict[str, torch.Tensor] = field(default_factory=dict)  # category -> [N_c, 3]
    entity_labels: tuple[str, ...] = ()
    relation_labels: tuple[str, ...] = ()

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def all_triples(self) -> torch.Tensor:
        """Train + valid + test ``[N, 3]``: the filter of filtered evaluation."""
        return torch.cat([self.train, self.valid, self.test])


def read_triples(path: Path) -> torch.Tensor:
    """Read a canonical triple table ``[N, 3]`` (head, relation, tail)."""
    frame = read_table(path, TRIPLE_COLUMNS, "download")
    return torch.from_numpy(frame.to_numpy(dtype="int64").copy())


def load_graph(directory: str | Path) -> KnowledgeGraph:
    """Load a canonical dataset directory into a :class:`KnowledgeGraph`."""
    directory = Path(directory)
    entities = read_table(directory / "entities.parquet", ["id", "label"], "download").sort_values("id")
    relations = read_table(directory / "relations.parquet", ["id", "label"], "download").sort_values("id")
    splits = {name: read_triples(directory / f"{name}.parquet") for name in SPLITS}
    categories = {
        c: read_triples(directory / category_file(c)) for c in CATEGORIES if (directory / category_file(c)).is_file()
    }
    graph = KnowledgeGraph(
        num_entities=len(entities),
        num_relations=len(relations),
        test_categories=categories,
        entity_labels=tuple(entities["label"].astype(str)),
        relation_labels=tuple(relations["label"].astype(str)),
        **splits,
    )
    for name, triples in [*splits.items(), *((f"test_{c}", t) for c, t in categories.items())]:
        if len(triples) and (
            triples[:, [0, 2]].min() < 0
            or triples[:, [0, 2]].max() >= graph.num_entities
            or triples[:, 1].min() < 0
            or triples[:, 1].max() >= graph.num_relations
        ):
            raise DataError(directory / f"{name}.parquet", "entity or relation id out of range")
    return graph
