"""MMRNS sampler (pipeline.samplers.mmrns) on small random graphs: the fast paths against plain
reference implementations of the equations kept here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.errors import ConfigError
from pipeline.features import Features
from pipeline.graph import KnowledgeGraph
from pipeline.losses import NegativeSamplingLoss
from pipeline.models import MODELS, build_model
from pipeline.samplers import SAMPLERS
from pipeline.samplers.mmrns import MMRNSSampler, exploration_factor, presample_count
from pipeline.samplers.mmrns.draws import LOG_MASK, gumbel_top_k, straight_through_sample
from pipeline.samplers.mmrns.groups import RowGroups, grouped_cosine
from pipeline.samplers.mmrns import kca as kca_module
from pipeline.samplers.mmrns.kca import LEAKY_SLOPE, gathered_linear
from pipeline.samplers.mmrns.pools import RelationPools

E, R, DIM, NEG = 80, 5, 12, 4
MODALITIES_ALL = ("structure", "text", "image")
IMAGE, TEXT = (24, 10), (4, 9)  # token counts as in the paper, small feature widths


def random_graph(seed: int = 0, entities: int = E, triples: int = 600) -> KnowledgeGraph:
    g = torch.Generator().manual_seed(seed)
    train = torch.stack(
        [torch.randint(entities, (triples,), generator=g), torch.randint(R, (triples,), generator=g),
         torch.randint(entities, (triples,), generator=g)], 1,
    )
    return KnowledgeGraph(entities, R, train, train[:5], train[:5])


def features(entities: int = E, seed: int = 1, missing: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.rand(entities, generator=g) > missing
    visual_mask = torch.rand(entities, generator=g) > missing
    text = torch.randn(entities, *TEXT, generator=g) * text_mask.view(-1, 1, 1)
    visual = torch.randn(entities, *IMAGE, generator=g) * visual_mask.view(-1, 1, 1)
    return dict(text_features=text, text_mask=text_mask, visual_features=visual, visual_mask=visual_mask)


def make(graph: KnowledgeGraph, seed: int = 3, feats: dict | None = None, **options) -> MMRNSSampler:
    options.setdefault("presample_size", 0.5)
    return MMRNSSampler(graph, NEG, seed, entity_dim=DIM, relation_dim=DIM, **(feats or features(graph.num_entities)), **options)


def transe(graph: KnowledgeGraph, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS.get("TransE")(graph.num_entities, graph.num_relations, DIM, 3.0)


def kgc_loss(model, positives, negatives):
    scores = model.score_negatives(positives, negatives.as_model_input(), negatives.corrupt_head)
    return NegativeSamplingLoss(0.5, True)(model.score_triples(positives), scores), scores


# -- reference: the equations written per row, without deduplication or factorisation -------
def reference_kca(sampler, entities, relation, normalise_visual_plain=True):
    """Eqs. 1-6 directly for ``entities [N]`` under one ``relation [d_r]`` -> (visual [N, a], text [N, a])."""
    kca = sampler.kca
    image = F.leaky_relu(kca.visual_projection(sampler.visual_features[entities]), LEAKY_SLOPE)  # [N, 24, a]
    words = F.leaky_relu(kca.text_projection(sampler.text_features[entities]), LEAKY_SLOPE)  # [N, 4, a]
    cross = image @ words.transpose(1, 2)  # [N, 24, 4]
    if sampler.uses_relation:
        gate_i = torch.sigmoid(kca.visual_gate(relation)).view(24, 4)
        gate_t = torch.sigmoid(kca.text_gate(relation)).view(24, 4)
    else:
        gate_i = gate_t = torch.ones(24, 4)
    branch1 = torch.softmax(cross.transpose(1, 2), -1) @ image  # [N, 4, a]
    branch2 = (cross * gate_i).transpose(1, 2) @ image
    branch3 = (cross * gate_t) @ words  # [N, 24, a]
    branch4 = torch.softmax(cross, -1) @ words
    plain_norm = kca.norm if normalise_visual_plain else (lambda x: x)
    visual = kca.visual_output((plain_norm(branch1) + kca.norm(branch2)).flatten(1))
    text = kca.text_output((kca.norm(branch4) + kca.norm(branch3)).flatten(1))
    return visual, text


def cosine(a, b, faithful=False):
    if faithful:  # the script: norms are constants for the gradient, δ = 1e-10
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-10).detach()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)


def reference_similarities(sampler, model, positives, candidates, corrupt_head):
    out = {m: torch.empty(len(positives), len(candidates)) for m in ("structure", "text", "image")}
    table = model.entity_representations(candidates)
    for row, (h, r, t) in enumerate(positives.tolist()):
        own = torch.tensor([h if corrupt_head[row] else t])
        relation = model.relation_representations(torch.tensor(r))
        mine = model.entity_representations(own)
        parts = (lambda e: torch.cat([relation.expand(len(e), -1), e], 1)) if sampler.uses_relation else (lambda e: e)
        structure = lambda e: e * torch.sigmoid(sampler.structure.mlp(parts(e)))  # noqa: E731  eq. 7
        faithful = sampler.faithful
        out["structure"][row] = cosine(structure(table), structure(mine), faithful)
        cand_visual, cand_text = reference_kca(sampler, candidates, relation)
        own_visual, own_text = reference_kca(sampler, own, relation, normalise_visual_plain=not faithful)
        out["image"][row], out["text"][row] = cosine(cand_visual, own_visual, faithful), cosine(cand_text, own_text, faithful)
    return out


# -- tests ------------------------------------------------------------------------------------
def test_registered_and_exploration_schedule():
    assert SAMPLERS.get("mmrns") is MMRNSSampler
    assert exploration_factor(3.0, 0) == 3.0  # iter = step + 1 = 1, ln 1 = 0
    for step in (1, 9, 99_999):
        assert exploration_factor(3.0, step) == pytest.approx(3.0 / (1 + math.log(step + 1)))
    assert presample_count(0.1, 15000) == 1500 and presample_count(0.1, 15001) == 1501 and presample_count(7, 10) == 7
    for bad in (0.0, 1.5, 0, 11, "x", True):
        with pytest.raises(ConfigError):
            presample_count(bad, 10)


@pytest.mark.parametrize("options", [{}, {"ablation": "no_rel"}, {"faithful": True}])
def test_deduplicated_similarities_equal_per_row_computation(options):
    graph = random_graph()
    sampler, model = make(graph, **options), transe(graph)
    for parameter in sampler.parameters():  # away from the zero-bias initialisation
        torch.nn.init.normal_(parameter, std=0.2)
    positives = graph.train[:14]
    candidates = torch.randperm(E)[:25]
    for corrupt in (False, True):
        corrupt_head = torch.full((14,), corrupt)
        fast = sampler.similarities(positives, candidates, corrupt_head, model)
        reference = reference_similarities(sampler, model, positives, candidates, corrupt_head)
        for modality, (sim, _) in fast.items():
            torch.testing.assert_close(sim, reference[modality], atol=1e-5, rtol=0)


def dense_grads(modules):
    grads = []
    for module in modules:
        for parameter in module.parameters():
            grad = parameter.grad
            grads.append(None if grad is None else (grad.to_dense() if grad.is_sparse else grad).clone())
            parameter.grad = None
    return grads


@pytest.mark.parametrize("options", [{}, {"ablation": "no_rel"}, {"faithful": True}])
@pytest.mark.parametrize("groups_per_chunk", [1, 1000])
def test_fast_similarities_have_the_reference_gradients(options, groups_per_chunk):
    """Chunked, fused relation-gated similarities: values and gradients (sampler and model
    parameters) equal the per-row equations, also when some rows receive no gradient."""
    graph = random_graph()
    sampler, model = make(graph, **options), transe(graph)
    sampler.groups_per_chunk = groups_per_chunk
    for parameter in sampler.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    positives, candidates = graph.train[:14], torch.randperm(E)[:25]
    g = torch.Generator().manual_seed(5)
    for corrupt in (False, True):
        corrupt_head = torch.full((14,), corrupt)
        weights = {m: torch.randn(14, 25, generator=g) * (torch.arange(14) % 3 != 0).unsqueeze(1) for m in MODALITIES_ALL}
        fast = sampler.similarities(positives, candidates, corrupt_head, model)
        sum(((fast[m][0] * weights[m]).sum() for m in fast)).backward()
        fast_grads = dense_grads([sampler, model])
        reference = reference_similarities(sampler, model, positives, candidates, corrupt_head)
        sum(((reference[m] * weights[m]).sum() for m in fast)).backward()
        for mine, theirs in zip(fast_grads, dense_grads([sampler, model])):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def reference_draws(logits, eligible, noise):
    """Eq. 13 as published: n masked Gumbel-softmax draws one after the other."""
    soft, positions, drawn = [], [], []
    for k in range(noise.shape[0]):
        scores = logits + noise[k]
        slot_drawn = eligible.any(1)
        choice = scores.masked_fill(~eligible, -math.inf).argmax(1)
        soft.append(torch.softmax(scores, dim=1))
        positions.append(torch.where(slot_drawn, choice, 0))
        drawn.append(slot_drawn)
        hit = F.one_hot(choice, logits.shape[1]).bool() & slot_drawn.unsqueeze(1)
        eligible = eligible & ~hit
        logits = logits + LOG_MASK * hit
    return torch.stack(positions, 1), torch.stack(drawn, 1), torch.stack(soft, 1)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_straight_through_sample_equals_sequential_draws_and_one_hot_matmul(sign):
    """Choices equal the sequential draws; the output is the drawn candidates exactly and its
    gradients are those of ``sign``-scaled ``(one_hot + y - y.detach()) @ candidates`` with the
    sequential relaxations, for one pre-sample shared by the rows and one per group of rows."""
    g = torch.Generator().manual_seed(0)
    batch, presample, n, d = 30, 12, 5, 7
    for trial, pools in enumerate((1, 1, 3, 3)):
        logits = torch.randn(batch, presample, generator=g, requires_grad=True)
        eligible = torch.rand(batch, presample, generator=g) > 0.3
        eligible[0] = False  # a row with nothing to draw
        eligible[1, :3], eligible[1, 3:] = True, False  # a row that runs out after 3 draws
        noise = -torch.log(-torch.log(torch.rand(n, batch, presample, generator=g)))
        table = torch.randn(pools, presample, d, generator=g, requires_grad=True)
        group = torch.randint(pools, (batch,), generator=g)
        group[:pools] = torch.arange(pools)  # every pre-sample used
        rows = RowGroups.build(group, pools, 2)
        actual, draws = straight_through_sample(logits, eligible, noise.clone(), table, rows, sign)  # overwrites its noise
        positions, drawn, soft = reference_draws(logits, eligible, noise)
        assert torch.equal(draws.positions, positions) and torch.equal(draws.drawn, drawn)
        candidates = table[group]  # [B, W, d]
        assert torch.equal(actual, torch.gather(candidates, 1, positions.unsqueeze(-1).expand(-1, -1, d)))
        hard = F.one_hot(positions, presample).float()
        relaxed = soft * sign + (soft * (1 - sign)).detach()  # sign-scaled gradient, same value
        expected = (hard + relaxed - relaxed.detach()) @ candidates
        weight = torch.randn(batch, n, d, generator=g)
        mine = torch.autograd.grad((actual * weight).sum(), (logits, table))
        theirs = torch.autograd.grad((expected * weight).sum(), (logits, table))
        for got, want in zip(mine, theirs):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gumbel_top_k_follows_sequential_draws_without_replacement():
    """Frequencies of the ordered pair (first, second) over 40k rows against the exact
    probability of drawing them in that order one at a time without replacement."""
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7, -2.0])
    eligible = torch.tensor([True, True, True, False, True])
    rows = 40000
    draws = gumbel_top_k(logits.expand(rows, -1), eligible.expand(rows, -1), 2, torch.Generator().manual_seed(0))
    assert bool(draws.drawn.all()) and not bool((draws.positions == 3).any())
    p = torch.softmax(logits.masked_fill(~eligible, -math.inf), 0)
    counts = torch.zeros(5, 5)
    counts.index_put_((draws.positions[:, 0], draws.positions[:, 1]), torch.ones(rows), accumulate=True)
    chi2 = 0.0
    for i in range(5):
        for j in range(5):
            if i != j and eligible[i] and eligible[j]:
                expected = rows * p[i] * p[j] / (1 - p[i])
                chi2 += float((counts[i, j] - expected) ** 2 / expected)
            else:
                assert counts[i, j] == 0
    assert chi2 < 40.0  # 11 degrees of freedom: P(chi2 > 40) < 1e-4


def test_grouped_cosine_matches_per_row_cosine():
    g = torch.Generator().manual_seed(0)
    candidates, queries = torch.randn(9, 20, 7, generator=g), torch.randn(50, 7, generator=g)
    group = torch.cat([torch.zeros(30, dtype=torch.long), torch.randint(9, (20,), generator=g)])  # skewed sizes
    expected = torch.stack([cosine(candidates[group[b]], queries[b]) for b in range(50)])
    for per_chunk in (1, 4, 9):
        groups = RowGroups.build(group, 9, per_chunk)
        torch.testing.assert_close(grouped_cosine(candidates, queries, groups), expected, atol=1e-6, rtol=0)
    single = RowGroups.single(50, "cpu")
    torch.testing.assert_close(grouped_cosine(candidates[:1], queries, single), cosine(candidates[0][None], queries[:, None]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gathered_linear_equals_the_layer_on_the_gathered_rows(dtype, monkeypatch):
    monkeypatch.setattr(kca_module, "GATHER_CHUNK_ELEMENTS", 3 * 24 * 10)  # 3 rows per chunk: 5 chunks
    g = torch.Generator().manual_seed(0)
    table = torch.randn(30, 24, 10, generator=g).to(dtype)
    ids = torch.tensor([4, 29, 4, 0, 17, 8, 8, 3, 22, 11, 5, 1, 2])  # repeats, 13 rows: a partial last chunk
    layer = torch.nn.Linear(10, 6)
    weights = torch.randn(13, 24, 6, generator=g)
    (gathered_linear(table, ids, layer) * weights).sum().backward()
    fast = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    expected = layer(table[ids].float())
    (expected * weights).sum().backward()
    torch.testing.assert_close(gathered_linear(table, ids, layer), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast, [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kgc_loss_reaches_kca_parameters_through_the_sample():
    graph = random_graph()
    for detach in (False, True):
        sampler, model = make(graph, kgc_gradient="none" if detach else "minimise"), transe(graph)
        positives = graph.train[:16]
        negatives = sampler.sample(positives, model, step=0)
        loss, _ = kgc_loss(model, positives, negatives)
        loss.backward()  # the KGC loss only, no contrastive term
        kca_grads = [p.grad for p in sampler.kca.parameters()]
        reached = any(g is not None and g.abs().sum() > 0 for g in kca_grads)
        assert reached is not detach
        assert model.entities.weight.grad is not None  # the embeddings still learn


def test_no_known_positive_is_drawn_and_draws_are_distinct():
    # A dense graph: every query has many known answers.
    graph = random_graph(entities=40, triples=1500)
    sampler, model = make(graph, presample_size=0.75), transe(graph)
    known = {tuple(t) for t in graph.train.tolist()}
    for step in range(6):
        positives = graph.train[step * 50 : (step + 1) * 50]
        negatives = sampler.sample(positives, model, step)
        assert bool(negatives.corrupt_head.all()) == (step % 2 == 1)
        for (h, r, t), ids, head in zip(positives.tolist(), negatives.ids.tolist(), negatives.corrupt_head.tolist()):
            assert len(set(ids)) == NEG
            corrupted = [(e, r, t) if head else (h, r, e) for e in ids]
            assert not any(c in known for c in corrupted)


def test_exhausted_rows_fall_back_to_non_positive_entities():
    # Query (0, 0, ?) has every tail except 5 entities; the pre-sample (10) cannot hold 4 non-answers often.
    entities = 30
    outside = [25, 26, 27, 28, 29]
    train = torch.tensor([[0, 0, t] for t in range(entities) if t not in outside] + [[1, 1, 2]])
    graph = KnowledgeGraph(entities, R, train, train[:1], train[:1])
    sampler, model = make(graph, feats=features(entities), presample_size=10), transe(graph)
    positives = train[:1].repeat(3, 1)
    for step in (0, 2, 4):  # tail corruption
        negatives = sampler.sample(positives, model, step)
        for ids in negatives.ids.tolist():
            assert len(set(ids)) == NEG and set(ids) <= set(outside)
        loss, scores = kgc_loss(model, positives, negatives)
        total = loss + sampler.auxiliary_loss(positives, negatives, scores, model)
        total.backward()
        assert torch.isfinite(total)


def test_sampling_probabilities_follow_eq_12_with_modality_masks():
    graph = random_graph()
    g = torch.Generator().manual_seed(0)
    sims = {m: torch.rand(3, 6, generator=g) * 2 - 1 for m in ("structure", "text", "image")}
    valid = {
        "structure": torch.ones(3, 6, dtype=torch.bool),
        "text": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool),
        "image": torch.ones(3, 6, dtype=torch.bool),
    }
    inputs = {m: (sims[m], valid[m]) for m in sims}
    step, eps0 = 7, 3.0
    eps = eps0 / (1 + math.log(step + 1))
    for faithful in (False, True):
        sampler = make(graph, eps0=eps0, faithful=faithful)
        p = sampler.log_probabilities(inputs, step).exp()
        for row in range(3):
            mixture, active = torch.zeros(6), 0
            for m in sims:
                if valid[m][row].any():
                    logits = (sims[m][row] / eps).masked_fill(~valid[m][row], -math.inf)
                    mixture += logits.softmax(0)
                    active += 1
            expected = mixture if faithful else mixture / active
            torch.testing.assert_close(p[row], expected, atol=1e-6, rtol=1e-5)


def test_candidates_without_the_only_modality_are_never_drawn():
    graph = random_graph()
    feats = features(missing=0.5)
    sampler, model = make(graph, feats=feats, modalities=["image"]), transe(graph)
    has_image = feats["visual_mask"]
    positives = graph.train[:40]
    own = positives[:, 2]
    negatives = sampler.sample(positives, model, step=0)
    rows_with_image = has_image[own]
    assert bool(has_image[negatives.ids[rows_with_image]].all())
    # Zeros of a missing image are not content: changing them changes nothing.
    other = dict(feats, visual_features=feats["visual_features"] + 5.0 * (~has_image).view(-1, 1, 1))
    changed = make(graph, feats=other, modalities=["image"])
    changed.load_state_dict(sampler.state_dict())
    changed.generator.manual_seed(3)
    sampler.generator.manual_seed(3)
    a, b = sampler.sample(positives, model, 0), changed.sample(positives, model, 0)
    assert torch.equal(a.ids[rows_with_image], b.ids[rows_with_image])


def contrastive_by_hand(sims, known, own, positions, scores, alpha, num_entities, faithful, temperature=1.0, weights="paper"):
    """Eqs. 9-11 row by row; ``faithful``: the script (pooled, own entity a positive, weights / |E|)."""
    log_w = torch.full(known.shape, -math.log(num_entities))
    script = faithful or weights == "script"
    for row in range(known.shape[0]):
        log_w[row, positions[row]] = torch.log_softmax(alpha * scores[row], 0) - (math.log(num_entities) if script else 0)
    pos, neg = (known if faithful else known & ~own), ~known
    logit = log_w + sims / temperature
    if faithful:
        return -(torch.logsumexp(logit[pos], 0) - torch.logsumexp(logit[neg], 0))
    losses = [
        -(torch.logsumexp(logit[row][pos[row]], 0) - torch.logsumexp(logit[row][neg[row]], 0))
        for row in range(known.shape[0]) if pos[row].any()
    ]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("faithful", [False, True])
def test_contrastive_loss_matches_eqs_9_to_11(faithful):
    graph = random_graph(entities=40, triples=1500)  # many positives per query
    feats = features(40, missing=0.0)  # every modality present: valid everywhere
    sampler, model = make(graph, feats=feats, faithful=faithful, beta=0.5, presample_size=0.75), transe(graph)
    positives = graph.train[:20]
    negatives = sampler.sample(positives, model, step=0)
    _, scores = kgc_loss(model, positives, negatives)
    ctx = sampler._context
    loss = sampler.auxiliary_loss(positives, negatives, scores, model)
    per_modality = []
    for sim, valid in ctx.similarities.values():
        assert bool(valid.all())
        per_modality.append(
            contrastive_by_hand(sim.detach(), ctx.known, ctx.own, ctx.draws.positions, scores.detach(), 0.5, 40, faithful)
        )
    torch.testing.assert_close(loss.detach(), 0.5 * torch.stack(per_modality).mean())


def test_contrastive_loss_is_finite_without_positive_in_the_presample():
    # Every query has exactly one answer (its own entity), so the pre-sample holds no positive.
    entities = 50
    train = torch.tensor([[i, i % R, (i + 1) % entities] for i in range(entities)])
    graph = KnowledgeGraph(entities, R, train, train[:2], train[:2])
    for faithful in (False, True):
        sampler, model = make(graph, feats=features(entities), faithful=faithful), transe(graph)
        positives = train[:16]
        negatives = sampler.sample(positives, model, step=1)
        loss, scores = kgc_loss(model, positives, negatives)
        auxiliary = sampler.auxiliary_loss(positives, negatives, scores, model)
        assert torch.isfinite(auxiliary) and (faithful or auxiliary.item() == 0.0)  # the script counts the own entity
        (loss + auxiliary).backward()
        for parameter in list(sampler.parameters()) + list(model.parameters()):
            if parameter.grad is not None:
                grad = parameter.grad.to_dense() if parameter.grad.is_sparse else parameter.grad
                assert torch.isfinite(grad).all()


def test_ablation_no_rel_makes_everything_relation_free():
    graph = random_graph()
    model = transe(graph)
    positives = graph.train[:20]
    other = positives.clone()
    other[:, 1] = (other[:, 1] + 1) % R
    candidates = torch.arange(0, E, 3)
    head = torch.zeros(20, dtype=torch.bool)
    for ablation, independent in (("none", False), ("no_rel", True)):
        sampler = make(graph, ablation=ablation)
        for parameter in sampler.parameters():
            torch.nn.init.normal_(parameter, std=0.2)
        a = sampler.similarities(positives, candidates, head, model)
        b = sampler.similarities(other, candidates, head, model)
        for modality in a:
            assert torch.allclose(a[modality][0], b[modality][0], atol=1e-6) is independent
    no_rel = make(graph, ablation="no_rel")
    assert no_rel.kca.visual_gate is None and no_rel.structure.mlp[0].in_features == DIM


def test_ablation_no_kca_replaces_only_the_multimodal_encoder():
    graph = random_graph()
    model = transe(graph)
    full, plain = make(graph), make(graph, ablation="no_kca")
    assert plain.kca is None and not any("kca" in name for name, _ in plain.named_parameters())
    plain.structure.load_state_dict(full.structure.state_dict())
    positives, candidates = graph.train[:12], torch.arange(0, E, 2)
    head = torch.zeros(12, dtype=torch.bool)
    a = full.similarities(positives, candidates, head, model)
    b = plain.similarities(positives, candidates, head, model)
    torch.testing.assert_close(a["structure"][0], b["structure"][0])  # untouched
    pooled = plain.visual_pooled(plain.visual_features[candidates].mean(1))
    own = plain.visual_pooled(plain.visual_features[positives[:, 2]].mean(1))
    torch.testing.assert_close(b["image"][0], cosine(pooled[None], own[:, None]), atol=1e-6, rtol=0)
    loss, scores = kgc_loss(model, positives, plain.sample(positives, model, 0))
    assert loss.isfinite()


def test_ablation_no_css_drops_only_the_contrastive_term():
    graph = random_graph(entities=40, triples=1500)
    model = transe(graph)
    sampler = make(graph, ablation="no_css")
    positives = graph.train[:16]
    negatives = sampler.sample(positives, model, 0)
    loss, scores = kgc_loss(model, positives, negatives)
    assert sampler.auxiliary_loss(positives, negatives, scores, model) is None
    loss.backward()  # the KGC loss still trains the sampler through the straight-through sample
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sampler.kca.parameters())
    full = make(graph)
    negatives = full.sample(positives, model, 0)
    _, scores = kgc_loss(model, positives, negatives)
    assert full.auxiliary_loss(positives, negatives, scores, model).item() > 0


def test_modality_switches():
    graph = random_graph()
    model = transe(graph)
    head = torch.zeros(6, dtype=torch.bool)
    for modalities in (["structure"], ["text"], ["image", "text"]):
        sampler = make(graph, modalities=modalities)
        sims = sampler.similarities(graph.train[:6], torch.arange(10), head, model)
        assert set(sims) == set(modalities)
    with pytest.raises(ConfigError):
        make(graph, modalities=["sound"])
    with pytest.raises(ConfigError):
        make(graph, ablation="no_everything")


def test_modality_no_entity_has_is_skipped_with_identical_draws_and_losses():
    graph = random_graph()
    feats = features(graph.num_entities)
    feats["visual_mask"] = torch.zeros_like(feats["visual_mask"])  # offline: no image crawled
    feats["visual_features"] = torch.zeros_like(feats["visual_features"])
    skipped = make(graph, feats=feats)
    assert skipped.modalities == ("structure", "text") and skipped.absent_modalities == ("image",)
    explicit = make(graph, feats=feats, modalities=["structure", "text"])
    explicit.load_state_dict(skipped.state_dict())
    positives = graph.train[:16]
    results = []
    for sampler in (skipped, explicit):
        model = transe(graph)
        negatives = sampler.sample(positives, model, 5)
        loss, scores = kgc_loss(model, positives, negatives)
        loss = loss + sampler.auxiliary_loss(positives, negatives, scores, model)
        loss.backward()
        results.append((negatives.ids, loss.detach(), sampler.kca.text_projection.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1]) and torch.allclose(results[0][2], results[1][2])

    only_image = make(graph, feats=feats, modalities=["image"])  # nothing left: uniform over the pre-sample
    assert only_image.modalities == () and only_image.absent_modalities == ("image",)
    negatives = only_image.sample(positives, transe(graph), 0)
    known = only_image.known_positives.corruptions_known(positives, negatives.ids, negatives.corrupt_head)
    assert not known.any() and all(len(set(row.tolist())) == NEG for row in negatives.ids)


def test_resume_reproduces_draws_and_updates():
    graph = random_graph()

    def fresh():
        model, sampler = transe(graph), make(graph)
        groups = [{"params": [p for p in model.parameters()], "lr": 1e-2}, {"params": list(sampler.parameters()), "lr": 1e-2}]
        return model, sampler, torch.optim.SGD(groups)

    def train_step(model, sampler, optimizer, step):
        positives = graph.train[step * 16 : (step + 1) * 16]
        negatives = sampler.sample(positives, model, step)
        loss, scores = kgc_loss(model, positives, negatives)
        loss = loss + sampler.auxiliary_loss(positives, negatives, scores, model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return negatives.ids

    model, sampler, optimizer = fresh()
    for step in range(3):
        train_step(model, sampler, optimizer, step)
    saved = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.state_dict().items()} for k, s in
             (("model", model), ("sampler", sampler))}
    model2, sampler2, optimizer2 = fresh()
    model2.load_state_dict(saved["model"])
    sampler2.load_state_dict(saved["sampler"])
    for step in range(3, 6):
        assert torch.equal(train_step(model, sampler, optimizer, step), train_step(model2, sampler2, optimizer2, step))
    for a, b in zip(sampler.parameters(), sampler2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODELS.names())
def test_works_with_every_kgc_model(name):
    """Each model's own representations (GC-OTE: [K, s, s + 1] relation blocks) feed eqs. 5 and 7;
    the straight-through negatives score as their ids, and the KGC loss reaches the sampler."""
    graph = random_graph()
    torch.manual_seed(0)
    model = build_model(name, graph, {"dim": DIM, "gamma": 3.0, "regularization": 0.0}, {})
    feats = features()
    as_cache = lambda values, mask: Features(values.numpy(), mask.numpy(), mask.numpy().astype(np.int32), {})  # noqa: E731
    sampler = MMRNSSampler.from_params(
        graph, {"presample_size": 0.5, "attention_dim": 8}, model, NEG, 0,
        as_cache(feats["text_features"], feats["text_mask"]), as_cache(feats["visual_features"], feats["visual_mask"]),
    )
    positives = graph.train[:12]
    negatives = sampler.sample(positives, model, 1)
    loss, scores = kgc_loss(model, positives, negatives)
    assert torch.allclose(scores, model.score_negatives(positives, negatives.ids, negatives.corrupt_head), atol=1e-5)
    (loss + sampler.auxiliary_loss(positives, negatives, scores, model)).backward()
    for parameter in (sampler.structure.mlp[0].weight, sampler.kca.text_gate.weight, sampler.kca.visual_projection.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0


def test_from_params_reads_feature_caches():
    graph = random_graph()
    model = transe(graph)
    feats = features()
    text = Features(feats["text_features"].numpy().astype(np.float16), feats["text_mask"].numpy(),
                    np.ones(E, dtype=np.int32), {})
    params = {"presample_size": 0.25, "eps0": 1.0, "beta": 0.005, "attention_dim": 8,
              "structure_hidden": 10, "adversarial_temperature": 0.5, "faithful": False, "ablation": "none",
              "modalities": ["structure", "text", "image"], "kgc_gradient": "minimise"}
    sampler = MMRNSSampler.from_params(graph, params, model, NEG, 0, text, None)
    assert sampler.presample == 20 and sampler.kca.attention_dim == 8
    assert not sampler.visual_mask.any() and sampler.visual_features.shape == (E, 24, 383)
    positives = graph.train[:8]
    negatives = sampler.sample(positives, model, 0)
    assert negatives.ids.shape == (8, NEG)
    assert set(sampler._context.similarities) == {"structure", "text"}  # no image anywhere: not computed
    assert sampler.absent_modalities == ("image",)
    assert "visual_features" not in sampler.state_dict()  # features are not checkpointed
    with pytest.raises(ConfigError):
        MMRNSSampler.from_params(graph, dict(params, eps=1.0), model, NEG, 0, text, None)


# -- variants (sampler.mmrns keys beyond the paper) ------------------------------------------
def sampler_grads(sampler):
    return [None if p.grad is None else p.grad.clone() for p in sampler.parameters()]


def test_kgc_gradient_maximise_reverses_the_sampler_gradient_and_spares_the_model():
    graph = random_graph()
    positives = graph.train[:16]
    results = {}
    for mode in ("minimise", "maximise"):
        sampler, model = make(graph, kgc_gradient=mode), transe(graph)
        negatives = sampler.sample(positives, model, step=2)
        loss, _ = kgc_loss(model, positives, negatives)
        loss.backward()  # the KGC loss only
        results[mode] = (negatives.ids, sampler_grads(sampler), dense_grads([model]))
        plain_model = transe(graph)
        kgc_loss(plain_model, positives, type(negatives)(negatives.ids, negatives.corrupt_head))[0].backward()
        results[mode + "-plain"] = dense_grads([plain_model])
    assert torch.equal(results["minimise"][0], results["maximise"][0])  # same draws
    reached = 0
    for up, down in zip(results["maximise"][1], results["minimise"][1]):
        if down is not None:
            torch.testing.assert_close(up, -down, atol=1e-7, rtol=1e-5)
            reached += int(down.abs().sum() > 0)
    assert reached > 0
    for mine, plain in zip(results["maximise"][2], results["maximise-plain"]):  # only the scoring path trains the model
        torch.testing.assert_close(mine, plain)
    assert any(not torch.allclose(a, b) for a, b in zip(results["minimise"][2], results["minimise-plain"]))


def test_kgc_gradient_none_draws_by_gumbel_top_k_and_learns_from_the_contrastive_loss_only():
    graph = random_graph(entities=40, triples=1500)
    sampler, model = make(graph, kgc_gradient="none", presample_size=0.75), transe(graph)
    known = {tuple(t) for t in graph.train.tolist()}
    positives = graph.train[:20]
    negatives = sampler.sample(positives, model, step=0)
    assert negatives.representations is None
    for (h, r, t), ids, head in zip(positives.tolist(), negatives.ids.tolist(), negatives.corrupt_head.tolist()):
        assert len(set(ids)) == NEG and not any(((e, r, t) if head else (h, r, e)) in known for e in ids)
    loss, scores = kgc_loss(model, positives, negatives)
    auxiliary = sampler.auxiliary_loss(positives, negatives, scores, model)
    loss.backward(retain_graph=True)
    assert all(g is None or g.abs().sum() == 0 for g in sampler_grads(sampler))
    auxiliary.backward()
    assert any(g is not None and g.abs().sum() > 0 for g in sampler_grads(sampler))


@pytest.mark.parametrize("scope", [{}, {"presample_scope": "relation", "presample_min": 8}])
def test_rows_without_a_contrastive_positive_give_the_same_loss_and_gradients_without_autograd(scope):
    """Detached draws build autograd graphs only for rows with a contrastive positive (a shared
    pre-sample or relation pools): the contrastive loss and its gradients equal a sampler that
    differentiates every row."""
    graph = random_graph(entities=40, triples=600)
    positives = graph.train[:24]
    outcomes = []
    for split in (True, False):
        sampler, model = make(graph, kgc_gradient="none", presample_size=0.75, **scope), transe(graph)
        for parameter in sampler.parameters():
            torch.nn.init.normal_(parameter, std=0.2, generator=torch.Generator().manual_seed(1))
        if split:  # record which rows get autograd: some must, some not (the split is exercised)
            split_rows, fast = [], sampler._contrastive_rows_with_grad
            sampler._contrastive_rows_with_grad = lambda p, c, h, m, rows: split_rows.append(rows) or fast(p, c, h, m, rows)
        else:  # differentiate every row
            sampler._contrastive_rows_with_grad = lambda p, c, h, m, rows: sampler.similarities(p, c, h, m)
        negatives = sampler.sample(positives, model, step=1)
        if split:
            assert 0 < int(split_rows[0].sum()) < len(positives)
        _, scores = kgc_loss(model, positives, negatives)
        auxiliary = sampler.auxiliary_loss(positives, negatives, scores, model)
        auxiliary.backward()
        outcomes.append((negatives.ids, auxiliary.detach(), sampler_grads(sampler)))
    assert torch.equal(outcomes[0][0], outcomes[1][0])
    torch.testing.assert_close(outcomes[0][1], outcomes[1][1])
    for a, b in zip(outcomes[0][2], outcomes[1][2]):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_uniform_mix_and_score_similarity_enter_eq_12():
    graph = random_graph()
    model = transe(graph)
    g = torch.Generator().manual_seed(0)
    sims = {m: (torch.rand(3, 6, generator=g) * 2 - 1, torch.ones(3, 6, dtype=torch.bool)) for m in ("structure", "text")}
    plain = make(graph).log_probabilities(sims, 4).exp()
    for mix in (0.25, 1.0):
        mixed = make(graph, uniform_mix=mix).log_probabilities(sims, 4).exp()
        torch.testing.assert_close(mixed, (1 - mix) * plain + mix / 6, atol=1e-6, rtol=1e-5)
    sampler = make(graph, score_similarity=True)
    positives, candidates = graph.train[:5], torch.arange(0, E, 4)
    head = torch.ones(5, dtype=torch.bool)
    score, valid = sampler.similarities(positives, candidates, head, model)["score"]
    raw = model.score_negatives(positives, candidates.expand(5, -1), head).detach()
    torch.testing.assert_close(score, (raw - raw.mean(1, keepdim=True)) / raw.std(1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert bool(valid.all()) and not score.requires_grad
    negatives = sampler.sample(positives, model, 1)
    _, scores = kgc_loss(model, positives, negatives)
    assert torch.isfinite(sampler.auxiliary_loss(positives, negatives, scores, model))  # the score is not a contrastive modality


@pytest.mark.parametrize("temperature, weights", [(0.1, "paper"), (1.0, "script"), (0.5, "script")])
def test_contrastive_temperature_and_script_weights(temperature, weights):
    graph = random_graph(entities=40, triples=1500)
    feats = features(40, missing=0.0)
    options = dict(beta=0.5, presample_size=0.75, contrastive_temperature=temperature, contrastive_weights=weights)
    sampler, model = make(graph, feats=feats, **options), transe(graph)
    positives = graph.train[:20]
    negatives = sampler.sample(positives, model, step=0)
    _, scores = kgc_loss(model, positives, negatives)
    ctx = sampler._context
    loss = sampler.auxiliary_loss(positives, negatives, scores, model)
    expected = torch.stack([
        contrastive_by_hand(sim.detach(), ctx.known, ctx.own, ctx.draws.positions, scores.detach(), 0.5, 40, False,
                            temperature, weights)
        for sim, _ in ctx.similarities.values()
    ]).mean()
    torch.testing.assert_close(loss.detach(), 0.5 * expected)


def test_warm_start_draws_uniformly_then_switches_to_mmrns():
    graph = random_graph()
    sampler, model = make(graph, warm_start=3), transe(graph)
    positives = graph.train[:64]
    for step in range(3):
        negatives = sampler.sample(positives, model, step)
        assert negatives.representations is None
        assert 0 < int(negatives.corrupt_head.sum()) < 64  # head or tail per row, as Uniform
        loss, scores = kgc_loss(model, positives, negatives)
        assert sampler.auxiliary_loss(positives, negatives, scores, model) is None
        loss.backward()
        assert all(g is None for g in sampler_grads(sampler))
    negatives = sampler.sample(positives, model, 3)
    assert negatives.representations is not None and sampler.auxiliary_loss(positives, negatives, kgc_loss(model, positives, negatives)[1], model) is not None


# -- presample_scope: relation ------------------------------------------------------------------
def test_relation_pools_sizes_layout_and_padding():
    relations = torch.tensor([3, 3, 3, 3, 3, 3, 1, 1, 4, 0])  # groups of 6, 2, 1, 1 rows
    pools = RelationPools.draw(relations, 20, 3, E, torch.Generator().manual_seed(0), 2)
    group_rows = torch.bincount(pools.groups.group).tolist()
    assert pools.sizes.tolist() == [max(3, math.ceil(20 * s / 10)) for s in group_rows]
    assert pools.width == int(pools.sizes.max())
    for g, size in enumerate(pools.sizes.tolist()):
        members = pools.ids[pools.pool == g]
        assert len(members) == size == len(set(members.tolist()))  # without replacement
        for row in (pools.groups.group == g).nonzero().squeeze(1).tolist():
            assert int(pools.relation_ids[g]) == int(relations[row])
            assert pools.row_ids[row, :size].tolist() == members.tolist()
            assert pools.row_valid[row].tolist() == [True] * size + [False] * (pools.width - size)
    values = torch.randn(len(pools.ids), 3)
    padded = pools.pad(values)
    assert torch.equal(padded[pools.pool, pools.slot], values)
    assert int((padded != 0).any(-1).sum()) == len(values)  # zeros elsewhere


@pytest.mark.parametrize("options", [{"score_similarity": True}, {"ablation": "no_rel"}, {"ablation": "no_kca"}])
def test_relation_scope_similarities_and_gradients_equal_the_per_row_reference(options):
    """Each row's similarities to its own pool (each candidate under the row's relation) and their
    gradients equal those of the row alone with its pool as the pre-sample; padding is never valid."""
    graph = random_graph()
    sampler, model = make(graph, presample_scope="relation", presample_min=4, presample_size=40, **options), transe(graph)
    for parameter in sampler.parameters():
        torch.nn.init.normal_(parameter, std=0.2, generator=torch.Generator().manual_seed(2))
    positives = graph.train[:14]
    pools = RelationPools.draw(positives[:, 1], 40, 4, E, torch.Generator().manual_seed(0), 1)
    assert len(pools.sizes) > 1 and not bool(pools.row_valid.all())
    corrupt_head = torch.full((14,), True)
    fast = sampler.similarities(positives, pools, corrupt_head, model)
    weights = {m: torch.randn(14, pools.width, generator=torch.Generator().manual_seed(3)) for m in fast}
    sum(((sim * weights[m] * valid).sum() for m, (sim, valid) in fast.items())).backward()
    fast_grads = dense_grads([sampler, model])
    total = 0
    for row in range(14):  # reference: the row alone, its pool as a shared pre-sample (tested against the equations above)
        slots = pools.row_valid[row]
        alone = sampler.similarities(positives[row : row + 1], pools.row_ids[row, slots], corrupt_head[row : row + 1], model)
        assert alone.keys() == fast.keys()
        for modality, (sim, valid) in fast.items():
            assert not bool(valid[row, ~slots].any())
            assert torch.equal(valid[row, slots], alone[modality][1][0])
            torch.testing.assert_close(sim[row, slots], alone[modality][0][0], atol=1e-5, rtol=0)
            total = total + (alone[modality][0][0] * weights[modality][row, slots] * valid[row, slots]).sum()
    dense_grads([sampler, model])
    total.backward()
    for mine, theirs in zip(fast_grads, dense_grads([sampler, model])):
        assert (mine is None) == (theirs is None)
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kgc_gradient", ["minimise", "none"])
def test_relation_scope_draws_from_the_rows_own_pool(kgc_gradient):
    graph = random_graph(entities=60, triples=900)
    sampler, model = make(graph, presample_scope="relation", presample_min=12, presample_size=30, kgc_gradient=kgc_gradient), transe(graph)
    known = {tuple(t) for t in graph.train.tolist()}
    positives = graph.train[:40]
    for step in (0, 1):
        draws = []
        generator_state = sampler.generator.get_state()
        pools = RelationPools.draw(positives[:, 1], sampler.presample, 12, 60, sampler.generator, sampler.groups_per_chunk)
        sampler.generator.set_state(generator_state)  # the sampler draws the same pools
        negatives = sampler.sample(positives, model, step)
        for row, ((h, r, t), ids, head) in enumerate(zip(positives.tolist(), negatives.ids.tolist(), negatives.corrupt_head.tolist())):
            assert len(set(ids)) == NEG and not any(((e, r, t) if head else (h, r, e)) in known for e in ids)
            assert set(ids) <= set(pools.row_ids[row, pools.row_valid[row]].tolist())
            draws.append(set(ids))
        loss, scores = kgc_loss(model, positives, negatives)
        (loss + sampler.auxiliary_loss(positives, negatives, scores, model)).backward()
        assert any(g is not None and g.abs().sum() > 0 for g in sampler_grads(sampler))
        if kgc_gradient == "minimise":  # the straight-through sample carries the model's representations
            torch.testing.assert_close(negatives.representations, model.entity_representations(negatives.ids))


def test_relation_scope_options_are_checked():
    graph = random_graph()
    for bad in ({"faithful": True}, {"presample_min": 0}, {"presample_min": 2.5}):
        with pytest.raises(ConfigError):
            make(graph, presample_scope="relation", **bad)
    with pytest.raises(ConfigError):
        make(graph, presample_scope="row")
