"""Look at a sampler's negatives for one query beside the model's own top answers (paper Fig. 7).

For a query ``(h, r, ?)`` (side ``tail``) or ``(?, r, t)`` (side ``head``) of a trained
checkpoint, :class:`Inspector` lists

- the sampler's top-k entities by **sampling probability** for that query and side;
- the model's top-k by **filtered score** (known TRAIN/VALID/TEST facts left out, except
  the query's own answer, which is shown with its filtered rank as in evaluation);
- their intersection;

each entity with its label, first description sentence, image (when crawled), model score,
filtered rank, sampling probability and the split in which ``(h, r, e)`` is a known fact.

Sampling probability per sampler (``Distribution.method`` says which was used):

- MMRNS: eq. 12 (``MMRNSSampler.similarities`` + ``log_probabilities``, the sampler's own
  code) at the checkpoint's step, with the pre-sample taken to be *every* entity (the real
  pre-sample is a random tenth of the graph, redrawn each step), then eq. 13's mask (the
  query's known TRAIN answers and the replaced entity get 0) and renormalised: the
  probability that an entity is the first negative drawn if it is in the pre-sample.
  Warm-start steps: flat. The per-modality cosines (eq. 8) are listed too, and, when KCA
  exists, its attention (see :func:`kca_attention`).
- Uniform / Bernoulli: flat over the entities given the side (known TRAIN corruptions
  excluded with ``exclude_positives``); the side's own probability is in the method text.
- NS-KGE draws nothing: every entity weighs the same (flat).
- any other sampler (KBGAN, NSCaching, SANS, ...): the frequency of each entity among
  ``draws`` negatives of the sampler's own :meth:`sample` on copies of the query (rows that
  corrupt the asked side).

Rendering: :meth:`Inspection.markdown` and :meth:`Inspection.html` (one self-contained page;
images embedded as ``data:`` URIs, no network needed).
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.graph import SPLITS
from pipeline.models import KGCModel, Side
from pipeline.predict import NOT_KNOWN, Predictor
from pipeline.samplers import NegativeSampler, build_sampler
from pipeline.samplers.mmrns.sampler import MMRNSSampler, exploration_factor, relation_vectors
from pipeline.samplers.uniform import UniformSampler
from pipeline.training import read_checkpoint

CHUNK = 2048  # candidates per similarities() call in the MMRNS distribution
THUMBNAIL = 120  # longest side of an embedded image, pixels
SIDES = ("head", "tail")


@dataclass(frozen=True)
class Distribution:
    """A sampler's probability of each entity for one query: ``probabilities [E]`` (sums to 1)."""

    probabilities: torch.Tensor
    method: str  # how it was obtained (see the module docstring)
    similarities: dict[str, torch.Tensor] = field(default_factory=dict)  # MMRNS: modality -> [E] cosine (nan: unavailable)


@dataclass(frozen=True)
class Media:
    """Per-entity description sentences and image files (``media/<ds>/entities_media.parquet``)."""

    sentences: dict[int, list[str]]  # description sentences (empty when the text is only the label)
    images: dict[int, Path]  # first crawled image that exists on disk

    @classmethod
    def load(cls, media_file: Path | None, image_store: Path | None) -> Media:
        """Read the align stage's table; a missing file gives empty media."""
        if media_file is None or not Path(media_file).is_file():
            return cls({}, {})
        from pipeline.media import image_path
        from pipeline.tables import read_table

        table = read_table(media_file, ["entity", "sentences", "text_source", "image_hashes"], "align")
        sentences, images = {}, {}
        for entity, text, source, hashes in zip(table["entity"], table["sentences"], table["text_source"], table["image_hashes"]):
            if source == "description" and len(text):
                sentences[int(entity)] = [str(s) for s in text]
            for digest in (hashes if image_store is not None else []):
                path = image_path(image_store, str(digest))
                if path.is_file():
                    images[int(entity)] = path
                    break
        return cls(sentences, images)

    def first_sentence(self, entity: int) -> str:
        return (self.sentences.get(entity) or [""])[0]


