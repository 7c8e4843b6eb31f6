"""Ask a trained model: entity and relation names, top-k completions, batch queries, export.

- :class:`Names` resolves a user's name to an id: a key or a label, case-insensitively
  (whitespace runs count as one space). An unknown name is an :class:`UnknownName` error
  listing the closest names (difflib, then substring matches); a name shared by several
  entities (MKG-W has two entities labelled ``Nixon (film)``) is an :class:`AmbiguousName`
  error listing each with its key, unless exactly one of them matches with exact case.
- :class:`Predictor` ranks every entity for a tail query ``(h, r, ?)`` or a head query
  ``(?, r, t)`` through the model's own ``score_all`` (so every KGC model works, and the
  scores are the ones filtered evaluation ranks), flags each answer that is already a TRAIN,
  VALID or TEST fact (TRAIN first if a triple is in several splits), and with
  ``filtered=True`` drops those known facts before taking the top k. Ranks are 1-based
  positions in that list (ties in arbitrary order).
- :meth:`Predictor.answer_file` answers a TSV of queries ``head<TAB>relation<TAB>tail`` with
  ``?`` as the missing side, streaming in batches to a Parquet or TSV file written atomically.
- :func:`export_embeddings` writes the representations the score function consumes as
  ``.npy`` plus Embedding Projector TSVs; ``export.json`` documents each array's layout
  (:data:`LAYOUTS`) and the constants needed to compute scores from them.
"""
from __future__ import annotations

import csv
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pipeline.atomic import atomic_path
from pipeline.errors import DataError, PipelineError
from pipeline.evaluation import _model_device
from pipeline.filtering import FilterIndex
from pipeline.graph import SPLITS, KnowledgeGraph, load_graph
from pipeline.models import KGCModel, Side
from pipeline.models.gcote import GCOTE
from pipeline.tables import read_table
from pipeline.training import load_model, read_checkpoint

MISSING = "?"  # the side a query asks for, in query files
NOT_KNOWN = -1  # known-split code of an answer that is no TRAIN/VALID/TEST fact
SUGGESTIONS = 5  # closest names listed in an unknown-name error


class UnknownName(PipelineError):
    """No entity (or relation) has this key or label; the message lists the closest names."""


class AmbiguousName(PipelineError):
    """Several entities share this label; the message lists them with their keys."""


def normalise(name: str) -> str:
    """Case-folded ``name`` with whitespace runs collapsed to one space: the matching form."""
    return " ".join(str(name).split()).casefold()


@dataclass(frozen=True)
class Names:
    """Keys and labels ``[N]`` of one kind of node (``"entity"`` or ``"relation"``), by id."""

    kind: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.labels):
            raise ValueError(f"{len(self.keys)} {self.kind} keys but {len(self.labels)} labels")
        index: dict[str, list[int]] = {}
        for i, (key, label) in enumerate(zip(self.keys, self.labels)):
            for form in {normalise(key), normalise(label)}:
                index.setdefault(form, []).append(i)
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, i: int) -> str:
        """``'label' (key ...)`` of id ``i``, or just ``'label'`` when the key is the label."""
        if self.keys[i] == self.labels[i]:
            return repr(self.labels[i])
        return f"{self.labels[i]!r} (key {self.keys[i]!r})"

    def resolve(self, name: str) -> int:
        """The id whose key or label matches ``name`` case-insensitively.

        Raises :class:`UnknownName` (with the closest names) or :class:`AmbiguousName` (with
        every match and its key); several case-insensitive matches of which exactly one
        matches with exact case resolve to that one.
        """
        matches = self._index.get(normalise(name), [])
        if len(matches) > 1:
            exact = [i for i in matches if name in (self.keys[i], self.labels[i])]
            matches = exact if len(exact) == 1 else matches
        if len(matches) == 1:
            return matches[0]
        if matches:
            listed = "; ".join(f"id {i}: {self.describe(i)}" for i in matches)
            raise AmbiguousName(f"{self.kind} {name!r} is ambiguous, {len(matches)} match: {listed}. Give the key to choose one")
        closest = self.closest(name)
        hint = f"closest: {', '.join(closest)}" if closest else "no similar name"
        raise UnknownName(f"unknown {self.kind} {name!r} (no key or label matches, ignoring case); {hint}")

    def closest(self, name: str, count: int = SUGGESTIONS) -> list[str]:
        """Up to ``count`` names similar to ``name``: difflib matches, then names containing it."""
        target = normalise(name)
        forms = list(self._index)
        found = difflib.get_close_matches(target, forms, n=count, cutoff=0.6)
        if len(found) < count and target:
            found += sorted((form for form in forms if target in form and form not in found), key=len)[: count - len(found)]
        if not found:  # nothing close: the best few anyway (slower, error path only)
            found = difflib.get_close_matches(target, forms, n=count, cutoff=0.0)
        ids = dict.fromkeys(i for form in found for i in self._index[form])  # ordered, unique
        return [self.describe(i) for i in list(ids)[:count]]


