"""The training loop: seeded batches, any sampler, validation, best checkpoint, resume.

One step::

    positives = next batch [B, 3]                      (seeded permutation, drop-last)
    negatives = sampler.sample(positives, model, step)
    positive_scores, negative_scores = model.score_batch(positives, negatives...)
    loss = kgc_loss(positive_scores, negative_scores, subsampling weights)
           + model.regularization(positives) + sampler.auxiliary_loss(...)
           (a sampler without negatives, NS-KGE: sampler.whole_graph_loss + regularisation)
    sparse embedding gradients -> dense; Adam step (model lr, sampler group sampler_lr)

With ``N`` data-parallel ranks (:mod:`pipeline.distributed`) each rank takes its slice of
the global batch, back-propagates ``loss / N`` and the ranks sum their gradients before Adam.

Every ``valid_every`` steps (and at the last step) ``validate(model)`` gives VALID metrics;
the best MRR is kept in ``best.pt``, ``last.pt`` holds everything needed to resume (model,
optimizer, sampler with its generator, batch order, RNG states, history). A run resumed from
``last.pt`` ends bit-identical to an uninterrupted one. A damaged checkpoint is never
deleted: it is renamed ``<name>.corrupt-<n>`` and the run starts fresh (see :func:`fit`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from pipeline.atomic import atomic_path
from pipeline.distributed import GradientSync, World, broadcast_parameters, broadcast_tree, gather_to_main, rank_seed, shard
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.graph import KnowledgeGraph
from pipeline.losses import KGCLoss, SubsamplingWeights
from pipeline.models import KGCModel, build_model
from pipeline.samplers import NegativeSampler

#: ``validate(model) -> {"mrr": ..., "hits@10": ...}`` on VALID (fractions in 0..1).
Validator = Callable[[KGCModel], dict[str, float]]

LAST, BEST = "last.pt", "best.pt"


class CheckpointError(DataError):
    """A checkpoint that cannot be used (empty, truncated, not a checkpoint, or of another
    graph): names the file and what to do."""


#: What fixes a damaged checkpoint, unless the caller names something more precise.
CHECKPOINT_FIX = "retrain with `python -m stages train DATASET` (it sets a damaged checkpoint aside) or name another --checkpoint"


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class TrainSettings:
    """Loop hyper-parameters (``train`` section of params.yaml)."""

    steps: int
    batch_size: int
    lr: float
    sampler_lr: float
    valid_every: int
    patience: int
    seed: int
    log_every: int = 100


@dataclass
class TrainingResult:
    """What a finished (or early-stopped) run reports."""

    step: int
    best: dict[str, Any]  # {"step", "mrr", "hits@10", ...} of the best validation
    history: list[dict[str, float]]  # one row per validation: step, loss, valid_mrr, valid_hits@10
    losses: list[dict[str, float]]  # one row per log_every steps: step, loss (window mean)
    stopped_early: bool
    train_seconds: float  # time in training steps (validation excluded), over all sessions
    wall_seconds: float  # total time, validation included, over all sessions
    step_triples: int  # positive triples trained on (steps x batch size)

    @property
    def triples_per_second(self) -> float:
        return 0.0 if self.train_seconds == 0 else self.step_triples / self.train_seconds


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``; ``cuda`` (error if unavailable)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    raise ConfigError(f"train.device must be auto, cpu or cuda, got {name!r}")


class BatchStream:
    """Fixed-size batches of row indices from a seeded permutation per epoch (drop-last).

    The dropped remainder differs each epoch, so every triple is seen. State (generator,
    current permutation, cursor) goes into checkpoints.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        if batch_size > num_rows:
            raise ConfigError(f"train.batch_size ({batch_size}) exceeds the {num_rows} training triples")
        self.num_rows, self.batch_size = num_rows, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.permutation = torch.randperm(num_rows, generator=self.generator)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.num_rows:
            self.permutation = torch.randperm(self.num_rows, generator=self.generator)
            self.cursor = 0
        batch = self.permutation[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "permutation": self.permutation, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.permutation, self.cursor = state["permutation"], state["cursor"]


def build_optimizer(model: KGCModel, sampler: NegativeSampler, settings: TrainSettings) -> torch.optim.Adam:
    """Adam with the model's parameters (``lr``) and the sampler's, if any (``sampler_lr``)."""
    groups = [{"params": list(model.parameters()), "lr": settings.lr}]
    sampler_parameters = [p for p in sampler.parameters() if p.requires_grad]
    if sampler_parameters:
        groups.append({"params": sampler_parameters, "lr": settings.sampler_lr})
    return torch.optim.Adam(groups, lr=settings.lr, fused=True)


class GradientDensifier:
    """Turns sparse embedding gradients (summed over all lookups of a step) dense for Adam.

    Each parameter gets one persistent dense buffer, zeroed and filled by ``index_add_``
    every step: no full-size allocation (page faults) and no full-size add pass per step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.buffers: dict[int, torch.Tensor] = {}

    def __call__(self) -> None:
        for parameter in self.parameters:
            gradient = parameter.grad
            if gradient is not None and gradient.is_sparse:
                self.densify(parameter, gradient._indices()[0], gradient._values())

    def densify(self, parameter: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """``parameter.grad``: the dense sum of ``values [K, ...]`` at ``rows [K]`` (in order)."""
        buffer = self.buffers.get(id(parameter))
        if buffer is None:
            buffer = self.buffers[id(parameter)] = torch.zeros_like(parameter)
        else:
            buffer.zero_()
        parameter.grad = buffer.index_add_(0, rows, values)


def fingerprint_text(fingerprint: dict[str, Any]) -> str:
    """Canonical JSON of a run's configuration, compared to decide resume vs fresh start."""
    return json.dumps(fingerprint, sort_keys=True, default=str)


def read_checkpoint(path: str | Path, fix: str = CHECKPOINT_FIX) -> dict[str, Any]:
    """The checkpoint at ``path``; a one-line CheckpointError naming it and ``fix`` when it is
    missing, empty, truncated or not a checkpoint of this pipeline (no model and its config)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, f"missing checkpoint{fix and '; ' + fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch/pickle/zip raise many kinds for a damaged file
        raise CheckpointError(path, f"not a readable checkpoint (empty, truncated or corrupt: {one_line(error)}){fix and '; ' + fix}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict) or not isinstance(checkpoint.get("model_config"), dict):
        raise CheckpointError(path, f"not a checkpoint of this pipeline (no model and model_config){fix and '; ' + fix}")
    return checkpoint


def one_line(error: BaseException, limit: int = 160) -> str:
    """An exception's first sentence on one line, shortened to ``limit`` characters."""
    text = " ".join(str(error).split()).split(". ")[0] or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checkpoint_graph(checkpoint: dict[str, Any]) -> list[int] | None:
    """``[entities, relations, train triples]`` of the graph a checkpoint was trained on, when
    its fingerprint records it (the train stage's does)."""
    try:
        graph = json.loads(checkpoint.get("fingerprint") or "{}").get("graph")
    except (TypeError, ValueError, AttributeError):
        return None
    return [int(size) for size in graph[:3]] if isinstance(graph, list) and len(graph) >= 3 else None


def set_aside(path: Path, reason: str = "corrupt") -> Path:
    """Rename ``path`` to ``<name>.<reason>-<n>`` (the first free ``n``) and return the new path."""
    n = 1
    while path.with_name(f"{path.name}.{reason}-{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{reason}-{n}")
    os.replace(path, target)
    return target


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path, graph: KnowledgeGraph, device: torch.device | str = "cpu", fix: str = CHECKPOINT_FIX) -> KGCModel:
    """Rebuild the model stored in a checkpoint (``best.pt`` or ``last.pt``) for ``graph``.

    A CheckpointError naming the file and ``fix``: unreadable, or trained on another graph.
    """
    checkpoint = read_checkpoint(path, fix)
    trained_on = checkpoint_graph(checkpoint)
    here = [graph.num_entities, graph.num_relations, len(graph.train)]
    if trained_on is not None and trained_on != here:
        raise CheckpointError(path, f"trained on another graph ({trained_on[0]} entities, {trained_on[1]} relations, "
                                    f"{trained_on[2]} train triples; this one: {here[0]}, {here[1]}, {here[2]}); {fix}")
    config = checkpoint["model_config"]
    try:
        model = build_model(config["name"], graph, config["shared"], config["options"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(path, f"does not hold a model of this graph ({one_line(error)}); {fix}") from None
    return model.to(device).eval()


RESUME_KEYS = ("fingerprint", "step", "optimizer", "sampler", "batches", "rng", "loop")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resume_point(checkpoint_dir: Path, key: str, model: KGCModel, log: Callable[[str], None]) -> tuple[dict[str, Any] | None, bool]:
    """``(the last.pt to resume from, or None for a fresh start; whether best.pt must be
    rewritten from it)``.

    Another configuration's ``last.pt``/``best.pt`` are removed, but a ``last.pt`` of another
    graph (another dataset's) is set aside as ``last.pt.foreign-<n>``. A damaged ``last.pt``
    (unreadable, or not fitting ``model``) is set aside as ``last.pt.corrupt-<n>``, the
    ``best.pt`` beside it kept as ``best.pt.previous-<n>``, and the run starts fresh (only one
    resumable state is kept). A damaged or foreign ``best.pt`` is set aside; it is rewritten
    when ``last.pt`` holds the best model, else the run starts fresh (``last.pt`` set aside as
    ``last.pt.without-best-<n>``). Each of these is said through ``log``.
    """
    last_path, best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
    if not last_path.is_file():
        best_path.unlink(missing_ok=True)  # never report another run's best
        return None, False
    try:
        checkpoint = read_checkpoint(last_path, fix="")
        if checkpoint.get("fingerprint") == key:
            _check_resumable(last_path, checkpoint, model)
    except CheckpointError as error:
        moved = set_aside(last_path)
        kept = f"; {best_path} kept as {set_aside(best_path, 'previous').name}" if best_path.is_file() else ""
        log(f"{error}: set aside as {moved.name}{kept}; training starts fresh")
        return None, False
    if checkpoint.get("fingerprint") != key:  # another configuration's checkpoints are stale
        trained_on, here = checkpoint_graph(checkpoint), checkpoint_graph({"fingerprint": key})
        if trained_on is not None and here is not None and trained_on != here:  # not an earlier run here: keep it
            log(f"{last_path}: a checkpoint of another graph ({trained_on[0]} entities, {trained_on[1]} relations): "
                f"set aside as {set_aside(last_path, 'foreign').name}; training starts fresh")
        last_path.unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)
        return None, False
    best_step = checkpoint["loop"].get("best", {}).get("step")
    problem = None if best_step is None else _best_problem(best_path, key, best_step)
    if problem is None:
        return checkpoint, False
    aside = f", set aside as {set_aside(best_path).name}" if best_path.is_file() else ""
    if best_step == checkpoint["step"]:
        log(f"{problem}{aside}; rewritten from {last_path.name} (step {best_step}, the best model)")
        return checkpoint, True
    moved = set_aside(last_path, "without-best")
    log(f"{problem}{aside}; {last_path.name} (step {checkpoint['step']}) does not hold the best model (step {best_step}): "
        f"set aside as {moved.name}, training starts fresh")
    return None, False


def _check_resumable(path: Path, checkpoint: dict[str, Any], model: KGCModel) -> None:
    """A CheckpointError unless ``checkpoint`` holds a full resume state for ``model``."""
    missing = [name for name in RESUME_KEYS if name not in checkpoint]
    if missing or not isinstance(checkpoint["loop"], dict):
        raise CheckpointError(path, f"not a resumable checkpoint (missing {', '.join(missing) or 'loop state'})")
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    stored = {name: tuple(getattr(value, "shape", ())) for name, value in checkpoint["model"].items()}
    if stored != expected:
        raise CheckpointError(path, "its model does not match this run's (parameter names or shapes differ)")


def _best_problem(best_path: Path, key: str, best_step: int) -> str | None:
    """What is wrong with ``best.pt`` for a run whose best validation was at ``best_step``, if anything."""
    try:
        best = read_checkpoint(best_path, fix="")
    except CheckpointError as error:
        return str(error)
    if best.get("fingerprint") != key:
        return f"{best_path}: a checkpoint of another run"
    if best.get("step") != best_step:
        return f"{best_path}: from step {best.get('step')}, not the run's best step {best_step}"
    return None


def step_loss(
    model: KGCModel,
    sampler: NegativeSampler,
    loss_fn: KGCLoss,
    positives: torch.Tensor,
    step: int,
    subsampling: SubsamplingWeights | None = None,
) -> torch.Tensor:
    """The loss of one training step on ``positives [B, 3]``: sample, score, KGC loss,
    regularisation, the sampler's auxiliary loss. A sampler that draws no negatives
    (``draws_negatives`` False, NS-KGE) gives its whole-graph loss instead of the last three."""
    weights = subsampling(positives) if subsampling is not None else None
    if not sampler.draws_negatives:
        return sampler.whole_graph_loss(positives, model, weights) + model.regularization(positives)
    negatives = sampler.sample(positives, model, step)
    positive_scores, negative_scores = model.score_batch(positives, negatives.as_model_input(), negatives.corrupt_head)
    loss = loss_fn(positive_scores, negative_scores, weights) + model.regularization(positives)
    auxiliary = sampler.auxiliary_loss(positives, negatives, negative_scores, model)
    return loss if auxiliary is None else loss + auxiliary


class TrainStep:
    """One optimisation step of this rank of ``world`` (one process by default): the loop body
    of :func:`fit`, which benchmarks time alone.

    Called with ``(batch [B, 3], step)``: takes the global batch, trains on this rank's rows (all of
    them with one process), back-propagates ``loss / N``, synchronises the gradients
    (:class:`~pipeline.distributed.GradientSync`) and, when the global loss is finite, takes
    the Adam step of :func:`build_optimizer`. Returns the global batch's loss.
    """

    def __init__(self, model: KGCModel, sampler: NegativeSampler, loss_fn: KGCLoss, settings: TrainSettings,
                 world: World | None = None, subsampling: SubsamplingWeights | None = None):
        self.model, self.sampler, self.loss_fn, self.subsampling = model, sampler, loss_fn, subsampling
        self.world = world or World(device=next(model.parameters()).device)
        self.rows = shard(self.world, settings.batch_size)
        self.optimizer = build_optimizer(model, sampler, settings)
        self.synchronise = GradientSync(GradientDensifier(self.optimizer), self.world)

    def __call__(self, batch: torch.Tensor, step: int) -> float:
        loss = step_loss(self.model, self.sampler, self.loss_fn, batch[self.rows], step, self.subsampling)
        self.optimizer.zero_grad(set_to_none=True)
        if self.world.size > 1:  # this rank's share of the mean over ranks
            loss = loss / self.world.size
        loss.backward()
        value = self.synchronise(loss.item())
        if math.isfinite(value):
            self.optimizer.step()
        return value


def stop_horizon(state: "LoopState", settings: TrainSettings) -> int:
    """The step by which the run ends unless VALID MRR improves: ``settings.steps``, or the
    validation at which early stopping's patience runs out (the progress bar's total, so its
    ETA holds under early stopping; an improvement moves it on)."""
    last = state.history[-1]["step"] if state.history else 0
    remaining = settings.patience - state.bad_validations if state.best else settings.patience + 1
    return min(settings.steps, (last // settings.valid_every + remaining) * settings.valid_every)


@dataclass
class LoopState:
    """Everything of the loop besides modules: progress, metrics, and loss accumulators."""

    step: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    bad_validations: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    window_loss: float = 0.0  # sum over the current log window
    window_steps: int = 0
    valid_loss: float = 0.0  # sum since the last validation
    valid_steps: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0


def fit(
    model: KGCModel,
    sampler: NegativeSampler,
    loss_fn: KGCLoss,
    graph: KnowledgeGraph,
    settings: TrainSettings,
    checkpoint_dir: str | Path,
    validate: Validator,
    model_config: dict[str, Any],
    fingerprint: dict[str, Any],
    subsampling: SubsamplingWeights | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
    world: World | None = None,
) -> TrainingResult:
    """Train ``model`` (already on its device, as is ``sampler``) and return the run's result.

    Resumes from ``checkpoint_dir/last.pt`` when its ``fingerprint`` (the run's config minus
    when to stop: ``steps``, ``patience``) equals this one, so raising ``steps`` extends a run
    and early stopping is judged by this run's ``patience`` (raising it continues a run that
    stopped early; a lower one that the run has already reached stops it at once).
    Otherwise starts fresh and removes the stale ``last.pt`` and ``best.pt``; damaged checkpoints are set aside
    (:func:`resume_point`). ``log`` says ``resuming from step N`` and what was set aside.
    ``model_config`` (``name``, ``shared``, ``options``)
    is stored so :func:`load_model` can rebuild the model. The model's initial parameters
    must already come from ``settings.seed`` (the caller seeds before building it).

    ``world`` (:mod:`pipeline.distributed`): one rank of a data-parallel run. Every rank calls
    ``fit`` alike (``validate`` must give the same metrics on every rank, e.g. the sharded
    :func:`pipeline.evaluation.evaluate`); each trains on its slice of the global batch with
    its own sampler generator, and rank 0 alone touches ``checkpoint_dir`` and logs. The
    checkpoint holds every rank's sampler and RNG state, and the world size joins the
    fingerprint (another number of ranks starts fresh).
    """
    world = world or World(device=next(model.parameters()).device)
    log = log if world.is_main else (lambda message: None)
    checkpoint_dir = Path(checkpoint_dir)
    last_path, best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
    device = next(model.parameters()).device
    train = graph.train.to(device)
    batches = BatchStream(len(train), settings.batch_size, settings.seed)
    train_step = TrainStep(model, sampler, loss_fn, settings, world, subsampling)
    optimizer = train_step.optimizer
    state = LoopState()
    key = fingerprint_text(fingerprint if world.size == 1 else {**fingerprint, "world_size": world.size})
    if world.size > 1:
        sampler.generator.manual_seed(rank_seed(sampler.generator.initial_seed(), world.rank))
        broadcast_parameters(world, model, sampler)

    checkpoint, rewrite_best = resume_point(checkpoint_dir, key, model, log) if world.is_main else (None, False)
    checkpoint, rewrite_best = broadcast_tree(world, (checkpoint, rewrite_best))
    if checkpoint is not None:
        try:
            own = checkpoint if world.rank == 0 else checkpoint["ranks"][world.rank - 1]
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            sampler.load_state_dict(checkpoint["sampler"])
            if world.rank:  # this rank's own sampler state (its generator, caches, ...) over rank 0's
                sampler.load_state_dict(own["sampler"], strict=False)
            batches.load_state_dict(checkpoint["batches"])
            torch.set_rng_state(own["rng"]["torch"])
            if device.type == "cuda" and own["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(own["rng"]["cuda"], device)
            state = LoopState(**checkpoint["loop"])
            state.stopped_early = state.bad_validations >= settings.patience  # judged by this run's patience
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(last_path, f"cannot be resumed ({one_line(error)}); move it aside to start fresh") from None
        log(f"resuming from step {state.step} ({last_path})")

    def rank_state() -> dict[str, Any]:
        """What differs between ranks: the sampler's state but its parameters, the RNG states."""
        parameters = {name for name, _ in sampler.named_parameters()}
        return {
            "sampler": {name: value for name, value in sampler.state_dict().items() if name not in parameters},
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }

    def save(path: Path, full: bool) -> None:
        """Rank 0 writes ``path``; a full (``last.pt``) checkpoint gathers every rank's state first."""
        ranks = gather_to_main(world, rank_state()) if full and world.size > 1 else None
        if not world.is_main:
            return
        payload: dict[str, Any] = {"fingerprint": key, "model_config": model_config, "model": model.state_dict(), "step": state.step}
        if full:
            payload.update(
                optimizer=optimizer.state_dict(),
                sampler=sampler.state_dict(),
                batches=batches.state_dict(),
                rng=rank_state()["rng"],
                loop=asdict(state),
            )
            if ranks is not None:
                payload["ranks"] = ranks[1:]
        else:
            payload["metrics"] = state.best
        write_checkpoint(path, payload)

    if rewrite_best:
        save(best_path, full=False)
    model.train()
    session_start = time.perf_counter()
    wall_before = state.wall_seconds
    finished = state.stopped_early or state.step >= settings.steps
    # smoothing=0: the rate (hence the ETA) is the run's average, validation pauses included
    bar = tqdm(total=stop_horizon(state, settings), initial=state.step, desc="train", unit="step", smoothing=0,
               disable=not progress or finished or not world.is_main)
    while not finished:
        step_start = time.perf_counter()
        value = train_step(train[batches.next().to(device)], state.step)
        if not math.isfinite(value):
            where = "see rank 0"
            if world.is_main:
                where = f"{last_path} (step {read_checkpoint(last_path)['step']})" if last_path.is_file() else "none written yet"
            raise TrainingDiverged(f"loss is {value} at step {state.step}; last good checkpoint: {where}")
        state.step += 1
        state.train_seconds += time.perf_counter() - step_start
        state.window_loss, state.window_steps = state.window_loss + value, state.window_steps + 1
        state.valid_loss, state.valid_steps = state.valid_loss + value, state.valid_steps + 1
        if state.step % settings.log_every == 0:
            state.losses.append({"step": state.step, "loss": state.window_loss / state.window_steps})
            state.window_loss, state.window_steps = 0.0, 0
        bar.update(1)
        if state.step % settings.valid_every == 0 or state.step >= settings.steps:
            model.eval()
            with torch.no_grad():
                metrics = validate(model)
            model.train()
            row = {"step": state.step, "loss": state.valid_loss / state.valid_steps, "valid_mrr": metrics["mrr"], "valid_hits@10": metrics["hits@10"]}
            state.history.append(row)
            state.valid_loss, state.valid_steps = 0.0, 0
            if not state.best or metrics["mrr"] > state.best["mrr"]:
                state.best = {"step": state.step, **metrics}
                state.bad_validations = 0
                save(best_path, full=False)
            else:
                state.bad_validations += 1
                state.stopped_early = state.bad_validations >= settings.patience
            finished = state.stopped_early or state.step >= settings.steps
            state.wall_seconds = wall_before + time.perf_counter() - session_start
            save(last_path, full=True)
            bar.total = stop_horizon(state, settings)  # "max N" in the postfix when early stopping bounds it
            bar.set_postfix(loss=f"{row['loss']:.4f}", valid_mrr=f"{metrics['mrr']:.4f}", max=str(settings.steps))
    bar.close()
    return TrainingResult(
        step=state.step,
        best=state.best,
        history=state.history,
        losses=state.losses,
        stopped_early=state.stopped_early,
        train_seconds=state.train_seconds,
        wall_seconds=state.wall_seconds,
        step_triples=state.step * settings.batch_size,
    )
