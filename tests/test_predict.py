"""`predict` and `export`: a tiny TransE trained here on a small world (people born in cities
located in countries), asked by name; known-fact flags against the splits; filtered lists;
name matching and its errors; batch files; every model's export read back and scored."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.errors import DataError, PipelineError
from pipeline.evaluation import evaluate, rank_triples
from pipeline.filtering import FilterIndex
from pipeline.graph import SPLITS, load_graph
from pipeline.losses import NegativeSamplingLoss
from pipeline.models import MODELS, build_model
from pipeline.predict import NOT_KNOWN, AmbiguousName, Names, Predictor, UnknownName, export_embeddings, load_names
from pipeline.samplers.uniform import UniformSampler
from pipeline.training import TrainSettings, fit, load_model
from stages import app
from stages import export as _export_command  # noqa: F401  (registers the command)
from stages import predict as _predict_command  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth",
          "Frances Allen", "John Backus", "Niklaus Wirth", "Tony Hoare", "Leslie Lamport", "Margaret Hamilton"]
CITIES = ["Paris", "Berlin", "Rome", "Lyon", "Munich", "Milan"]  # city j is in country j % 3
COUNTRIES = ["France", "Germany", "Italy"]
FILMS = [("Nixon (film)", "Nixon_(film)"), ("Nixon (film)", "Frost/Nixon_(film)")]  # one label, two entities
RELATIONS = [("born_in", "born in"), ("located_in", "located in"), ("citizen_of", "citizen of"), ("director", "director")]
BORN, LOCATED, CITIZEN, DIRECTOR = range(4)


def entity_table() -> pd.DataFrame:
    labels = PEOPLE + CITIES + COUNTRIES + [label for label, _ in FILMS]
    keys = [f"http://example.org/{label.replace(' ', '_')}" for label in PEOPLE + CITIES + COUNTRIES] + [f"http://example.org/{key}" for _, key in FILMS]
    return pd.DataFrame({"id": range(len(labels)), "key": keys, "label": labels})


def person(i: int) -> int:
    return i


def city(j: int) -> int:
    return len(PEOPLE) + j


def country(k: int) -> int:
    return len(PEOPLE) + len(CITIES) + k


def film(f: int) -> int:
    return len(PEOPLE) + len(CITIES) + len(COUNTRIES) + f


def world_splits() -> dict[str, list[tuple[int, int, int]]]:
    """Train: every birth place and location, citizenship of people 0-7 and one film; valid:
    citizenship of 8-9; test: citizenship of 10-11, the second film, and a repeat of a TRAIN fact."""
    born = [(person(i), BORN, city(i % 6)) for i in range(12)]
    located = [(city(j), LOCATED, country(j % 3)) for j in range(6)]
    citizen = [(person(i), CITIZEN, country(i % 3)) for i in range(12)]
    directed = [(film(0), DIRECTOR, person(0)), (film(1), DIRECTOR, person(1))]
    return {"train": born + located + citizen[:8] + directed[:1], "valid": citizen[8:10], "test": citizen[10:] + directed[1:] + [citizen[0]]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A canonical dataset directory of the small world."""
    directory = tmp_path_factory.mktemp("world")
    entity_table().to_parquet(directory / "entities.parquet")
    pd.DataFrame({"id": range(len(RELATIONS)), "key": [k for k, _ in RELATIONS], "label": [v for _, v in RELATIONS]}).to_parquet(directory / "relations.parquet")
    for split, rows in world_splits().items():
        pd.DataFrame(rows, columns=["head", "relation", "tail"]).astype("int64").to_parquet(directory / f"{split}.parquet")
    return directory


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory) -> Path:
    """best.pt of a TransE trained 400 steps on the world (real loop, sampler, loss)."""
    graph = load_graph(world)
    shared = {"dim": 16, "gamma": 3.0, "regularization": 0.0}
    torch.manual_seed(0)
    model = build_model("TransE", graph, shared)
    settings = TrainSettings(steps=400, batch_size=16, lr=0.05, sampler_lr=0.001, valid_every=400, patience=10, seed=0, log_every=100)
    directory = tmp_path_factory.mktemp("models")
    fit(model, UniformSampler(graph, 8, 1), NegativeSamplingLoss(0.5, True), graph, settings, directory,
        lambda m: evaluate(m, graph, "valid")["realistic"]["both"], {"name": "TransE", "shared": shared, "options": {}}, {"world": 1}, progress=False)
    return directory / "best.pt"