def thumbnail_uri(path: Path, size: int = THUMBNAIL) -> str:
    """``data:image/jpeg;base64,...`` of the image at ``path`` shrunk to ``size`` pixels."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- building the sampler of a checkpoint --------------------------------------------------
def checkpoint_run(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The run configuration (train + sampler sections) stored in a checkpoint's fingerprint, or None."""
    text = checkpoint.get("fingerprint")
    try:
        run = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
    return run if isinstance(run, dict) and "sampler" in run and "train" in run else None


def load_sampler(
    checkpoint_path: Path, predictor: Predictor, train: dict[str, Any], sampler: dict[str, Any], features: Path | None,
) -> tuple[NegativeSampler, int, str]:
    """``(sampler, step, provenance)`` of the run that wrote ``checkpoint_path``.

    The sampler's name, seed and options come from the checkpoint's own configuration when it
    stores one, else from the params sections ``train``/``sampler``; it is built with
    :func:`build_sampler` (feature caches from ``features/{text,visual}`` when present) and
    takes the state of the checkpoint, else of ``last.pt`` beside it when that file belongs to
    the same run (``best.pt`` keeps the model only; ``step`` is then last.pt's, the sampler's
    own), else stays untrained (said in provenance).
    """
    from pipeline.features import load_features
    from pipeline.samplers import SAMPLERS

    stored = read_checkpoint(checkpoint_path)
    run = checkpoint_run(stored)
    if run is not None:
        name, seed, options = run["sampler"]["name"], run["sampler"]["seed"], run["sampler"].get("options") or {}
        negatives = run["train"].get("num_negatives", train.get("num_negatives", 20))
    else:
        name, seed = sampler["name"], sampler.get("seed", 0)
        options, negatives = sampler.get(str(name).lower()) or {}, train.get("num_negatives", 20)
    caches: dict[str, Any] = {"text": None, "visual": None}
    if hasattr(SAMPLERS.get(name), "from_params") and features is not None:
        caches = {kind: load_features(features / kind) if (features / kind).is_dir() else None for kind in caches}
    built = build_sampler(name, options, predictor.graph, predictor.model, negatives, seed, **caches).to(predictor.device)
    step = int(stored.get("step") or 0)
    source = None
    if "sampler" in stored:
        source, state = checkpoint_path, stored["sampler"]
    else:
        last = checkpoint_path.with_name("last.pt")
        other = read_checkpoint(last) if last.is_file() and last.resolve() != checkpoint_path.resolve() else {}
        if "sampler" in other and other.get("fingerprint") == stored.get("fingerprint"):
            source, state = last, other["sampler"]
    if source is None:
        provenance = f"{name}: no trained sampler state in {checkpoint_path.name} (nor a matching last.pt): freshly built"
    else:
        built.load_state_dict(state)
        if source != checkpoint_path:  # eps (eq. 15) follows the sampler's own step
            at = f"step {other['step']}" + (f"; the model's checkpoint is from step {step}" if other["step"] != step else ", as the model")
            provenance = f"{name}: state from {source} ({at})"
            step = int(other["step"])
        else:
            provenance = f"{name}: state from {source} (step {step})"
    return built, step, provenance


# -- the sampler's distribution --------------------------------------------------------------
def corrupt_head_of(side: Side) -> bool:
    return side == "head"


def sampling_distribution(
    sampler: NegativeSampler, model: KGCModel, triple: torch.Tensor, side: Side, step: int, draws: int = 20000,
) -> Distribution:
    """The probability ``[E]`` that ``sampler`` draws each entity as the ``side`` corruption of
    ``triple [3]`` (see the module docstring for the method per sampler)."""
    num_entities = sampler.num_entities
    device = triple.device
    positives = triple.view(1, 3)
    corrupt_head = torch.tensor([corrupt_head_of(side)], device=device)
    everyone = torch.arange(num_entities, device=device)
    with torch.no_grad():
        if isinstance(sampler, MMRNSSampler) and step >= sampler.warm_start:
            return mmrns_distribution(sampler, model, positives, corrupt_head, step)
        if isinstance(sampler, (UniformSampler, MMRNSSampler)) or not sampler.draws_negatives:
            allowed = torch.ones(num_entities, dtype=torch.bool, device=device)
            known = getattr(sampler, "known", None) if isinstance(sampler, UniformSampler) else None
            if known is not None:
                allowed &= ~known.corruptions_known(positives, everyone.unsqueeze(0), corrupt_head)[0]
            if isinstance(sampler, MMRNSSampler):
                method = f"flat: MMRNS warm start (step {step} < {sampler.warm_start}) draws uniformly"
            elif not sampler.draws_negatives:
                method = f"flat: {type(sampler).__name__} draws no negatives (every entity weighs the same)"
            else:
                head = float(sampler.head_probability(positives[:, 1])[0])
                chance = head if side == "head" else 1 - head
                excluded = ", known TRAIN corruptions excluded" if known is not None else ""
                method = f"flat over the {side} side{excluded} (the {side} side is corrupted with probability {chance:.3f})"
            return Distribution(allowed.float() / allowed.sum(), method)
        return sampled_distribution(sampler, model, positives, side, step, draws)


