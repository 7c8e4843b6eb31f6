"""The experiment ledger: the params and metrics of finished DVC experiments, kept in git.

DVC keeps an experiment as a git ref of the machine that ran it (``refs/exps/...``); a clone,
a CI checkout or a new machine has none of them, so ``dvc exp show`` there lists nothing and
Table 2 and the figures could not be rebuilt from what was measured. The ledger is a JSON
Lines file, one finished experiment a line, in the record shape that
:func:`pipeline.table2._records` reads from ``dvc exp show --json``::

    {"name": "f4-mkg-w-distmult-uniform-dim50", "baseline": "<commit it ran from>",
     "data": {"rev": "<experiment commit>", "timestamp": "2026-12-04T15:20:01",
              "params": {"params.yaml": {"data": {...}}},
              "metrics": {"metrics/mkg-w/evaluate.json": {"data": {"mrr": 0.29, ...}}, ...}}}

so the readers of ``dvc exp show`` output take the ledger beside it unchanged (:func:`combined`). A record
is identified by its experiment commit (``data.rev``): saving again adds only new runs, and two
runs of one name (e.g. a figure point re-run after a code change) are both kept, the newest
counting where a reader picks one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import DataError


def _has_metrics(data: dict) -> bool:
    return any(isinstance(entry, dict) and entry.get("data") for entry in (data.get("metrics") or {}).values())


def finished(shown: Any) -> list[dict]:
    """The finished experiments of ``dvc exp show --json`` output as ledger records: those nested
    under a commit's ``experiments`` that ran to their metrics. Queued ones (no metrics) and running
    ones (``data.rev == "workspace"``: they show the workspace's metric files) are left out, and so
    are the commits themselves (their metrics are the committed files, already in git)."""
    records = []
    for commit in shown if isinstance(shown, list) else []:
        for experiment in (commit.get("experiments") or []) if isinstance(commit, dict) else []:
            for rev in experiment.get("revs") or []:
                data = rev.get("data") or {}
                if data.get("rev") in (None, "workspace") or "params" not in data or not _has_metrics(data):
                    continue
                records.append({
                    "name": rev.get("name") or experiment.get("name"),
                    "baseline": commit.get("rev"),
                    "data": {key: data.get(key) for key in ("rev", "timestamp", "params", "metrics")},
                })
    return records


def read(path: Path) -> list[dict]:
    """The records of the ledger at ``path`` (none when it does not exist); DataError naming the
    line of a record that is not JSON or lacks ``data.rev``, ``data.params`` or ``data.metrics``."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(path, f"not JSON ({error.msg}); restore the file from git (`git checkout -- {path}`)", number) from None
        data = record.get("data") if isinstance(record, dict) else None
        if not isinstance(data, dict) or not all(key in data for key in ("rev", "params", "metrics")):
            raise DataError(path, "not a ledger record: expected {\"name\", \"data\": {\"rev\", \"params\", \"metrics\"}}", number)
        records.append(record)
    return records


def merge(ledger: Iterable[dict], new: Iterable[dict]) -> tuple[list[dict], int]:
    """``ledger`` with the records of ``new`` whose experiment commit it lacks, in time order
    (timestamp, then name), and how many were added."""
    kept = {record["data"]["rev"]: record for record in ledger}
    added = 0
    for record in new:
        if record["data"]["rev"] not in kept:
            kept[record["data"]["rev"]] = record
            added += 1
    ordered = sorted(kept.values(), key=lambda r: (str(r["data"].get("timestamp") or ""), str(r.get("name") or ""), r["data"]["rev"]))
    return ordered, added


def render(records: Iterable[dict]) -> str:
    """The ledger file: one record a line, keys sorted (stable diffs)."""
    return "".join(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n" for record in records)


def combined(ledger: list[dict], shown: Any) -> list:
    """The experiments of the ledger and of ``dvc exp show --json`` output as one input for the
    readers (:func:`pipeline.table2.collect`, :func:`pipeline.figures.collect`); a run in both is
    read once, from ``shown``."""
    live = {record["data"]["rev"] for record in finished(shown)}
    return [[record for record in ledger if record["data"]["rev"] not in live], shown]