@pytest.fixture(scope="module")
def predictor(world, checkpoint) -> Predictor:
    return Predictor.load(checkpoint, world)


# -- answers -------------------------------------------------------------------------------
def test_memorised_training_triples_come_first(predictor):
    answer = predictor.ask("born in", head="Ada Lovelace", top=3)
    assert answer.rows[0]["label"] == "Paris" and answer.rows[0]["known"] == "train" and answer.rows[0]["rank"] == 1
    assert [row["rank"] for row in answer.rows] == [1, 2, 3]
    assert answer.rows[0]["score"] > answer.rows[1]["score"] >= answer.rows[2]["score"]
    for h, r, t in world_splits()["train"]:  # every memorised birth place and location, by id
        if r in (BORN, LOCATED):
            completions = predictor.complete(torch.tensor([[h, r, 0]]), "tail", 1)
            assert completions.ids[0, 0] == t, (PEOPLE + CITIES)[h]
    heads = predictor.ask("located in", tail="france", top=2)  # head query: the cities in France
    assert heads.side == "head" and {row["label"] for row in heads.rows} == {"Paris", "Lyon"}
    assert all(row["known"] == "train" for row in heads.rows)


def split_of(triple: tuple[int, int, int]) -> str | None:
    """The first split (train, valid, test) holding ``triple``, straight from the lists."""
    return next((split for split, rows in world_splits().items() if triple in rows), None)


def every_query() -> list[tuple[str, torch.Tensor]]:
    """``(side, [Q, 3])``: every (h, r, ?) and (?, r, t) query of the world's entities."""
    num_entities = len(entity_table())
    pairs = torch.cartesian_prod(torch.arange(num_entities), torch.arange(len(RELATIONS)))
    tail_queries = torch.stack([pairs[:, 0], pairs[:, 1], torch.zeros_like(pairs[:, 0])], 1)
    head_queries = torch.stack([torch.zeros_like(pairs[:, 0]), pairs[:, 1], pairs[:, 0]], 1)
    return [("tail", tail_queries), ("head", head_queries)]


def test_known_flags_name_the_split_of_each_fact(predictor):
    flagged = set()
    for side, queries in every_query():
        completions = predictor.complete(queries, side, top=predictor.graph.num_entities)
        assert completions.present.all()
        for row, (h, r, t) in enumerate(queries.tolist()):
            for entity, code in zip(completions.ids[row].tolist(), completions.known[row].tolist()):
                triple = (h, r, entity) if side == "tail" else (entity, r, t)
                assert (SPLITS[code] if code != NOT_KNOWN else None) == split_of(triple), triple
                if code != NOT_KNOWN:
                    flagged.add((triple, SPLITS[code]))
    assert {split for _, split in flagged} == {"train", "valid", "test"}
    assert ((person(0), CITIZEN, country(0)), "train") in flagged  # also in test: TRAIN wins
    assert len({triple for triple, _ in flagged}) == len({t for rows in world_splits().values() for t in rows})


