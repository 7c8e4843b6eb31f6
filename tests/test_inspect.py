"""`inspect`: a tiny world (people born in cities of countries) with text and image features,
a TransE + MMRNS run trained here by the real `train` stage for a few steps; the sampler's
distribution (eqs. 12-13 over every entity, chunked), the model's filtered list, ranks, known
flags, media, KCA attention, the sampler state taken from last.pt, the Markdown and the HTML
page (parsed: tables and embedded images), errors with the closest names; a Uniform run."""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest_features import store_jpeg, write_media
from pipeline import inspection
from pipeline.evaluation import rank_triples
from pipeline.filtering import FilterIndex
from pipeline.inspection import Inspector
from pipeline.predict import UnknownName
from pipeline.training import read_checkpoint
from stages import app
from stages import inspection as _inspect_command  # noqa: F401  (registers the command)
from stages import train as _train_command  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
PEOPLE = [f"Person {i}" for i in range(12)]
CITIES = ["Paris", "Berlin", "Rome", "Lyon", "Munich", "Milan"]
COUNTRIES = ["France", "Germany", "Italy"]
LABELS = PEOPLE + CITIES + COUNTRIES
BORN, LOCATED, CITIZEN = range(3)
CITY0, COUNTRY0 = len(PEOPLE), len(PEOPLE) + len(CITIES)
WITH_IMAGE = {CITY0 + j for j in range(6)} | {0, 1}  # every city and two people have an image


def kind_of(entity: int) -> int:
    return 0 if entity < CITY0 else 1 if entity < COUNTRY0 else 2


def write_world(root: Path) -> Path:
    """Dataset directory: births, locations and citizenships; TEST holds some births and citizenships."""
    data = root / "data"
    data.mkdir()
    keys = [f"http://example.org/{label.replace(' ', '_')}" for label in LABELS]
    pd.DataFrame({"id": range(len(LABELS)), "key": keys, "label": LABELS}).to_parquet(data / "entities.parquet")
    pd.DataFrame({"id": range(3), "key": ["born_in", "located_in", "citizen_of"], "label": ["born in", "located in", "citizen of"]}).to_parquet(data / "relations.parquet")
    born = [(i, BORN, CITY0 + i % 6) for i in range(12)]
    located = [(CITY0 + j, LOCATED, COUNTRY0 + j % 3) for j in range(6)]
    citizen = [(i, CITIZEN, COUNTRY0 + i % 3) for i in range(12)]
    splits = {"train": born[:10] + located + citizen[:8], "valid": citizen[8:10], "test": born[10:] + citizen[10:]}
    for split, rows in splits.items():
        pd.DataFrame(rows, columns=["head", "relation", "tail"]).astype("int64").to_parquet(data / f"{split}.parquet")
    return data