def mmrns_distribution(sampler: MMRNSSampler, model: KGCModel, positives: torch.Tensor, corrupt_head: torch.Tensor, step: int) -> Distribution:
    """Eqs. 12-13 over every entity for one row, from the sampler's own similarity code (chunked over candidates)."""
    num_entities = sampler.num_entities
    everyone = torch.arange(num_entities, device=positives.device)
    size = num_entities if sampler.score_similarity else CHUNK  # the score similarity is standardised over the candidates
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for first in range(0, num_entities, size):
        for name, pair in sampler.similarities(positives, everyone[first : first + size], corrupt_head, model).items():
            parts.setdefault(name, []).append(pair)
    similarities = {name: (torch.cat([s for s, _ in pairs], 1), torch.cat([v for _, v in pairs], 1)) for name, pairs in parts.items()}
    log_p = sampler.log_probabilities(similarities, step)[0] if similarities else torch.zeros(num_entities, device=positives.device)
    own = torch.where(corrupt_head, positives[:, 0], positives[:, 2])
    masked = sampler.known_positives.corruptions_known(positives, everyone.unsqueeze(0), corrupt_head)[0] | (everyone == own)
    probabilities = torch.softmax(log_p.masked_fill(masked, float("-inf")), 0)
    shown = {name: sim[0].masked_fill(~valid[0], float("nan")) for name, (sim, valid) in similarities.items()}
    eps = exploration_factor(sampler.eps0, step)
    used = ", ".join(similarities) or "none (uniform)"
    method = (f"MMRNS eq. 12 at step {step} (eps {eps:.3g}; similarities: {used}) over every entity as the pre-sample, "
              "eq. 13 mask (known TRAIN answers, the replaced entity), renormalised")
    return Distribution(probabilities, method, shown)