def test_filtered_list_is_the_full_list_without_known_facts(predictor):
    everything = predictor.graph.num_entities
    for side, queries in every_query():
        full = predictor.complete(queries, side, top=everything)
        filtered = predictor.complete(queries, side, top=everything, filtered=True)
        top3 = predictor.complete(queries, side, top=3, filtered=True)
        for row in range(len(queries)):
            unknown = full.ids[row][full.known[row] == NOT_KNOWN].tolist()
            kept = filtered.ids[row][filtered.present[row]].tolist()
            assert kept == unknown
            assert (filtered.known[row][filtered.present[row]] == NOT_KNOWN).all()
            assert top3.ids[row][top3.present[row]].tolist() == unknown[:3]
    answer = predictor.ask("citizen of", head="Ada Lovelace", top=30, filtered=True)
    assert "France" not in [row["label"] for row in answer.rows]  # her known citizenship is left out
    assert len(answer.rows) == predictor.graph.num_entities - 1 and all(row["known"] is None for row in answer.rows)
    assert [row["rank"] for row in answer.rows] == list(range(1, len(answer.rows) + 1))


def test_unfiltered_position_is_the_evaluation_raw_rank(predictor):
    graph = predictor.graph
    nothing = FilterIndex.build(torch.empty(0, 3, dtype=torch.long), graph.num_entities, graph.num_relations)
    for side in ("head", "tail"):
        ranks = rank_triples(predictor.model, graph.all_triples, nothing, side)
        assert torch.equal(ranks.optimistic, ranks.pessimistic)  # no ties
        listed = predictor.complete(graph.all_triples, side, top=graph.num_entities).ids
        truth = graph.all_triples[:, 2 if side == "tail" else 0]
        positions = (listed == truth.unsqueeze(1)).float().argmax(1) + 1
        assert torch.equal(positions, ranks.optimistic)


def test_answer_as_json_and_markdown(predictor):
    answer = predictor.ask("BORN_IN", head="  ada   LOVELACE ", top=2)
    payload = json.loads(json.dumps(answer.as_dict()))
    assert payload["query"] == {"head": {"id": 0, "key": "http://example.org/Ada_Lovelace", "label": "Ada Lovelace"},
                                "relation": {"id": BORN, "key": "born_in", "label": "born in"}, "tail": None}
    assert payload["side"] == "tail" and payload["filtered"] is False and len(payload["answers"]) == 2
    assert set(payload["answers"][0]) == {"rank", "id", "key", "label", "score", "known"}
    lines = predictor.ask("director", tail="Ada Lovelace", top=2).markdown().splitlines()
    assert lines[0] == "**(?, director, Ada Lovelace)**: top 2 heads, known TRAIN/VALID/TEST facts flagged"
    assert lines[2] == "| rank | head | key | id | score | known |"
    assert lines[4].startswith("| 1 | Nixon (film) | http://example.org/Nixon_(film) | 21 |") and lines[4].endswith("| train |")


# -- names ---------------------------------------------------------------------------------
def test_names_match_keys_and_labels_ignoring_case(world):
    entities, relations = load_names(world)
    assert entities.resolve("Ada Lovelace") == entities.resolve("ADA lovelace") == entities.resolve("http://example.org/Ada_Lovelace") == 0
    assert entities.resolve("HTTP://EXAMPLE.ORG/ada_lovelace") == 0
    assert relations.resolve("Born In") == relations.resolve("born_in") == BORN
    assert entities.resolve("http://example.org/Frost/Nixon_(film)") == film(1)  # the key picks one of two labels


def test_ambiguous_name_lists_every_match_with_its_key(world):
    entities, _ = load_names(world)
    with pytest.raises(AmbiguousName) as error:
        entities.resolve("nixon (FILM)")
    message = str(error.value)
    assert "2 match" in message and "'http://example.org/Nixon_(film)'" in message and "'http://example.org/Frost/Nixon_(film)'" in message
    assert f"id {film(0)}" in message and f"id {film(1)}" in message


def test_exact_case_breaks_a_case_insensitive_tie():
    names = Names("entity", ("a", "b", "c"), ("Paris", "PARIS", "paris"))
    assert names.resolve("PARIS") == 1 and names.resolve("paris") == 2
    with pytest.raises(AmbiguousName, match="3 match"):
        names.resolve("pARIS")


