"""Filtered evaluation: the fast batched ranking against a plain per-candidate reference,
hand-computed ranks with ties, metrics, categories, NaN handling."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.evaluation import (
    DIRECTIONS,
    METRICS,
    RANK_TYPES,
    NaNScoreError,
    evaluate,
    graph_filter,
    rank_metrics,
    rank_triples,
)
from pipeline.errors import PipelineError
from pipeline.filtering import FilterIndex
from pipeline.graph import KnowledgeGraph
from pipeline.models.base import KGCModel


class TableModel(KGCModel):
    """Scores looked up in a fixed table: ``f(h, r, t) = table[h, r, t]``.

    Representations are the ids themselves ``[..., 1]``, so the base class's generic
    broadcast ``score_all`` is what gets evaluated.
    """

    def __init__(self, table: torch.Tensor):
        num_entities, num_relations, _ = table.shape
        super().__init__(num_entities, num_relations)
        self.register_buffer("table", table.float())
        self.modes_seen: list[bool] = []

    def entity_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(-1).float()

    def relation_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.unsqueeze(-1).float()

    def interaction(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        return self.table[h.long(), r.long(), t.long()].squeeze(-1)


def make_graph(num_entities, num_relations, train, valid, test, categories=None) -> KnowledgeGraph:
    def as_tensor(rows):
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)

    return KnowledgeGraph(
        num_entities=num_entities,
        num_relations=num_relations,
        train=as_tensor(train),
        valid=as_tensor(valid),
        test=as_tensor(test),
        test_categories={name: as_tensor(rows) for name, rows in (categories or {}).items()},
    )


# -- the plain reference: one triple at a time, one candidate at a time ----------------------
def reference_ranks(score, triples, known, num_entities, side):
    """Filtered (optimistic, pessimistic, realistic) ranks, straight from the definition.

    ``score(h, r, t) -> float`` scores one triple; ``known`` is a set of (h, r, t) tuples.
    """
    ranks = []
    for h, r, t in triples.tolist():
        target = t if side == "tail" else h
        true_score = score(h, r, t)
        greater = not_less = 0
        for e in range(num_entities):
            candidate = (h, r, e) if side == "tail" else (e, r, t)
            if e == target or candidate in known:
                continue
            s = score(*candidate)
            greater += s > true_score
            not_less += s >= true_score
        optimistic, pessimistic = 1 + greater, 1 + not_less
        ranks.append((optimistic, pessimistic, (optimistic + pessimistic) / 2))
    return ranks


def fast_ranks(model, triples, filter_index, side, batch_size):
    ranks = rank_triples(model, triples, filter_index, side, batch_size=batch_size)
    return list(zip(ranks.optimistic.tolist(), ranks.pessimistic.tolist(), ranks.realistic.tolist()))


# -- hand-computed example -------------------------------------------------------------------
def hand_example() -> tuple[TableModel, KnowledgeGraph]:
    """5 entities, 1 relation. Known: train (0,0,1) (0,0,2), valid (3,0,4), test (0,0,3) (2,0,4).

    Scores (all others 0):  f(0,0,.) = [.5 .9 .7 .7 .7]   f(2,0,.) = [0 .3 .1 .7 .2]
                            f(.,0,3) = [.7 .7 .7 .7 .1]   f(.,0,4) = [.7 .6 .2 .9 .2]
    Tail (0,0,?), true 3 (.7): 1 and 2 filtered; 0 (.5) below, 4 (.7) tie -> opt 1, pess 2, real 1.5
    Head (?,0,3), true 0 (.7): nothing else known; 1, 2, 3 tie, 4 below  -> opt 1, pess 4, real 2.5
    Tail (2,0,?), true 4 (.2): 1 (.3), 3 (.7) above, no tie              -> opt 3, pess 3, real 3
    Head (?,0,4), true 2 (.2): 3 filtered (valid); 0, 1 above, 4 ties    -> opt 3, pess 4, real 3.5
    """
    table = torch.zeros(5, 1, 5)
    table[0, 0, :] = torch.tensor([0.5, 0.9, 0.7, 0.7, 0.7])
    table[2, 0, :] = torch.tensor([0.0, 0.3, 0.1, 0.7, 0.2])
    table[:, 0, 3] = torch.tensor([0.7, 0.7, 0.7, 0.7, 0.1])
    table[:, 0, 4] = torch.tensor([0.7, 0.6, 0.2, 0.9, 0.2])
    graph = make_graph(
        5, 1, train=[[0, 0, 1], [0, 0, 2]], valid=[[3, 0, 4]], test=[[0, 0, 3], [2, 0, 4]],
        categories={"1-1": [[0, 0, 3]], "n-n": [[2, 0, 4]]},
    )
    return TableModel(table), graph


def test_hand_computed_filtered_ranks_with_ties():
    model, graph = hand_example()
    index = graph_filter(graph)
    assert fast_ranks(model, graph.test, index, "tail", 1) == [(1, 2, 1.5), (3, 3, 3.0)]
    assert fast_ranks(model, graph.test, index, "head", 2) == [(1, 4, 2.5), (3, 4, 3.5)]


def test_hand_computed_unfiltered_ranks():
    """Without a filter, the known tails 1 (.9, above) and 2 (.7, tie) of (0,0,?) count too."""
    model, graph = hand_example()
    nothing_known = FilterIndex.build(torch.empty(0, 3, dtype=torch.long), graph.num_entities, graph.num_relations)
    assert fast_ranks(model, graph.test[:1], nothing_known, "tail", 8) == [(2, 4, 3.0)]


def test_hand_computed_metrics_and_categories():
    model, graph = hand_example()
    metrics = evaluate(model, graph, "test", batch_size=3)
    realistic = metrics["realistic"]
    assert realistic["both"]["mr"] == pytest.approx((1.5 + 2.5 + 3 + 3.5) / 4)
    assert realistic["both"]["mrr"] == pytest.approx((1 / 1.5 + 1 / 2.5 + 1 / 3 + 1 / 3.5) / 4)
    assert [realistic["both"][f"hits@{k}"] for k in (1, 3, 10)] == [0.0, 0.75, 1.0]
    assert realistic["head"]["mr"] == pytest.approx(3.0) and realistic["tail"]["mr"] == pytest.approx(2.25)
    assert metrics["optimistic"]["both"]["hits@1"] == 0.5 and metrics["optimistic"]["both"]["mr"] == 2.0
    assert metrics["pessimistic"]["both"]["mr"] == pytest.approx(13 / 4) and metrics["pessimistic"]["both"]["hits@1"] == 0
    assert metrics["num_triples"] == 2
    assert set(metrics["categories"]) == {"1-1", "n-n"}
    assert metrics["categories"]["1-1"]["head"]["mr"] == 2.5 and metrics["categories"]["1-1"]["tail"]["mr"] == 1.5
    assert metrics["categories"]["n-n"]["both"]["mrr"] == pytest.approx((1 / 3 + 1 / 3.5) / 2)


def test_metric_layout():
    model, graph = hand_example()
    metrics = evaluate(model, graph, "valid")
    assert set(metrics) == {*RANK_TYPES, "num_triples"}  # categories only on test
    for rank_type in RANK_TYPES:
        assert set(metrics[rank_type]) == set(DIRECTIONS)
        for direction in DIRECTIONS:
            assert set(metrics[rank_type][direction]) == set(METRICS)
            assert all(isinstance(value, float) for value in metrics[rank_type][direction].values())


def test_rank_metrics():
    metrics = rank_metrics(torch.tensor([1.0, 2.5, 10.0, 11.0]))
    assert metrics == pytest.approx({"mr": 6.125, "mrr": (1 + 0.4 + 0.1 + 1 / 11) / 4, "hits@1": 0.25, "hits@3": 0.5, "hits@10": 0.75})


# -- fast path == reference on random graphs with ties ----------------------------------------
def random_case(seed: int):
    generator = torch.Generator().manual_seed(seed)
    num_entities, num_relations = 23, 3
    # few distinct score values -> many exact ties; +-inf ranked exactly like other values
    values = torch.tensor([-math.inf, -1.0, 0.0, 0.5, 1.0, math.inf])
    table = values[torch.randint(len(values), (num_entities, num_relations, num_entities), generator=generator)]
    # dense (h, r) and (r, t) neighbourhoods so that many candidates are filtered
    triples = torch.unique(
        torch.stack([
            torch.randint(6, (150,), generator=generator),
            torch.randint(num_relations, (150,), generator=generator),
            torch.randint(num_entities, (150,), generator=generator),
        ], dim=1), dim=0,
    )
    triples = triples[torch.randperm(len(triples), generator=generator)]
    triples[::2] = triples[::2][:, [2, 1, 0]]  # half of them with a high-degree tail instead
    triples = torch.unique(triples, dim=0)
    triples = triples[torch.randperm(len(triples), generator=generator)]
    train, valid, test = triples[:-40], triples[-40:-25], triples[-25:]
    graph = KnowledgeGraph(num_entities, num_relations, train, valid, test)
    return TableModel(table), graph


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("side", ["head", "tail"])
def test_fast_ranks_equal_reference_on_random_graphs(seed, side):
    model, graph = random_case(seed)
    known = set(map(tuple, graph.all_triples.tolist()))
    table = model.table
    expected = reference_ranks(lambda h, r, t: table[h, r, t].item(), graph.test, known, graph.num_entities, side)
    filtered_somewhere = any(
        ((h, r, e) if side == "tail" else (e, r, t)) in known and e != (t if side == "tail" else h)
        for h, r, t in graph.test.tolist() for e in range(graph.num_entities)
    )
    assert filtered_somewhere  # the case exercises the filter
    assert len({rank[0] for rank in expected}) > 1 and any(o != p for o, p, _ in expected)  # spread and ties
    for batch_size in (1, 4, 1024):
        assert fast_ranks(model, graph.test, graph_filter(graph), side, batch_size) == expected


def test_evaluate_metrics_equal_reference_metrics():
    model, graph = random_case(7)
    known = set(map(tuple, graph.all_triples.tolist()))
    score = lambda h, r, t: model.table[h, r, t].item()  # noqa: E731
    head = reference_ranks(score, graph.valid, known, graph.num_entities, "head")
    tail = reference_ranks(score, graph.valid, known, graph.num_entities, "tail")
    metrics = evaluate(model, graph, "valid", batch_size=5)
    for column, rank_type in enumerate(("optimistic", "pessimistic", "realistic")):
        ranks = [rank[column] for rank in head + tail]
        assert metrics[rank_type]["both"]["mr"] == pytest.approx(sum(ranks) / len(ranks))
        assert metrics[rank_type]["both"]["mrr"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks))
        assert metrics[rank_type]["both"]["hits@3"] == pytest.approx(sum(r <= 3 for r in ranks) / len(ranks))


class EntityWeightModel(KGCModel):
    """``f(h, r, t) = w_h + w_t`` with one fixed weight per entity: cheap at any entity count."""

    def __init__(self, weights: torch.Tensor, num_relations: int = 1):
        super().__init__(len(weights), num_relations)
        self.register_buffer("weights", weights.float())

    def entity_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weights[ids].unsqueeze(-1)

    def relation_representations(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(ids, dtype=torch.float32).unsqueeze(-1)

    def interaction(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (h + r + t).squeeze(-1)


def test_counts_beyond_16_bits():
    """With 2^15 entities or more, a tie count no longer fits the 16-bit accumulator."""
    num_entities = 2**15 + 100
    weights = (torch.arange(num_entities) % 2).float()  # half the entities tie at 0, half at 1
    model = EntityWeightModel(weights)
    test = torch.tensor([[1, 0, 2], [3, 0, 5]])  # true tails weigh 0 and 1
    graph = KnowledgeGraph(num_entities, 1, train=torch.tensor([[1, 0, 4], [1, 0, 7]]), valid=test[:0], test=test)
    known = set(map(tuple, graph.all_triples.tolist()))
    expected = reference_ranks(lambda h, r, t: weights[h].item() + weights[t].item(), test, known, num_entities, "tail")
    assert fast_ranks(model, test, graph_filter(graph), "tail", 2) == expected
    half = num_entities // 2
    assert expected == [(half, num_entities - 2, (half + num_entities - 2) / 2), (1, half, (1 + half) / 2)]


# -- behaviour -------------------------------------------------------------------------------
def test_nan_scores_are_an_error_not_a_good_rank():
    model, graph = hand_example()
    model.table[2, 0, 1] = math.nan  # a candidate of the tail query (2, 0, ?)
    with pytest.raises(NaNScoreError, match=r"the tail query of triple \(2, 0, 4\)"):
        evaluate(model, graph, "test")


def test_model_runs_in_eval_mode_and_mode_is_restored():
    model, graph = hand_example()
    model.train()
    evaluate(model, graph, "test")
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training


def test_filter_is_built_once_per_graph():
    _, graph = hand_example()
    assert graph_filter(graph) is graph_filter(graph)
    _, other = hand_example()
    assert graph_filter(other) is not graph_filter(graph)


def test_known_answers_pattern():
    index = FilterIndex.build(torch.tensor([[0, 0, 1], [0, 0, 2], [0, 0, 2], [1, 1, 0], [2, 0, 1]]), num_entities=5, num_relations=2)
    rows, entities = index.known_answers(torch.tensor([[0, 0, 4], [3, 0, 1], [2, 0, 1], [1, 1, 1]]), "tail")
    assert rows.tolist() == [0, 0, 2, 3] and entities.tolist() == [1, 2, 1, 0]
    rows, entities = index.known_answers(torch.tensor([[4, 0, 1], [4, 1, 0]]), "head")
    assert rows.tolist() == [0, 0, 1] and entities.tolist() == [0, 2, 1]


def test_category_triples_outside_test_are_an_error():
    model, graph = hand_example()
    broken = make_graph(5, 1, graph.train.tolist(), graph.valid.tolist(), graph.test.tolist(), {"1-1": [[0, 0, 1]]})
    with pytest.raises(PipelineError, match="test category 1-1: 1 of its 1 triples are not in the test split"):
        evaluate(model, broken, "test")


def test_no_triples_no_ranks():
    model, graph = hand_example()
    ranks = rank_triples(model, graph.test[:0], graph_filter(graph), "head")
    assert [len(column) for column in ranks] == [0, 0, 0]


def test_empty_split_is_an_error():
    model, graph = hand_example()
    empty = make_graph(5, 1, graph.train.tolist(), [], graph.test.tolist())
    with pytest.raises(PipelineError, match="valid split"):
        evaluate(model, empty, "valid")


# -- real models: fast path (score_all) == reference scoring each query's corruptions -------------------
@pytest.mark.parametrize("name", ["TransE", "TransE-L1", "DistMult", "ComplEx", "RotatE", "PairRE", "GC-OTE"])
def test_real_models_fast_ranks_equal_per_triple_reference(name):
    from pipeline.models import build_model

    _, graph = random_case(11)
    torch.manual_seed(0)
    options = {"p": 1} if name == "TransE-L1" else {}
    model = build_model(name.removesuffix("-L1"), graph, {"dim": 8, "gamma": 3.0, "regularization": 0.0}, options).double()
    known = set(map(tuple, graph.all_triples.tolist()))
    for side in ("head", "tail"):
        expected = []
        for triple in graph.test:  # one query at a time: every entity as a corruption of the true triple
            h, r, t = triple.tolist()
            with torch.no_grad():
                scores = model.score_negatives(
                    triple.unsqueeze(0), torch.arange(graph.num_entities).unsqueeze(0), torch.tensor([side == "head"])
                )[0].tolist()
            target = h if side == "head" else t
            others = [
                s for e, s in enumerate(scores)
                if e != target and ((e, r, t) if side == "head" else (h, r, e)) not in known
            ]
            greater, not_less = sum(s > scores[target] for s in others), sum(s >= scores[target] for s in others)
            expected.append((1 + greater, 1 + not_less, (2 + greater + not_less) / 2))
        assert fast_ranks(model, graph.test, graph_filter(graph), side, 8) == expected


# -- the `evaluate` stage ---------------------------------------------------------------------
def write_canonical_dataset(directory, graph: KnowledgeGraph) -> None:
    """The canonical parquet files of :mod:`pipeline.graph` for ``graph``."""
    import pandas as pd

    directory.mkdir(parents=True)
    columns = ["head", "relation", "tail"]
    for kind, count in (("entities", graph.num_entities), ("relations", graph.num_relations)):
        pd.DataFrame({"id": range(count), "key": [f"{kind}/{i}" for i in range(count)], "label": [f"{kind} {i}" for i in range(count)]}).to_parquet(directory / f"{kind}.parquet")
    for split in ("train", "valid", "test"):
        pd.DataFrame(graph.split(split).numpy(), columns=columns).to_parquet(directory / f"{split}.parquet")
    for index, category in enumerate(("1-1", "1-n", "n-1", "n-n")):
        pd.DataFrame(graph.test[index::4].numpy(), columns=columns).to_parquet(directory / f"test_{category}.parquet")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny dataset, a params file, and best.pt from a short run of the real `train` stage."""
    import yaml
    from typer.testing import CliRunner

    import stages.evaluate  # noqa: F401  (registers the commands)
    import stages.train  # noqa: F401
    from stages import app

    root = tmp_path_factory.mktemp("evaluate_stage")
    _, graph = random_case(3)
    write_canonical_dataset(root / "data" / "tiny", graph)
    params = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    params["datasets"] = ["tiny"]
    params["train"].update(steps=6, valid_every=3, batch_size=16, dim=8, device="cpu", log_every=3)
    params["evaluate"] = {"batch_size": 7}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()

    def run(*args, params=root / "params.yaml"):
        return runner.invoke(app, [*args, "--params", str(params)], catch_exceptions=True)

    result = run("train", "--data", str(root / "data" / "tiny"), "--out", str(root / "models" / "tiny"),
                 "--metrics", str(root / "metrics" / "train.json"), "--report", str(root / "reports" / "train.json"),
                 "--plots", str(root / "plots"))
    assert result.exit_code == 0, result.output
    return root, run