def sampled_distribution(sampler: NegativeSampler, model: KGCModel, positives: torch.Tensor, side: Side, step: int, draws: int) -> Distribution:
    """Frequencies among at least ``draws`` negatives of ``sampler.sample`` for copies of the row,
    counting rows that corrupt ``side`` (the sampler's state advances; nothing is saved)."""
    counts = torch.zeros(sampler.num_entities, device=positives.device)
    batch = max(1, min(512, draws // max(1, sampler.num_negatives)))
    calls = 0
    while counts.sum() < draws and calls < 200:
        negatives = sampler.sample(positives.expand(batch, 3).contiguous(), model, step + calls)
        rows = negatives.corrupt_head == corrupt_head_of(side)
        counts += torch.bincount(negatives.ids[rows].flatten(), minlength=sampler.num_entities).float()
        calls += 1
    if counts.sum() == 0:
        raise PipelineError(f"{type(sampler).__name__} never corrupted the {side} side of this query in {calls} calls")
    return Distribution(counts / counts.sum(), f"frequency among {int(counts.sum())} negatives drawn by {type(sampler).__name__}.sample")


def kca_attention(sampler: MMRNSSampler, model: KGCModel, entities: list[int], relation: int) -> dict[int, dict[str, list[float]]] | None:
    """KCA's cross-modal attention per entity (None without KCA): ``sentences [Tt]``, the share of
    the image-guided textual branch (4, ``softmax(M, over Tt)``) each sentence gets, averaged
    over image tokens; ``regions [Ti]``, the share of the text-guided visual branch (1,
    ``softmax(M^T, over Ti)``) each image token gets, averaged over sentences; and the relation's
    eq. 5 gates averaged the same way (``sentence_gates``, ``region_gates``)."""
    if sampler.kca is None or not entities:
        return None
    ids = torch.tensor(entities, device=sampler.text_features.device)
    with torch.no_grad():
        encoded = sampler.encode(ids)
        cross = encoded.cross  # [N, Ti, Tt]
        sentences = cross.softmax(-1).mean(1)  # branch 4, [N, Tt]
        regions = cross.transpose(1, 2).softmax(-1).mean(1)  # branch 1, [N, Ti]
        gates = sampler.kca.gates(relation_vectors(model, torch.tensor([relation], device=ids.device))) if sampler.uses_relation else None
    result = {}
    for i, entity in enumerate(entities):
        row = {"sentences": sentences[i].tolist(), "regions": regions[i].tolist()}
        if gates is not None:
            row["sentence_gates"] = gates[1][0].mean(0).tolist()  # g_t [Ti, Tt] -> per sentence
            row["region_gates"] = gates[0][0].mean(1).tolist()  # g_i [Ti, Tt] -> per image token
        result[entity] = row
    return result


# -- the inspection ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Inspection:
    """The result of one query: sampler rows, model rows, intersection, and what is needed to render them."""

    title: str  # (head, relation, ?) in labels
    side: Side
    answer: dict[str, Any]  # the query's true answer as a row
    sampler_rows: list[dict[str, Any]]
    model_rows: list[dict[str, Any]]
    both: list[int]  # entity ids in both lists, in the model's order
    method: str
    provenance: str
    model_name: str
    checkpoint: str
    flat: bool  # the sampler's distribution is uniform over its support
    attention: dict[int, dict[str, list[float]]] | None
    sentences: dict[int, list[str]]
    images: dict[int, Path]

    def as_dict(self) -> dict[str, Any]:
        keys = ("title", "side", "answer", "sampler_rows", "model_rows", "both", "method", "provenance", "model_name", "checkpoint", "flat", "attention")
        return {key: getattr(self, key) for key in keys}

    # -- Markdown --
    def markdown(self) -> str:
        """Heading, method, the sampler's and the model's tables, the intersection, KCA attention."""
        similarity_names = sorted({name for row in self.sampler_rows for name in row.get("similarity", {})})

        def cell(text: Any) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        def table(rows: list[dict[str, Any]]) -> list[str]:
            head = ["#", self.side, "description", "image", "score", "model rank", "P(sample)", "sampler rank", "known", *[f"sim {n}" for n in similarity_names]]
            numeric = {"#", "score", "model rank", "P(sample)", "sampler rank"}
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in numeric or h.startswith("sim") else "---" for h in head) + "|"]
            for position, row in enumerate(rows, 1):
                mark = " *" if row["id"] in self.both else ""
                values = [position, cell(row["label"]) + mark, cell(row["description"][:80]) or "-", "yes" if row["image"] else "-",
                          f"{row['score']:.4f}", row["rank"], f"{row['probability']:.2e}", self.sampler_rank_text(row), row["known"] or "-"]
                values += [_number(row.get("similarity", {}).get(name)) for name in similarity_names]
                lines.append("| " + " | ".join(map(str, values)) + " |")
            return lines

        answer = self.answer
        lines = [
            f"## {cell(self.title)}", "",
            f"{self.model_name} ({self.checkpoint}); sampler {self.provenance}.",
            f"Sampling probability: {self.method}.",
            f"True {self.side}: **{cell(answer['label'])}**, filtered rank {answer['rank']}, score {answer['score']:.4f}, "
            f"P(sample) {answer['probability']:.2e}.", "",
            f"### Sampler: {self.sampler_caption()}", "", *table(self.sampler_rows), "",
            f"### Model: top {len(self.model_rows)} by filtered score", "", *table(self.model_rows), "",
            f"### In both ({len(self.both)}, marked *)", "",
            ", ".join(cell(self.label(i)) for i in self.both) if self.both else "none", "",
            "rank: filtered rank of the entity as an answer (1 = the model's top); known: the split holding "
            f"the fact with this {self.side}.",
        ]
        if self.attention:
            lines += ["", "### KCA attention (sentences: image-guided textual branch; regions: text-guided visual branch)", ""]
            for entity, weights in self.attention.items():
                count = max(1, len(self.sentences.get(entity, [])))
                shares = ", ".join(f"{w:.2f}" for w in weights["sentences"][:count])
                top_regions = sorted(range(len(weights["regions"])), key=lambda k: -weights["regions"][k])[:3]
                regions = ", ".join(f"{k}: {weights['regions'][k]:.3f}" for k in top_regions)
                image = f"strongest image tokens {regions}" if entity in self.images else "no image"
                lines.append(f"- {cell(self.label(entity))}: sentences [{shares}]; {image}")
        return "\n".join(lines) + "\n"

    def sampler_caption(self) -> str:
        if self.flat:
            return f"flat distribution, {len(self.sampler_rows)} entities drawn from it (seed 0) as examples"
        return f"top {len(self.sampler_rows)} by sampling probability"

    def sampler_rank_text(self, row: dict[str, Any]) -> str:
        """The entity's rank by sampling probability ("tie" when the distribution is flat, "-" at probability 0)."""
        if row["probability"] == 0:
            return "-"
        return "tie" if self.flat else str(row["sampler_rank"])

    def label(self, entity: int) -> str:
        for row in (self.answer, *self.sampler_rows, *self.model_rows):
            if row["id"] == entity:
                return row["label"]
        return str(entity)

    # -- HTML --
    def html(self) -> str:
        """One self-contained page: the two lists side by side, thumbnails inline, KCA bars."""
        esc = html.escape
        similarity_names = sorted({name for row in self.sampler_rows for name in row.get("similarity", {})})
        thumbnails: dict[int, str] = {}

        def image(entity: int) -> str:
            if entity not in self.images:
                return '<span class="none">no image</span>'
            if entity not in thumbnails:
                thumbnails[entity] = thumbnail_uri(self.images[entity])
            return f'<img src="{thumbnails[entity]}" alt="{esc(self.label(entity))}">'

        def table(rows: list[dict[str, Any]], caption: str, kind: str) -> str:
            head = ["#", "entity", "image", "score", "model rank", "P(sample)", "sampler rank", "known", *[f"sim {n}" for n in similarity_names]]
            out = [f'<table class="{kind}"><caption>{esc(caption)}</caption><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
            top = max((row["probability"] for row in rows), default=0) or 1
            for position, row in enumerate(rows, 1):
                classes = " ".join(c for c in ("both" if row["id"] in self.both else "", "known" if row["known"] else "") if c)
                bar = f'<div class="bar" style="width:{100 * row["probability"] / top:.0f}%"></div>'
                sims = "".join(f"<td>{_number(row.get('similarity', {}).get(n))}</td>" for n in similarity_names)
                out.append(
                    f'<tr class="{classes}" data-entity="{row["id"]}"><td>{position}</td>'
                    f'<td><b>{esc(row["label"])}</b><div class="desc">{esc(row["description"])}</div><div class="key">{esc(row["key"])}</div></td>'
                    f'<td>{image(row["id"])}</td><td>{row["score"]:.4f}</td><td>{row["rank"]}</td>'
                    f'<td>{row["probability"]:.2e}{bar}</td><td>{self.sampler_rank_text(row)}</td><td>{esc(row["known"] or "-")}</td>{sims}</tr>'
                )
            return "\n".join(out) + "</tbody></table>"

        answer = self.answer
        parts = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(self.title)}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
            f'<p class="meta">{esc(self.model_name)} ({esc(self.checkpoint)}); sampler {esc(self.provenance)}.<br>'
            f"Sampling probability: {esc(self.method)}.</p>",
            f'<div class="answer">{image(answer["id"])}<div>True {esc(self.side)}: <b>{esc(answer["label"])}</b><br>'
            f'filtered rank {answer["rank"]}, score {answer["score"]:.4f}, P(sample) {answer["probability"]:.2e}'
            f'<div class="desc">{esc(answer["description"])}</div></div></div>',
            f'<p>Highlighted rows are in both lists ({len(self.both)}); struck-through rows are known facts.</p>',
            '<div class="lists">',
            table(self.sampler_rows, f"Sampler: {self.sampler_caption()}", "sampler"),
            table(self.model_rows, f"Model: top {len(self.model_rows)} by filtered score", "model"),
            "</div>",
        ]
        if self.attention:
            parts.append('<h2>KCA attention</h2><table class="attention"><thead><tr><th>entity</th><th>sentences (image-guided textual branch)</th>'
                         "<th>image tokens (text-guided visual branch)</th></tr></thead><tbody>")
            for entity, weights in self.attention.items():
                sentences = self.sentences.get(entity) or [f"(label) {self.label(entity)}"]
                lines = "".join(
                    f'<div class="sentence"><span class="weight" style="opacity:{min(1.0, 0.15 + weights["sentences"][k] * 2):.2f}">'
                    f'{weights["sentences"][k]:.2f}</span> {esc(text)}</div>'
                    for k, text in enumerate(sentences[: len(weights["sentences"])])
                )
                peak = max(weights["regions"]) or 1
                strip = "".join(f'<span class="cell" title="token {k}: {w:.3f}" style="opacity:{w / peak:.2f}"></span>' for k, w in enumerate(weights["regions"]))
                note = "" if entity in self.images else '<div class="none">no image: the tokens are constant</div>'
                parts.append(f"<tr><td>{esc(self.label(entity))}</td><td>{lines}</td><td><div class=\"strip\">{strip}</div>{note}</td></tr>")
            parts.append("</tbody></table>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}
.meta{color:#555;font-size:.9em}.lists{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;font-size:.85em}caption{font-weight:bold;text-align:left;padding:.3em 0}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;vertical-align:top;text-align:left}
tr.both{background:#fff3c4}tr.known b{text-decoration:line-through}
img{max-width:120px;max-height:120px;border-radius:4px}.desc{color:#444;max-width:28em}.key{color:#999;font-size:.8em}
.none{color:#aaa;font-size:.8em}.bar{height:4px;background:#4a7fd4;margin-top:2px}
.answer{display:flex;gap:1em;align-items:center;background:#eef6ee;padding:.6em;border-radius:6px;margin:1em 0}
.strip{display:flex}.cell{display:inline-block;width:10px;height:18px;background:#d9480f;margin-right:1px}
.weight{background:#d9480f;color:#fff;padding:0 .3em;border-radius:3px;font-size:.8em}
"""


def _number(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


class Inspector:
    """A checkpoint's model (:class:`Predictor`) and its run's sampler, with the dataset's media."""

    def __init__(self, predictor: Predictor, sampler: NegativeSampler, step: int, provenance: str, media: Media, checkpoint: str = ""):
        self.predictor, self.sampler, self.step, self.provenance, self.media = predictor, sampler, step, provenance, media
        self.checkpoint = checkpoint

    @classmethod
    def load(
        cls, checkpoint: Path, directory: Path, train: dict[str, Any], sampler: dict[str, Any], features: Path | None = None,
        media_file: Path | None = None, image_store: Path | None = None, device: str | torch.device = "cpu",
    ) -> Inspector:
        """The model of ``checkpoint`` on the dataset in ``directory`` and its sampler (:func:`load_sampler`)."""
        predictor = Predictor.load(checkpoint, directory, device)
        built, step, provenance = load_sampler(Path(checkpoint), predictor, train, sampler, features)
        return cls(predictor, built, step, provenance, Media.load(media_file, image_store), str(checkpoint))

    def parse_triple(self, text: str) -> torch.Tensor:
        """``"HEAD|RELATION|TAIL"`` (keys or labels, any case) as ids ``[3]``; unknown names list the closest."""
        parts = [part.strip() for part in str(text).split("|")]
        if len(parts) != 3 or not all(parts):
            raise PipelineError(f"--triple must be HEAD|RELATION|TAIL (three non-empty names separated by |), got {text!r}")
        names = self.predictor.entities, self.predictor.relations, self.predictor.entities
        return torch.tensor([kind.resolve(part) for kind, part in zip(names, parts)])

    def test_row(self, row: int) -> torch.Tensor:
        """Row ``row`` (0-based) of the TEST split."""
        test = self.predictor.graph.test
        if not 0 <= row < len(test):
            raise PipelineError(f"--test-row must be in 0..{len(test) - 1} (the TEST split has {len(test)} triples), got {row}")
        return test[row].clone()

    def inspect(self, triple: torch.Tensor, side: Side = "tail", top: int = 10, draws: int = 20000) -> Inspection:
        """Sampler and model top ``top`` for the ``side`` query of ``triple [3]``."""
        if side not in SIDES:
            raise PipelineError(f"side must be head or tail, got {side!r}")
        predictor, entities = self.predictor, self.predictor.entities
        device = predictor.device
        triple = triple.to(device)
        everything = predictor.complete(triple.view(1, 3), side, len(entities), filtered=False)  # every entity, best first
        order, scores, known = everything.ids[0], everything.scores[0], everything.known[0]
        answer_id = int(triple[0] if side == "head" else triple[2])
        counted = (known == NOT_KNOWN) | (order == answer_id)  # filtered ranking: other known facts leave the list
        rank_in_order = torch.cumsum(counted.long(), 0)
        score_of, known_of, rank_of = (torch.empty_like(x) for x in (scores, known, rank_in_order))
        score_of[order], known_of[order], rank_of[order] = scores, known, rank_in_order
        # an entity that is skipped (another known fact) gets the rank it would have, ties aside
        rank_of[order[~counted]] = rank_in_order[~counted] + 1

        distribution = sampling_distribution(self.sampler, predictor.model, triple, side, self.step, draws)
        probabilities = distribution.probabilities.cpu()
        support = probabilities[probabilities > 0]
        flat = bool(support.max() - support.min() <= 1e-6 * support.max())
        if flat:  # any k are "the top k": show k seeded draws from the support
            picks = torch.multinomial(probabilities, min(top, len(support)), replacement=False, generator=torch.Generator().manual_seed(0))
            sampler_ids = [int(i) for i in picks]
        else:
            sampler_ids = [int(i) for i in probabilities.topk(min(top, len(support))).indices]
        model_ids = [int(i) for i in order[counted][:top]]
        similarity = {name: sim.cpu() for name, sim in distribution.similarities.items()}

        def row(entity: int, position: int) -> dict[str, Any]:
            code = int(known_of[entity])
            return {
                "id": entity, "key": entities.keys[entity], "label": entities.labels[entity],
                "description": self.media.first_sentence(entity), "image": entity in self.media.images,
                "score": float(score_of[entity]), "rank": int(rank_of[entity]), "sampler_rank": position,
                "probability": float(probabilities[entity]), "known": SPLITS[code] if code != NOT_KNOWN else None,
                "similarity": {name: float(sim[entity]) for name, sim in similarity.items()},
            }

        sampler_rank = torch.empty(len(probabilities), dtype=torch.long)
        sampler_rank[probabilities.argsort(descending=True, stable=True)] = torch.arange(1, len(probabilities) + 1)
        model_rows = [row(e, int(sampler_rank[e])) for e in model_ids]
        sampler_rows = [row(e, k + 1) for k, e in enumerate(sampler_ids)]
        both = [e for e in model_ids if e in set(sampler_ids)]
        attention = None
        if isinstance(self.sampler, MMRNSSampler) and {"text", "image"} & set(self.sampler.modalities):
            listed = list(dict.fromkeys([answer_id, *sampler_ids, *model_ids]))
            attention = kca_attention(self.sampler, predictor.model, listed, int(triple[1]))
        h, r, t = (int(x) for x in triple)
        slots = ["?" if side == "head" else entities.labels[h], predictor.relations.labels[r], "?" if side == "tail" else entities.labels[t]]
        shown = {e for e in [answer_id, *sampler_ids, *model_ids]}
        return Inspection(
            title=f"({', '.join(slots)})", side=side, answer=row(answer_id, int(sampler_rank[answer_id])),
            sampler_rows=sampler_rows, model_rows=model_rows, both=both, method=distribution.method, provenance=self.provenance,
            model_name=type(predictor.model).__name__, checkpoint=self.checkpoint, flat=flat, attention=attention,
            sentences={e: s for e, s in self.media.sentences.items() if e in shown},
            images={e: p for e, p in self.media.images.items() if e in shown},
        )