def test_unknown_names_list_the_closest(world):
    entities, relations = load_names(world)
    with pytest.raises(UnknownName) as error:
        entities.resolve("Ada Lovelac")
    assert str(error.value).startswith("unknown entity 'Ada Lovelac'") and "closest: 'Ada Lovelace' (key 'http://example.org/Ada_Lovelace')" in str(error.value)
    with pytest.raises(UnknownName, match="closest: 'born in' \\(key 'born_in'\\)"):
        relations.resolve("bornin")
    with pytest.raises(UnknownName, match="closest: 'Lyon'"):
        entities.resolve("lyo")  # a substring when difflib finds nothing close
    with pytest.raises(UnknownName, match="closest: '"):
        relations.resolve("qqqqqqqq")  # nothing similar: still the best few


# -- batch ---------------------------------------------------------------------------------
QUERIES = "head\trelation\ttail\nAda Lovelace\tborn in\t?\n\n?\tlocated in\tFrance\nalan turing\tcitizen_of\t?\n"


@pytest.mark.parametrize("suffix", [".parquet", ".tsv"])
def test_batch_file_equals_single_answers(predictor, tmp_path, suffix):
    queries = tmp_path / "queries.tsv"
    queries.write_text(QUERIES)
    out = tmp_path / f"answers{suffix}"
    for filtered in (False, True):
        assert predictor.answer_file(queries, out, top=4, filtered=filtered, batch_size=2) == 3
        table = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out, sep="\t", keep_default_na=False)
        expected = [
            (2, "tail", predictor.ask("born in", head="Ada Lovelace", top=4, filtered=filtered)),
            (4, "head", predictor.ask("located in", tail="France", top=4, filtered=filtered)),
            (5, "tail", predictor.ask("citizen_of", head="alan turing", top=4, filtered=filtered)),
        ]
        assert table["line"].tolist() == [line for line, _, answer in expected for _ in answer.rows]
        assert table["side"].tolist() == [side for _, side, answer in expected for _ in answer.rows]
        rows = [row for _, _, answer in expected for row in answer.rows]
        assert table["id"].tolist() == [row["id"] for row in rows] and table["rank"].tolist() == [row["rank"] for row in rows]
        assert table["known"].tolist() == [row["known"] or "" for row in rows]
        assert table["label"].tolist() == [row["label"] for row in rows]
        np.testing.assert_allclose(table["score"], [row["score"] for row in rows], rtol=1e-6)
        assert table.loc[table["line"] == 4, "tail"].unique().tolist() == ["France"] and set(table.loc[table["line"] == 4, "head"]) == {"?"}


@pytest.mark.parametrize(
    "line, problem",
    [
        ("Ada Lovelce\tborn in\t?", "closest: 'Ada Lovelace'"),
        ("?\tborn in\t?", "exactly one of the head and tail"),
        ("Ada Lovelace\tborn in\tParis", "exactly one of the head and tail"),
        ("Ada Lovelace\tborn in", "expected 3 tab-separated fields"),
        ("Nixon (film)\tdirector\t?", "ambiguous"),
    ],
)
def test_batch_file_errors_name_the_line_before_writing(predictor, tmp_path, line, problem):
    queries = tmp_path / "queries.tsv"
    queries.write_text(QUERIES + line + "\n")
    out = tmp_path / "answers.parquet"
    with pytest.raises(DataError, match=problem) as error:
        predictor.answer_file(queries, out)
    assert f"{queries}:6" in str(error.value)
    assert not out.exists() and list(tmp_path.iterdir()) == [queries]


def test_batch_file_without_queries_and_bad_suffix(predictor, tmp_path):
    queries = tmp_path / "queries.tsv"
    queries.write_text("head\trelation\ttail\n")
    assert predictor.answer_file(queries, tmp_path / "answers.parquet") == 0
    assert len(pd.read_parquet(tmp_path / "answers.parquet")) == 0
    with pytest.raises(PipelineError, match="must end in .parquet or .tsv"):
        predictor.answer_file(queries, tmp_path / "answers.csv")


# -- export --------------------------------------------------------------------------------
def complex_parts(x: np.ndarray) -> np.ndarray:
    real, imag = np.split(x, 2, axis=-1)
    return real + 1j * imag