def write_cache(directory: Path, values: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> None:
    """A feature cache in the extract stages' format (features.npy, index.parquet, meta.json)."""
    directory.mkdir(parents=True)
    np.save(directory / "features.npy", values.astype(np.float16))
    entities = np.arange(len(values))
    pd.DataFrame({"entity": entities, "row": entities, "has_feature": mask, "count": counts.astype(np.int32), "failure": [None] * len(values),
                  "content_key": [f"k{i}" for i in entities], "reusable": True}).to_parquet(directory / "index.parquet")
    (directory / "meta.json").write_text(json.dumps({"config": {}, "dtype": "float16", "shape": list(values.shape), "complete": True}))


def write_features_and_media(root: Path) -> tuple[Path, Path, Path]:
    """Features in which entities of one kind are alike (a kind vector plus noise); two
    description sentences per entity; a photo for every city and two people."""
    rng = np.random.default_rng(0)
    kinds = np.array([kind_of(e) for e in range(len(LABELS))])
    text_base, visual_base = rng.normal(size=(3, 1, 384)), rng.normal(size=(3, 1, 383))
    text = text_base[kinds] + 0.3 * rng.normal(size=(len(LABELS), 4, 384))
    text[:, 2:] = 0  # two sentences, zero padding
    visual = visual_base[kinds] + 0.3 * rng.normal(size=(len(LABELS), 24, 383))
    has_image = np.array([e in WITH_IMAGE for e in range(len(LABELS))])
    visual[~has_image] = 0
    features = root / "features"
    write_cache(features / "text", text, np.ones(len(LABELS), dtype=bool), np.full(len(LABELS), 2))
    write_cache(features / "visual", visual, has_image, has_image.astype(int))
    store = root / "images"
    rows = []
    for entity, label in enumerate(LABELS):
        digest = []
        if entity in WITH_IMAGE:
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            digest = [store_jpeg(store, Image.new("RGB", (64, 48), colour))]
        kind = ("a person", "a city", "a country")[kind_of(entity)]
        rows.append({"entity": entity, "sentences": [f"{label} is {kind}.", f"More about {label}."], "text_source": "description", "image_hashes": digest})
    media = write_media(root / "media" / "entities_media.parquet", rows)
    return features, media, store


def train_run(root: Path, name: str, sampler: str) -> tuple[Path, Path]:
    """Run the real train stage on the world (TransE d 16; MMRNS with a 20-entity pre-sample); returns (params, run dir)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = ["mkg-w"]
    params["train"].update(dim=16, batch_size=8, num_negatives=4, steps=12, valid_every=6, patience=5, eval_batch_size=64, threads=1, device="cpu", log_every=2, lr=0.01, sampler_lr=0.01)
    params["sampler"]["name"] = sampler
    # MMRNS from step 0 with the paper's similarities only (the multimodal mechanics are what the tests check)
    params["sampler"]["mmrns"].update(presample_size=20, attention_dim=8, structure_hidden=10, warm_start=0, score_similarity=False)
    run = root / name
    run.mkdir()
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, [
        "train", "world", "--data", str(root / "data"), "--out", str(run / "models"), "--metrics", str(run / "train.json"),
        "--report", str(run / "report.json"), "--plots", str(run / "plots"), "--features", str(root / "features"), "--params", str(run / "params.yaml"),
    ])
    assert result.exit_code == 0, result.output
    return run / "params.yaml", run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inspect-world")
    write_world(root)
    features, media, store = write_features_and_media(root)
    params, run = train_run(root, "mmrns", "mmrns")
    return {"root": root, "features": features, "media": media, "store": store, "params": params, "run": run}


def load(world, checkpoint: str = "best.pt", run: Path | None = None, params: Path | None = None) -> Inspector:
    run, params = run or world["run"], params or world["params"]
    settings = yaml.safe_load(params.read_text())
    return Inspector.load(run / "models" / checkpoint, world["root"] / "data", settings["train"], settings["sampler"],
                          world["features"], world["media"], world["store"])


def test_mmrns_distribution_lists_and_ranks(world, monkeypatch):
    inspector = load(world)
    # best.pt keeps the model only: the sampler state comes from last.pt of the same run (trained, not the fresh init)
    assert "last.pt" in inspector.provenance
    trained = read_checkpoint(world["run"] / "models" / "last.pt")["sampler"]
    assert torch.equal(inspector.sampler.state_dict()["structure.mlp.0.weight"], trained["structure.mlp.0.weight"])
    monkeypatch.setattr(inspection, "CHUNK", 7)  # several similarities() calls: the chunks must agree with one call
    triple = inspector.parse_triple("person 10|BORN IN|Paris")  # names in any case
    assert triple.tolist() == [10, BORN, CITY0]
    triple = inspector.test_row(0)
    assert triple.tolist() == [10, BORN, CITY0 + 4]
    result = inspector.inspect(triple, "tail", top=5)

    # the distribution: eqs. 12-13 from one similarities() call over every entity, at the checkpoint's step
    sampler, model = inspector.sampler, inspector.predictor.model
    everyone = torch.arange(len(LABELS))
    with torch.no_grad():
        sims = sampler.similarities(triple.view(1, 3), everyone, torch.tensor([False]), model)
        log_p = sampler.log_probabilities(sims, inspector.step)[0]
    banned = torch.zeros(len(LABELS), dtype=torch.bool)
    banned[CITY0 + 4] = True  # the replaced entity (its own tail); no TRAIN answer of (Person 10, born in, ?)
    expected = torch.softmax(log_p.masked_fill(banned, float("-inf")), 0)
    assert set(sims) == {"structure", "text", "image"} and inspector.step == 12
    probabilities = {row["id"]: row["probability"] for row in result.sampler_rows}
    assert [row["id"] for row in result.sampler_rows] == expected.topk(5).indices.tolist()
    assert all(probabilities[e] == pytest.approx(float(expected[e]), rel=1e-5) for e in probabilities)
    assert result.answer["probability"] == 0.0 and result.answer["id"] not in probabilities
    # alike features: the sampler's most likely negatives are cities, like the answer
    assert sum(kind_of(row["id"]) == 1 for row in result.sampler_rows) >= 4
    assert all(set(row["similarity"]) == {"structure", "text", "image"} for row in result.sampler_rows)
    people = [row for row in result.model_rows + result.sampler_rows if kind_of(row["id"]) == 0 and row["id"] not in WITH_IMAGE]
    assert all(np.isnan(row["similarity"]["image"]) for row in people)  # no image: no image similarity

    # the model's list: the filtered top answers (the query's own answer kept, other known facts left out)
    scores = model.score_all(triple.view(1, 3), "tail")[0].detach()
    known = {CITY0 + 4}  # (Person 10, born in, Munich) is the TEST fact itself
    order = [e for e in scores.argsort(descending=True).tolist() if e not in known or e == CITY0 + 4]
    assert [row["id"] for row in result.model_rows] == order[:5]
    filter_index = FilterIndex.build(inspector.predictor.graph.all_triples, len(LABELS), 3)
    rank = int(rank_triples(model, triple.view(1, 3), filter_index, "tail").realistic[0])
    assert result.answer["rank"] == rank and result.answer["known"] == "test"
    assert result.both == [e for e in order[:5] if e in probabilities]
    assert all(row["score"] == pytest.approx(float(scores[row["id"]]), abs=1e-5) for row in result.model_rows)

    # media and KCA attention
    first = {row["id"]: row for row in result.sampler_rows + result.model_rows}
    assert all(row["description"] == f"{LABELS[e]} is {('a person', 'a city', 'a country')[kind_of(e)]}." for e, row in first.items())
    assert all(row["image"] == (e in WITH_IMAGE) for e, row in first.items())
    assert result.attention is not None and set(first) | {CITY0 + 4} <= set(result.attention)
    weights = result.attention[CITY0 + 4]
    assert len(weights["sentences"]) == 4 and sum(weights["sentences"]) == pytest.approx(1.0, abs=1e-5)
    assert len(weights["regions"]) == 24 and sum(weights["regions"]) == pytest.approx(1.0, abs=1e-5)
    assert len(weights["sentence_gates"]) == 4 and all(0 < g < 1 for g in weights["region_gates"])

    text = result.markdown()
    assert "## (Person 10, born in, ?)" in text and "True tail: **Munich**" in text and "KCA attention" in text
    assert f"filtered rank {rank}," in text and "from last.pt" in text.replace(str(world["run"] / "models") + "/", "")


class PageParser(HTMLParser):
    """Tables (class -> rows of cell texts) and image sources of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.current, self.row, self.cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.current = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr" and self.current is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append(self.cell.strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.current.append(self.row)
            self.row = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_command_prints_markdown_and_writes_a_self_contained_page(world, tmp_path):
    page = tmp_path / "page.html"
    result = CliRunner().invoke(app, [
        "inspect", "world", "--checkpoint", str(world["run"] / "models" / "best.pt"), "--triple", "Person 11|born in|Paris",
        "--top", "4", "--html", str(page), "--data", str(world["root"] / "data"), "--features", str(world["features"]),
        "--media", str(world["media"]), "--images", str(world["store"]), "--params", str(world["params"]),
    ])
    assert result.exit_code == 0, result.output
    assert "## (Person 11, born in, ?)" in result.output and "True tail: **Paris**" in result.output
    parser = PageParser()
    parser.feed(page.read_text())
    sampler, model = parser.tables["sampler"], parser.tables["model"]
    assert sampler[0][:5] == ["#", "entity", "image", "score", "model rank"] and len(sampler) == 5 and len(model) == 5
    printed = [line.split(" | ")[1].removesuffix(" *") for line in result.output.split("### Model")[1].split("###")[0].splitlines() if line[:3] in ("| 1", "| 2", "| 3", "| 4")]
    assert len(printed) == 4
    assert all(row[1].startswith(label) for row, label in zip(model[1:], printed))  # the page lists what stdout lists
    assert "is a city." in " ".join(row[1] for row in sampler[1:])
    assert parser.tables["attention"] and parser.images
    assert all(src.startswith("data:image/jpeg;base64,") for src in parser.images)  # nothing fetched from the network
    with Image.open(io.BytesIO(base64.b64decode(parser.images[0].split(",", 1)[1]))) as image:
        image.verify()
    assert "http" not in "".join(parser.images) and not list(tmp_path.glob(".page.html*"))  # no temporary left


def test_unknown_names_and_bad_queries_are_clear_errors(world):
    runner = CliRunner()
    base = ["inspect", "world", "--checkpoint", str(world["run"] / "models" / "best.pt"), "--data", str(world["root"] / "data"),
            "--features", str(world["features"]), "--media", str(world["media"]), "--params", str(world["params"])]
    result = runner.invoke(app, base + ["--triple", "Person 11|born inn|Pariss"])
    assert isinstance(result.exception, UnknownName)
    assert "unknown relation 'born inn'" in str(result.exception) and "'born in'" in str(result.exception)
    result = runner.invoke(app, base + ["--triple", "Persn 11|born in|Paris"])
    assert "unknown entity 'Persn 11'" in str(result.exception) and "'Person 11'" in str(result.exception)
    result = runner.invoke(app, base + ["--test-row", "99"])
    assert "--test-row must be in 0..3" in str(result.exception)
    result = runner.invoke(app, base + ["--triple", "a|b"])
    assert "HEAD|RELATION|TAIL" in str(result.exception)
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "exactly one of --triple" in result.output


def test_uniform_run_is_flat_and_head_side_works(world):
    params, run = train_run(world["root"], "uniform", "uniform")
    inspector = load(world, run=run, params=params)
    result = inspector.inspect(inspector.test_row(2), "head", top=3)  # (Person 10, citizen of, Germany): ask the head
    assert result.flat and result.attention is None and "flat over the head side" in result.method
    assert all(row["probability"] == pytest.approx(1 / len(LABELS)) for row in result.sampler_rows + result.model_rows)
    assert result.answer["id"] == 10 and len(result.sampler_rows) == 3
    assert "| tie |" in result.markdown() and "## (?, citizen of, Germany)" in result.markdown()


def test_sans_distribution_is_the_frequency_of_its_own_draws(world):
    params, run = train_run(world["root"], "sans", "sans")
    inspector = load(world, run=run, params=params)
    triple = inspector.parse_triple("Person 3|born in|Lyon")  # a TRAIN fact: Person 3 has edges, so a 2-hop neighbourhood
    result = inspector.inspect(triple, "tail", top=5, draws=20000)
    assert "frequency among" in result.method and not result.flat
    neighbourhood = set(inspector.sampler.neighbourhood(3).tolist())
    assert {row["id"] for row in result.sampler_rows} <= neighbourhood  # half of the draws come from there
    probabilities = inspection.sampling_distribution(inspector.sampler, inspector.predictor.model, triple, "tail", 0, 20000).probabilities
    share = float(probabilities[sorted(neighbourhood)].sum())
    assert share == pytest.approx(0.5 + 0.5 * len(neighbourhood) / len(LABELS), abs=0.06)
    assert float(probabilities[CITY0 + 3]) == 0  # the known TRAIN answer is redrawn (exclude_positives)
