"""KGC models: hand-computed scores, fast paths (batch, negatives, all entities) against
plain per-triple scoring, ties, gradients, and configuration errors."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.graph import KnowledgeGraph
from pipeline.models import MODELS, build_model
from pipeline.models.gcote import gram_schmidt_rows

ALL_MODELS = ["TransE", "DistMult", "ComplEx", "RotatE", "PairRE", "GC-OTE"]
SHARED = {"dim": 8, "gamma": 3.0, "regularization": 1e-3}


def random_graph(num_entities=12, num_relations=3, num_train=40, seed=0) -> KnowledgeGraph:
    generator = torch.Generator().manual_seed(seed)
    train = torch.stack(
        [
            torch.randint(num_entities, (num_train,), generator=generator),
            torch.randint(num_relations, (num_train,), generator=generator),
            torch.randint(num_entities, (num_train,), generator=generator),
        ],
        1,
    )
    return KnowledgeGraph(num_entities, num_relations, train, train[:5], train[5:10])


def make(name: str, graph: KnowledgeGraph, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, graph, SHARED, options).double()
    with torch.no_grad():  # move away from the initial scale so every term matters
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def set_rows(table: torch.nn.Embedding, rows: list[list[float]]) -> None:
    with torch.no_grad():
        table.weight.copy_(torch.tensor(rows, dtype=table.weight.dtype))


def one_graph(num_entities=3, num_relations=1) -> KnowledgeGraph:
    empty = torch.zeros((0, 3), dtype=torch.long)
    return KnowledgeGraph(num_entities, num_relations, torch.tensor([[0, 0, 1]]), empty, empty)


# -- hand-computed scores ---------------------------------------------------------------
def test_transe_hand_computed_l1_and_l2():
    graph = one_graph()
    for p, expected in ((2, 3.0 - math.sqrt(0.5**2 + 1.0**2)), (1, 3.0 - 1.5)):
        model = build_model("TransE", graph, {"dim": 2, "gamma": 3.0, "regularization": 0.0}, {"p": p})
        set_rows(model.entities, [[1.0, 0.0], [1.5, 2.0], [0.0, 0.0]])
        set_rows(model.relations, [[1.0, 1.0]])
        # h + r - t = (1 + 1 - 1.5, 0 + 1 - 2) = (0.5, -1)
        assert model.score_triples(torch.tensor([[0, 0, 1]])).item() == pytest.approx(expected)


def test_distmult_and_complex_hand_computed():
    graph = one_graph()
    distmult = build_model("DistMult", graph, {"dim": 2, "gamma": 0.0, "regularization": 0.0})
    set_rows(distmult.entities, [[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]])
    set_rows(distmult.relations, [[0.5, 2.0]])
    assert distmult.score_triples(torch.tensor([[0, 0, 1]])).item() == pytest.approx(1 * 0.5 * 3 + 2 * 2 * -1)

    complex_model = build_model("ComplEx", graph, {"dim": 1, "gamma": 0.0, "regularization": 0.0})
    set_rows(complex_model.entities, [[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]])  # h = 1+2i, t = 3-i
    set_rows(complex_model.relations, [[0.5, 1.0]])  # r = 0.5+i
    expected = ((1 + 2j) * (0.5 + 1j) * (3 + 1j)).real  # Re(h r conj(t))
    assert complex_model.score_triples(torch.tensor([[0, 0, 1]])).item() == pytest.approx(expected)


def test_rotate_hand_computed():
    graph = one_graph()
    model = build_model("RotatE", graph, {"dim": 1, "gamma": 3.0, "regularization": 0.0})
    set_rows(model.entities, [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # h = 1, t = 2i
    with torch.no_grad():
        model.relations.weight.fill_((math.pi / 2) / model.phase_scale)  # rotation by 90 degrees
    # h * e^{i pi/2} = i, |i - 2i| = 1
    assert model.score_triples(torch.tensor([[0, 0, 1]])).item() == pytest.approx(3.0 - 1.0, abs=1e-6)


def test_pairre_hand_computed():
    graph = one_graph()
    model = build_model("PairRE", graph, {"dim": 2, "gamma": 3.0, "regularization": 0.0})
    set_rows(model.entities, [[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]])  # normalised: (0.6, 0.8), (0, 1)
    set_rows(model.relations, [[1.0, 2.0, 0.5, -1.0]])  # r_h = (1, 2), r_t = (0.5, -1)
    # (0.6, 1.6) - (0, -1) = (0.6, 2.6) -> L1 3.2
    assert model.score_triples(torch.tensor([[0, 0, 1]])).item() == pytest.approx(3.0 - 3.2, abs=1e-6)


def test_gcote_hand_computed_with_context():
    # Entities 0 -r0-> 1 in TRAIN; group size 2, dim 2: one 2x2 block per relation.
    graph = one_graph(num_entities=3, num_relations=1)
    model = build_model("GC-OTE", graph, {"dim": 2, "gamma": 3.0, "regularization": 0.0}, {"group_size": 2})
    set_rows(model.entities, [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    with torch.no_grad():
        model.raw_transforms.copy_(torch.tensor([[[[0.0, 1.0], [-1.0, 0.0]]]]))  # already orthonormal rows
        model.log_scales.zero_()
    # f_r(x) = x^T U with U = [[0, 1], [-1, 0]]: f_r(1, 0) = (0, 1), f_r(0, 1) = (-1, 0).
    # Tail query (0, r, 2): own = f_r(e0) = (0, 1); context of e0 (no in-edges) = e0, so the
    # second term is the same: score = 3 - 2 * |(0, 1) - (2, 2)| = 3 - 2 * sqrt(5).
    assert model.score_triples(torch.tensor([[0, 0, 2]])).item() == pytest.approx(3 - 2 * math.sqrt(5), abs=1e-6)
    # Tail query (1, r, 2): e1 has the in-edge (0, r, 1): context = mean(e1, f_r(e0)) = (0, 1).
    # own = f_r(0, 1) = (-1, 0); around = f_r(0, 1) = (-1, 0); |(-1, 0) - (2, 2)| = sqrt(13).
    assert model.score_triples(torch.tensor([[1, 0, 2]])).item() == pytest.approx(3 - 2 * math.sqrt(13), abs=1e-6)
    # Head query (?, r, 0) with candidate 2: anchor e0 has the out-edge (0, r, 1): context =
    # mean(e0, f_r^{-1}(e1)); f^{-1}(x) = x^T U^T: f^{-1}(0, 1) = (1, 0) -> context (1, 0).
    # own = f^{-1}(1, 0) = (0, -1) = around; |(0, -1) - (2, 2)| = sqrt(13).
    head_scores = model.score_all(torch.tensor([[2, 0, 0]]), "head")
    assert head_scores[0, 2].item() == pytest.approx(3 - 2 * math.sqrt(13), abs=1e-6)


def test_gram_schmidt_rows_are_orthonormal_and_keep_first_direction():
    raw = torch.randn(5, 4, 4, dtype=torch.float64)
    orthonormal = gram_schmidt_rows(raw)
    assert torch.allclose(orthonormal @ orthonormal.transpose(-1, -2), torch.eye(4, dtype=torch.float64).expand(5, 4, 4), atol=1e-10)
    first = raw[:, 0] / raw[:, 0].norm(dim=-1, keepdim=True)
    assert torch.allclose(orthonormal[:, 0], first, atol=1e-10)


# -- fast paths against plain per-triple scoring ------------------------------------------
def every_triple(graph: KnowledgeGraph) -> torch.Tensor:
    e, r = graph.num_entities, graph.num_relations
    return torch.cartesian_prod(torch.arange(e), torch.arange(r), torch.arange(e))


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("side", ["head", "tail"])
def test_score_all_equals_per_triple_scores(name, side):
    graph = random_graph()
    model = make(name, graph)
    queries = graph.train[:7]
    fast = model.score_all(queries, side)
    assert fast.shape == (7, graph.num_entities)
    for row, (h, r, t) in enumerate(queries.tolist()):
        for e in range(graph.num_entities):
            triple = [e, r, t] if side == "head" else [h, r, e]
            plain = model.score_negatives(torch.tensor([[h, r, t]]), torch.tensor([[e]]), torch.tensor([side == "head"]))
            assert fast[row, e].item() == pytest.approx(plain.item(), abs=1e-9), (triple, side)
            if name != "GC-OTE":  # GC-OTE's score_triples is the tail direction by definition
                assert plain.item() == pytest.approx(model.score_triples(torch.tensor([triple])).item(), abs=1e-9)


@pytest.mark.parametrize("name", ["TransE", "RotatE", "DistMult", "GC-OTE"])
def test_score_all_chunked_path_matches_unchunked(name):
    graph = random_graph()
    model = make(name, graph)
    queries = graph.train[:9]
    whole = model.score_all(queries, "tail")
    model.score_all_budget = 1  # forces one query per chunk in chunked implementations
    assert torch.allclose(model.score_all(queries, "tail"), whole, atol=1e-12)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_score_batch_equals_separate_scoring_with_ids_and_representations(name):
    graph = random_graph()
    model = make(name, graph)
    positives = graph.train[:6]
    negatives = torch.randint(graph.num_entities, (6, 5), generator=torch.Generator().manual_seed(1))
    corrupt_head = torch.tensor([True, False, True, False, False, True])
    positive, negative = model.score_batch(positives, negatives, corrupt_head)
    assert torch.allclose(positive, model.score_triples(positives), atol=1e-12)
    for b in range(6):
        h, r, t = positives[b].tolist()
        for i in range(5):
            e = int(negatives[b, i])
            if name == "GC-OTE":
                expected = model.score_all(positives[b : b + 1], "head" if corrupt_head[b] else "tail")[0, e]
            else:
                expected = model.score_triples(torch.tensor([[e, r, t] if corrupt_head[b] else [h, r, e]]))[0]
            assert negative[b, i].item() == pytest.approx(expected.item(), abs=1e-9)
    as_representations = model.score_negatives(positives, model.entity_representations(negatives), corrupt_head)
    assert torch.allclose(as_representations, negative, atol=1e-12)


@pytest.mark.parametrize("name", ["TransE", "DistMult", "ComplEx"])
def test_identical_entities_get_identical_scores(name):
    graph = random_graph()
    model = make(name, graph)
    with torch.no_grad():
        model.entities.weight[5] = model.entities.weight[3]
    for side in ("head", "tail"):
        scores = model.score_all(graph.train[:4], side)
        assert torch.equal(scores[:, 5], scores[:, 3])


@pytest.mark.parametrize("name", ["TransE", "DistMult", "ComplEx", "RotatE"])
def test_fast_paths_do_not_fall_back_to_the_generic_broadcast(name, monkeypatch):
    graph = random_graph()
    model = make(name, graph)
    triples, negatives, corrupt_head = graph.train[:3], torch.randint(12, (3, 4)), torch.tensor([True, False, True])
    expected_all = model.score_all(triples, "head")
    h, r, t = triples.unbind(-1)
    representations = (model.entities(h), model.relations(r), model.entities(t), model.entities(negatives), corrupt_head)
    expected_negatives = model.negative_interaction(*representations)
    monkeypatch.setattr(model, "interaction", lambda *args: pytest.fail("generic interaction used"))
    assert torch.equal(model.score_all(triples, "head"), expected_all)
    assert torch.equal(model.negative_interaction(*representations), expected_negatives)
    if name == "TransE":  # its whole training step (positives included) is the fused distance
        model.score_batch(triples, negatives, corrupt_head)


def test_transe_l1_score_all():
    graph = random_graph()
    model = make("TransE", graph, p=1)
    queries = graph.train[:5]
    h, r, t = queries.unbind(-1)
    expected = 3.0 - (model.entities(h) + model.relations(r)).unsqueeze(1).sub(model.entities.weight).abs().sum(-1)
    assert torch.allclose(model.score_all(queries, "tail"), expected, atol=1e-10)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_training_path_gradients_reach_embeddings(name):
    graph = random_graph()
    model = make(name, graph).float()
    positive, negative = model.score_batch(graph.train[:4], torch.randint(12, (4, 3)), torch.tensor([True, False, True, False]))
    (positive.sum() - negative.sum() + model.regularization(graph.train[:4])).backward()
    gradient = model.entity_representations(torch.arange(1)).new_zeros(())  # scalar accumulator
    for parameter in model.parameters():
        assert parameter.grad is not None
        gradient = gradient + parameter.grad.to_dense().abs().sum()
    assert torch.isfinite(gradient) and gradient > 0


def test_n3_regularization_hand_computed():
    graph = one_graph()
    model = build_model("DistMult", graph, {"dim": 2, "gamma": 0.0, "regularization": 0.5})
    set_rows(model.entities, [[1.0, -2.0], [0.0, 1.0], [5.0, 5.0]])
    set_rows(model.relations, [[3.0, 0.0]])
    # (1 + 8) + 27 + 1 = 37 for the single triple (0, 0, 1); entity 2 is not in the batch
    assert model.regularization(torch.tensor([[0, 0, 1]])).item() == pytest.approx(0.5 * 37)
    assert model.regularization(torch.tensor([[0, 0, 1], [1, 0, 1]])).item() == pytest.approx(0.5 * (37 + 1 + 27 + 1) / 2)
    complex_model = build_model("ComplEx", graph, {"dim": 1, "gamma": 0.0, "regularization": 1.0})
    set_rows(complex_model.entities, [[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])  # |h| = 5
    set_rows(complex_model.relations, [[1.0, 0.0]])
    assert complex_model.regularization(torch.tensor([[0, 0, 1]])).item() == pytest.approx(125 + 1 + 1)


# -- configuration ----------------------------------------------------------------------
def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'TransX'.*complex.*distmult.*gc-ote.*pairre.*rotate.*transe"):
        build_model("TransX", random_graph(), SHARED)


def test_bad_model_options_name_the_key():
    graph = random_graph()
    with pytest.raises(ConfigError, match="train.transe.p must be 1 or 2"):
        build_model("TransE", graph, SHARED, {"p": 3})
    with pytest.raises(ConfigError, match="train.distmult.p is not an option"):
        build_model("DistMult", graph, SHARED, {"p": 1})
    with pytest.raises(ConfigError, match="train.gc-ote.group_size"):
        build_model("GC-OTE", graph, SHARED, {"group_size": 3})


def test_registry_holds_the_six_models():
    assert sorted(MODELS.names()) == sorted(name.lower() for name in ALL_MODELS)


def test_transe_hand_written_backward_equals_autograd():
    from pipeline.models.distance import AnchoredL2Distance

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    r = torch.randn(5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    upstream = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    fast = AnchoredL2Distance.apply(x, r, sign)
    fast_grads = torch.autograd.grad(fast, (x, r), upstream)
    plain = (r.unsqueeze(1) + sign.view(-1, 1, 1) * (x[:, 1:] - x[:, :1])).square().sum(-1).sqrt()
    plain_grads = torch.autograd.grad(plain, (x, r), upstream)
    assert torch.allclose(fast, plain, atol=1e-12)
    for got, expected in zip(fast_grads, plain_grads):
        assert torch.allclose(got, expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: AnchoredL2Distance.apply(a, b, sign), (x, r))