def scores_from_export(directory: Path, triples: np.ndarray, side: str) -> np.ndarray:
    """Scores ``[N]`` of ``triples [N, 3]`` computed with numpy from an export alone, following
    the layout ``export.json`` documents (the head-query direction matters for GC-OTE only)."""
    info = json.loads((directory / "export.json").read_text())
    entities, relations = np.load(directory / "entities.npy"), np.load(directory / "relations.npy")
    constants, name = info["constants"], info["model"]
    h, r, t = entities[triples[:, 0]], relations[triples[:, 1]], entities[triples[:, 2]]
    if name == "TransE":
        return constants["gamma"] - np.linalg.norm(h + r - t, ord=constants["p"], axis=-1)
    if name == "DistMult":
        return (h * r * t).sum(-1)
    if name == "ComplEx":
        return np.real((complex_parts(h) * complex_parts(r) * np.conj(complex_parts(t))).sum(-1))
    if name == "RotatE":
        rotation = np.exp(1j * r * constants["phase_scale"])
        return constants["gamma"] - np.abs(complex_parts(h) * rotation - complex_parts(t)).sum(-1)
    if name == "PairRE":
        r_head, r_tail = np.split(r, 2, axis=-1)
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return constants["gamma"] - np.abs(unit(h) * r_head - unit(t) * r_tail).sum(-1)
    assert name == "GCOTE"
    s = constants["group_size"]
    phi, sigma = r[..., :s], r[..., s]  # [N, K, s, s], [N, K, s]
    contexts = np.load(directory / "contexts.npy")

    def blocks(x):
        return x.reshape(len(x), -1, s)

    def forward(x):
        return np.einsum("nks,nkst->nkt", blocks(x) * np.exp(sigma), phi)

    def inverse(x):
        return np.einsum("nkt,nkst->nks", blocks(x), phi) * np.exp(-sigma)

    def distance(prediction, x):
        return np.linalg.norm(prediction - blocks(x), axis=-1).sum(-1)

    if side == "tail":
        return constants["gamma"] - distance(forward(h), t) - distance(forward(contexts[0][triples[:, 0]]), t)
    return constants["gamma"] - distance(inverse(t), h) - distance(inverse(contexts[1][triples[:, 2]]), h)


@pytest.mark.parametrize("model_name", MODELS.names())
def test_export_read_back_scores_equal_the_model(world, tmp_path, model_name):
    graph = load_graph(world)
    torch.manual_seed(3)
    model = build_model(model_name, graph, {"dim": 8, "gamma": 3.0, "regularization": 0.0}).eval()
    entities, relations = load_names(world)
    out = tmp_path / "export"
    payload = export_embeddings(model, entities, relations, out, {"note": "test"})
    info = json.loads((out / "export.json").read_text())
    assert info == payload and info["note"] == "test" and info["num_entities"] == graph.num_entities
    for file, shape in info["files"].items():
        assert list(np.load(out / file).shape) == shape and np.load(out / file).dtype == np.float32
    triples = graph.all_triples
    with torch.no_grad():
        own = model.score_triples(triples).numpy()
        by_side = {side: model.score_all(triples, side).gather(1, triples[:, [2 if side == "tail" else 0]]).squeeze(1).numpy() for side in ("tail", "head")}
    np.testing.assert_allclose(scores_from_export(out, triples.numpy(), "tail"), own, rtol=1e-5, atol=1e-5)
    for side, expected in by_side.items():
        np.testing.assert_allclose(scores_from_export(out, triples.numpy(), side), expected, rtol=1e-4, atol=1e-4)
    # the Embedding Projector pair and the relation files
    vectors = np.loadtxt(out / "vectors.tsv", delimiter="\t", ndmin=2)
    np.testing.assert_array_equal(vectors.astype(np.float32), np.load(out / "entities.npy"))
    relation_vectors = np.loadtxt(out / "relation_vectors.tsv", delimiter="\t", ndmin=2).astype(np.float32)
    np.testing.assert_array_equal(relation_vectors, np.load(out / "relations.npy").reshape(graph.num_relations, -1))
    metadata = pd.read_csv(out / "metadata.tsv", sep="\t")
    assert metadata.columns.tolist() == ["id", "key", "label"] and metadata["label"].tolist() == list(entities.labels)
    assert metadata["key"].tolist() == list(entities.keys) and metadata["id"].tolist() == list(range(graph.num_entities))
    assert pd.read_csv(out / "relation_metadata.tsv", sep="\t")["key"].tolist() == list(relations.keys)
    projector = json.loads((out / "projector_config.json").read_text())["embeddings"]
    assert [(e["tensorPath"], e["metadataPath"], e["tensorShape"]) for e in projector] == [
        ("vectors.tsv", "metadata.tsv", list(vectors.shape)), ("relation_vectors.tsv", "relation_metadata.tsv", list(relation_vectors.shape))]