def load_names(directory: str | Path) -> tuple[Names, Names]:
    """Entity and relation :class:`Names` of a canonical dataset directory (``id, key, label``)."""
    directory = Path(directory)
    tables = [read_table(directory / f"{kind}.parquet", ["id", "key", "label"], "download").sort_values("id") for kind in ("entities", "relations")]
    return tuple(  # type: ignore[return-value]
        Names(kind, tuple(table["key"].astype(str)), tuple(table["label"].astype(str)))
        for kind, table in zip(("entity", "relation"), tables)
    )


class Completions(NamedTuple):
    """Top-k answers of ``B`` queries of one side. Rows with fewer than ``k`` answers (filtered
    mode on a tiny graph) are padded: ``present`` is False there."""

    ids: torch.Tensor  # [B, k] int64 entity ids, best first
    scores: torch.Tensor  # [B, k] float32 model scores (higher = more plausible)
    known: torch.Tensor  # [B, k] int8: index into SPLITS of the split holding the fact, NOT_KNOWN (-1) if none
    present: torch.Tensor  # [B, k] bool


@dataclass(frozen=True)
class Answer:
    """One query ``(head, relation, tail)`` (the asked side ``None``) and its ranked answers."""

    head: int | None
    relation: int
    tail: int | None
    filtered: bool
    rows: list[dict[str, Any]]  # rank, id, key, label, score, known (split name or None)
    entities: Names
    relations: Names

    @property
    def side(self) -> Side:
        return "head" if self.head is None else "tail"

    def node(self, names: Names, i: int | None) -> dict[str, Any] | None:
        return None if i is None else {"id": i, "key": names.keys[i], "label": names.labels[i]}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``query`` (head, relation, tail as id/key/label or null), ``side``, ``filtered``, ``answers``."""
        query = {"head": self.node(self.entities, self.head), "relation": self.node(self.relations, self.relation), "tail": self.node(self.entities, self.tail)}
        return {"query": query, "side": self.side, "filtered": self.filtered, "answers": self.rows}

    def markdown(self) -> str:
        """A heading line and a Markdown table of the answers."""
        def cell(text: Any) -> str:
            return str(text).replace("|", "\\|")

        slots = [self.entities.labels[self.head] if self.head is not None else "?", self.relations.labels[self.relation],
                 self.entities.labels[self.tail] if self.tail is not None else "?"]
        mode = "known facts filtered out" if self.filtered else "known TRAIN/VALID/TEST facts flagged"
        lines = [f"**({', '.join(map(cell, slots))})**: top {len(self.rows)} {self.side}s, {mode}", "",
                 f"| rank | {self.side} | key | id | score | known |", "|---:|---|---|---:|---:|---|"]
        for row in self.rows:
            lines.append(f"| {row['rank']} | {cell(row['label'])} | {cell(row['key'])} | {row['id']} | {row['score']:.4f} | {row['known'] or '-'} |")
        return "\n".join(lines)


#: Columns of a batch answer file, one row per (query, answer).
ANSWER_SCHEMA = pa.schema([
    ("line", pa.int64()),  # 1-based line of the query in the input file
    ("side", pa.string()),  # head | tail: the side asked for
    ("head", pa.string()),  # the query as written ("?" for the asked side)
    ("relation", pa.string()),
    ("tail", pa.string()),
    ("rank", pa.int32()),
    ("id", pa.int64()),
    ("key", pa.string()),
    ("label", pa.string()),
    ("score", pa.float32()),
    ("known", pa.string()),  # train | valid | test, or "" (not a known fact)
])


class Predictor:
    """A trained model (put in eval mode) with its graph's names and known facts (one filter per split)."""

    def __init__(self, model: KGCModel, graph: KnowledgeGraph, entities: Names, relations: Names):
        if (len(entities), len(relations)) != (graph.num_entities, graph.num_relations) or (model.num_entities, model.num_relations) != (graph.num_entities, graph.num_relations):
            raise PipelineError(
                f"size mismatch: names {len(entities)} entities / {len(relations)} relations, graph {graph.num_entities} / "
                f"{graph.num_relations}, model {model.num_entities} / {model.num_relations}"
            )
        self.model, self.graph, self.entities, self.relations = model.eval(), graph, entities, relations
        self.device = _model_device(model)
        self.known = [FilterIndex.build(graph.split(split), graph.num_entities, graph.num_relations).to(self.device) for split in SPLITS]

    @classmethod
    def load(cls, checkpoint: str | Path, directory: str | Path, device: torch.device | str = "cpu") -> Predictor:
        """The model of ``checkpoint`` over the canonical dataset in ``directory``."""
        graph = load_graph(directory)
        return cls(load_model(checkpoint, graph, device), graph, *load_names(directory))

    def complete(self, queries: torch.Tensor, side: Side, top: int, filtered: bool = False) -> Completions:
        """Top ``top`` answers of the ``side`` queries of ``queries [B, 3]`` (the asked column is ignored)."""
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        queries = queries.to(self.device, torch.long)
        with torch.inference_mode():
            scores = self.model.score_all(queries, side).float()  # [B, E]
            known = torch.full(scores.shape, NOT_KNOWN, dtype=torch.int8, device=self.device)
            for code in reversed(range(len(SPLITS))):  # train written last: it wins
                rows, entities = self.known[code].known_answers(queries, side)
                known[rows, entities] = code
            if filtered:
                scores = scores.masked_fill(known != NOT_KNOWN, float("-inf"))
            top_scores, top_ids = scores.topk(min(top, scores.shape[1]), dim=1)
            top_known = known.gather(1, top_ids)
        present = top_known == NOT_KNOWN if filtered else torch.ones_like(top_ids, dtype=torch.bool)
        return Completions(top_ids.cpu(), top_scores.cpu(), top_known.cpu(), present.cpu())

    def answer_rows(self, completions: Completions, row: int) -> list[dict[str, Any]]:
        """Row ``row`` of ``completions`` as dicts: rank, id, key, label, score, known."""
        out = []
        for i, score, code in zip(*(column[row][completions.present[row]].tolist() for column in completions[:3])):
            out.append({"rank": len(out) + 1, "id": i, "key": self.entities.keys[i], "label": self.entities.labels[i],
                        "score": score, "known": SPLITS[code] if code != NOT_KNOWN else None})
        return out

    def ask(self, relation: str, head: str | None = None, tail: str | None = None, top: int = 10, filtered: bool = False) -> Answer:
        """Answer ``(head, relation, ?)`` or ``(?, relation, tail)`` given by names (exactly one of head/tail)."""
        if (head is None) == (tail is None):
            raise PipelineError("give exactly one of head (a tail query) and tail (a head query)")
        h = None if head is None else self.entities.resolve(head)
        t = None if tail is None else self.entities.resolve(tail)
        r = self.relations.resolve(relation)
        side: Side = "head" if h is None else "tail"
        completions = self.complete(torch.tensor([[h or 0, r, t or 0]]), side, top, filtered)
        return Answer(h, r, t, filtered, self.answer_rows(completions, 0), self.entities, self.relations)

    # -- batch -----------------------------------------------------------------------
    def read_queries(self, path: Path, batch_size: int) -> Iterator[tuple[list[int], list[list[str]], torch.Tensor, torch.Tensor]]:
        """Batches of ``(line numbers, fields as written, ids [b, 3], head_side [b] bool)`` of a query TSV.

        Lines: ``head<TAB>relation<TAB>tail`` with ``?`` as the asked side; blank lines and a
        first line ``head relation tail`` (a header) are skipped. A bad line is a
        :class:`DataError` naming the file and line.
        """
        lines, fields, ids, head_side = [], [], [], []
        with open(path, encoding="utf-8", newline="") as handle:
            for number, text in enumerate(handle, 1):
                text = text.rstrip("\r\n")
                parts = [part.strip() for part in text.split("\t")]
                if not text.strip() or (number == 1 and [p.casefold() for p in parts] == ["head", "relation", "tail"]):
                    continue
                if len(parts) != 3:
                    raise DataError(path, f"expected 3 tab-separated fields (head, relation, tail), got {len(parts)}", number, text)
                if (parts[0] == MISSING) == (parts[2] == MISSING) or parts[1] == MISSING:
                    raise DataError(path, f"put {MISSING!r} in exactly one of the head and tail fields", number, text)
                try:
                    h, t = (0 if part == MISSING else self.entities.resolve(part) for part in (parts[0], parts[2]))
                    r = self.relations.resolve(parts[1])
                except (UnknownName, AmbiguousName) as error:
                    raise DataError(path, str(error), number) from None
                lines.append(number)
                fields.append(parts)
                ids.append([h, r, t])
                head_side.append(parts[0] == MISSING)
                if len(lines) == batch_size:
                    yield lines, fields, torch.tensor(ids), torch.tensor(head_side)
                    lines, fields, ids, head_side = [], [], [], []
        if lines:
            yield lines, fields, torch.tensor(ids), torch.tensor(head_side)

    def answer_batch(self, lines: list[int], fields: list[list[str]], ids: torch.Tensor, head_side: torch.Tensor, top: int, filtered: bool) -> pa.Table:
        """The answers of one batch of :meth:`read_queries` as a table of :data:`ANSWER_SCHEMA`."""
        columns: dict[str, list] = {name: [] for name in ANSWER_SCHEMA.names}
        results: dict[int, list[dict[str, Any]]] = {}
        for side, rows in (("head", head_side.nonzero().squeeze(1)), ("tail", (~head_side).nonzero().squeeze(1))):
            if len(rows):
                completions = self.complete(ids[rows], side, top, filtered)
                results.update({int(row): self.answer_rows(completions, i) for i, row in enumerate(rows)})
        for row, (number, (head, relation, tail)) in enumerate(zip(lines, fields)):
            for answer in results[row]:
                for name, value in (("line", number), ("side", "head" if head_side[row] else "tail"), ("head", head), ("relation", relation), ("tail", tail)):
                    columns[name].append(value)
                for name in ("rank", "id", "key", "label", "score"):
                    columns[name].append(answer[name])
                columns["known"].append(answer["known"] or "")
        return pa.table(columns, schema=ANSWER_SCHEMA)

    def answer_file(self, queries: str | Path, out: str | Path, top: int = 10, filtered: bool = False, batch_size: int = 256, progress: bool = False) -> int:
        """Answer every query of the TSV ``queries`` into ``out`` (``.parquet`` or ``.tsv``,
        :data:`ANSWER_SCHEMA`, written atomically); returns the number of queries.

        The file is read twice, streaming: once to check every line (so a typo on the last
        line fails before any scoring), once to score ``batch_size`` queries at a time.
        """
        queries, out = Path(queries), Path(out)
        if not queries.is_file():
            raise DataError(queries, "query file not found")
        if out.suffix not in (".parquet", ".tsv"):
            raise PipelineError(f"{out}: answer file must end in .parquet or .tsv")
        total = sum(len(batch[0]) for batch in self.read_queries(queries, batch_size))
        with atomic_path(out) as tmp, tqdm(total=total, desc="predict", unit="query", disable=not progress) as bar:
            if out.suffix == ".parquet":
                with pq.ParquetWriter(tmp, ANSWER_SCHEMA) as writer:
                    for batch in self.read_queries(queries, batch_size):
                        writer.write_table(self.answer_batch(*batch, top, filtered))
                        bar.update(len(batch[0]))
            else:
                with open(tmp, "w", encoding="utf-8", newline="") as handle:
                    handle.write("\t".join(ANSWER_SCHEMA.names) + "\n")
                    for batch in self.read_queries(queries, batch_size):
                        frame = self.answer_batch(*batch, top, filtered).to_pandas()
                        frame.to_csv(handle, sep="\t", header=False, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
                        bar.update(len(batch[0]))
        return total


# -- export --------------------------------------------------------------------------------
#: What ``entities.npy`` / ``relations.npy`` (and ``contexts.npy``) hold, per model class.
LAYOUTS: dict[str, dict[str, str]] = {
    "TransE": {
        "entities": "[E, dim] vectors e",
        "relations": "[R, dim] translations r",
        "score": "gamma - ||h + r - t||_p (p in constants)",
    },
    "DistMult": {
        "entities": "[E, dim] vectors e",
        "relations": "[R, dim] diagonal r",
        "score": "sum_j h_j r_j t_j",
    },
    "ComplEx": {
        "entities": "[E, 2 dim] complex e as [Re e | Im e]",
        "relations": "[R, 2 dim] complex r as [Re r | Im r]",
        "score": "Re(sum_j h_j r_j conj(t_j))",
    },
    "RotatE": {
        "entities": "[E, 2 dim] complex e as [Re e | Im e]",
        "relations": "[R, dim] raw phase parameters r; the rotation angle is theta = r * phase_scale (constants)",
        "score": "gamma - sum_j |h_j exp(i theta_j) - t_j|",
    },
    "PairRE": {
        "entities": "[E, dim] vectors e (unnormalised; the score L2-normalises them)",
        "relations": "[R, 2 dim] pairs [r_head | r_tail]",
        "score": "gamma - || h/|h| * r_head - t/|t| * r_tail ||_1",
    },
    "GCOTE": {
        "entities": "[E, dim] vectors e, K = dim / group_size blocks of group_size",
        "relations": "[R, K, s, s + 1] (s = group_size): [..., :s] the orthonormal rows phi_rk, [..., s] the log-scales sigma_rk; "
        "f_r(x)_k = (x_k * exp(sigma_rk)) @ phi_rk, f_r^-1(x)_k = (x_k @ phi_rk^T) * exp(-sigma_rk)",
        "contexts": "[2, E, dim] graph contexts from the TRAIN triples: [0] c(a) of tail queries (anchor a = head), [1] of head queries (anchor a = tail)",
        "score": "tail query: gamma - D(f_r(h), t) - D(f_r(c0(h)), t); head query: gamma - D(f_r^-1(t), h) - D(f_r^-1(c1(t)), h); "
        "D = sum over the K blocks of the L2 norm of the difference",
    },
}
GENERIC_LAYOUT = {
    "entities": "entity_representations(ids) of the model, as its interaction() takes them",
    "relations": "relation_representations(ids) of the model, as its interaction() takes them",
    "score": "the model's interaction(h, r, t)",
}
CONSTANTS = ("gamma", "p", "phase_scale", "group_size")  # model attributes the formulas need
EXPORT_INFO = "export.json"


def clean_cell(text: str) -> str:
    """A TSV cell: tabs and line breaks become spaces (the Projector has no quoting)."""
    return " ".join(str(text).replace("\t", " ").splitlines())


def write_metadata(path: Path, names: Names) -> None:
    """``id<TAB>key<TAB>label`` with a header row (the Projector's multi-column metadata)."""
    rows = (f"{i}\t{clean_cell(key)}\t{clean_cell(label)}\n" for i, (key, label) in enumerate(zip(names.keys, names.labels)))
    path.write_text("id\tkey\tlabel\n" + "".join(rows), encoding="utf-8")


def export_embeddings(model: KGCModel, entities: Names, relations: Names, out: str | Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model``'s representations to the directory ``out`` (atomically) and return
    the ``export.json`` payload.

    Files: ``entities.npy`` ``[E, d_e]`` and ``relations.npy`` ``[R, ...]`` float32 (layout
    per model in :data:`LAYOUTS`; ``contexts.npy`` for GC-OTE); ``metadata.tsv`` (id, key,
    label of each entity, header row) with ``vectors.tsv`` (one tab-separated row per
    entity, no header) for the Embedding Projector, and ``relation_metadata.tsv`` /
    ``relation_vectors.tsv`` (relations flattened to ``[R, -1]``);
    ``projector_config.json``; ``export.json`` (model, shapes, constants, layout, ``info``).
    An existing ``out`` is replaced only if it is an earlier export (holds ``export.json``)
    or empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_INFO).is_file())):
        raise PipelineError(f"{out}: exists and is not an earlier export (no {EXPORT_INFO}); choose a new directory")
    if (len(entities), len(relations)) != (model.num_entities, model.num_relations):
        raise PipelineError(f"model has {model.num_entities} entities / {model.num_relations} relations, names {len(entities)} / {len(relations)}")
    device = _model_device(model)
    with torch.inference_mode():
        arrays = {
            "entities": model.entity_representations(torch.arange(model.num_entities, device=device)),
            "relations": model.relation_representations(torch.arange(model.num_relations, device=device)),
        }
        if isinstance(model, GCOTE):
            anchors = torch.arange(model.num_entities, device=device)
            arrays["contexts"] = torch.stack([model.context(anchors, torch.full_like(anchors, side, dtype=torch.bool)) for side in (False, True)])
    arrays = {name: array.float().cpu().numpy() for name, array in arrays.items()}
    name = type(model).__name__
    payload = {
        "model": name,
        "num_entities": model.num_entities,
        "num_relations": model.num_relations,
        "files": {f"{key}.npy": list(array.shape) for key, array in arrays.items()},
        "constants": {key: getattr(model, key) for key in CONSTANTS if isinstance(getattr(model, key, None), (int, float))},
        "layout": LAYOUTS.get(name, GENERIC_LAYOUT),
        **(info or {}),
    }
    projector = {"embeddings": [
        {"tensorName": f"{name} {kind}", "tensorShape": [len(array), int(np.prod(array.shape[1:]))], "tensorPath": vectors, "metadataPath": metadata}
        for kind, array, vectors, metadata in (("entities", arrays["entities"], "vectors.tsv", "metadata.tsv"),
                                                ("relations", arrays["relations"], "relation_vectors.tsv", "relation_metadata.tsv"))
    ]}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for key, array in arrays.items():
            np.save(tmp / f"{key}.npy", array)
        np.savetxt(tmp / "vectors.tsv", arrays["entities"].reshape(len(arrays["entities"]), -1), fmt="%.9g", delimiter="\t")
        np.savetxt(tmp / "relation_vectors.tsv", arrays["relations"].reshape(len(arrays["relations"]), -1), fmt="%.9g", delimiter="\t")
        write_metadata(tmp / "metadata.tsv", entities)
        write_metadata(tmp / "relation_metadata.tsv", relations)
        (tmp / "projector_config.json").write_text(json.dumps(projector, indent=2) + "\n")
        (tmp / EXPORT_INFO).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Provenance of a checkpoint for ``export.json``: path, step, model config, best metrics."""
    checkpoint = read_checkpoint(Path(path))
    return {"checkpoint": str(path), "step": checkpoint.get("step"), "model_config": checkpoint.get("model_config"), "metrics": checkpoint.get("metrics")}