def evaluate_stage_args(root, **overrides):
    paths = {
        "--data": root / "data" / "tiny",
        "--checkpoint": root / "models" / "tiny" / "best.pt",
        "--metrics": root / "metrics" / "evaluate.json",
        "--report": root / "reports" / "evaluate.json",
        "--plot": root / "plots" / "evaluate_categories.png",
        **overrides,
    }
    return ["evaluate", *(str(item) for pair in paths.items() for item in pair), "--no-progress"]


def test_evaluate_stage_writes_metrics_and_plot(trained_run):
    import json

    from pipeline.graph import load_graph
    from pipeline.training import load_model

    root, run = trained_run
    result = run(*evaluate_stage_args(root))
    assert result.exit_code == 0, result.output
    assert "MRR" in result.output and "on tiny test (25 triples" in result.output
    written = json.loads((root / "metrics" / "evaluate.json").read_text())
    graph = load_graph(root / "data" / "tiny")
    expected = evaluate(load_model(root / "models" / "tiny" / "best.pt", graph), graph, "test")
    assert written == expected["realistic"]["both"] and list(written) == list(METRICS)  # headline only
    report = json.loads((root / "reports" / "evaluate.json").read_text())
    assert report == expected and set(report["categories"]) == {"1-1", "1-n", "n-1", "n-n"}
    assert (root / "plots" / "evaluate_categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_stage_missing_checkpoint(trained_run):
    from pipeline.errors import DataError

    root, run = trained_run
    result = run(*evaluate_stage_args(root, **{"--checkpoint": root / "models" / "none.pt"}))
    assert isinstance(result.exception, DataError) and "none.pt: missing checkpoint" in str(result.exception)


def test_evaluate_stage_rejects_bad_batch_size(trained_run):
    import yaml

    from pipeline.errors import ConfigError

    root, run = trained_run
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = "big"
    (root / "bad.yaml").write_text(yaml.safe_dump(params))
    result = run(*evaluate_stage_args(root), params=root / "bad.yaml")
    assert isinstance(result.exception, ConfigError) and "evaluate.batch_size" in str(result.exception)