def test_export_replaces_an_export_but_not_other_directories(world, tmp_path):
    graph = load_graph(world)
    model = build_model("DistMult", graph, {"dim": 4, "gamma": 3.0, "regularization": 0.0})
    names = load_names(world)
    export_embeddings(model, *names, tmp_path / "export")
    (tmp_path / "export" / "stale.txt").write_text("from before")
    export_embeddings(model, *names, tmp_path / "export")
    assert not (tmp_path / "export" / "stale.txt").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="not an earlier export"):
        export_embeddings(model, *names, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


# -- commands ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text("datasets: [world]\ntrain:\n  device: cpu\n  threads: 1\n")
    return path


def run(*arguments: str):
    result = CliRunner().invoke(app, list(arguments), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_predict_command_json_markdown_and_batch(world, checkpoint, params, tmp_path):
    common = ["world", "--data", str(world), "--checkpoint", str(checkpoint), "--params", str(params)]
    payload = json.loads(run("predict", *common, "--head", "grace hopper", "--relation", "born in", "--top", "3", "--json"))
    assert payload["model"] == "TransE" and payload["answers"][0]["label"] == "Rome" and len(payload["answers"]) == 3
    output = run("predict", *common, "--relation", "located in", "--tail", "Italy", "--filtered")
    assert "**(?, located in, Italy)**: top 10 heads, known facts filtered out" in output and "| Rome |" not in output
    queries = tmp_path / "queries.tsv"
    queries.write_text(QUERIES)
    output = run("predict", *common, "--queries", str(queries), "--out", str(tmp_path / "answers.parquet"), "--top", "2", "--no-progress")
    assert "3 queries" in output and len(pd.read_parquet(tmp_path / "answers.parquet")) == 6


def test_export_command_scores_equal_the_checkpoint(world, checkpoint, params, tmp_path):
    out = tmp_path / "export"
    output = run("export", "world", "--data", str(world), "--checkpoint", str(checkpoint), "--params", str(params), "--out", str(out))
    assert "entities.npy [23, 16]" in output
    info = json.loads((out / "export.json").read_text())
    assert info["dataset"] == "world" and info["step"] == 400 and info["model_config"]["name"] == "TransE"
    graph = load_graph(world)
    with torch.no_grad():
        expected = load_model(checkpoint, graph).score_triples(graph.all_triples).numpy()
    np.testing.assert_allclose(scores_from_export(out, graph.all_triples.numpy(), "tail"), expected, rtol=1e-5, atol=1e-5)


def test_command_errors_exit_2_with_one_line(world, checkpoint, params):
    common = ["-m", "stages", "predict", "world", "--data", str(world), "--checkpoint", str(checkpoint), "--params", str(params)]
    result = subprocess.run([sys.executable, *common, "--head", "Grace Hoper", "--relation", "born in"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown entity 'Grace Hoper'") and "closest: 'Grace Hopper'" in result.stderr
    result = subprocess.run([sys.executable, *common, "--head", "Grace Hopper", "--tail", "Rome", "--relation", "born in"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "exactly one of --head" in result.stderr
