"""Data-parallel training over processes: ``torch.distributed``, gloo on CPU, NCCL on GPU.

A :class:`World` is one process's place among ``N`` ranks (``N = 1``: an ordinary single
process, every helper here is then a no-op). What ``N`` ranks compute per step, with the
global batch ``B`` (``train.batch_size``, a multiple of ``N``):

- Positives: every rank draws the same global batch ``[B, 3]`` from the seeded batch stream
  (``train.seed``) and trains on its slice, rows ``[r B/N, (r + 1) B/N)`` (:func:`shard`).
- Negatives: rank ``r``'s sampler draws with its own generator, seeded
  :func:`rank_seed` ``(sampler.seed, r)`` (rank 0: ``sampler.seed`` itself, so one process is
  exactly the single-process run). Sampler parameters start equal on every rank (built from
  ``sampler.seed``, then broadcast from rank 0) and stay equal.
- Gradients: rank ``r`` back-propagates ``L_r / N`` (``L_r`` its loss over its rows) and the
  ranks sum their gradients (:class:`GradientSync`), so the update is the single-process
  update of ``mean_r L_r`` on the concatenated batch: the same Adam step on every rank. For
  losses that are plain means over rows (the KGC losses, N3, NS-KGE) ``mean_r L_r`` is the
  loss of the global batch; weighted means (``train.subsampling``) and MMRNS's contrastive
  loss (a mean over the rows that have a contrastive positive) are averaged per rank.
- Per-rank sampler state: MMRNS draws one pre-sample of ``P`` candidates per rank and step for
  its ``B/N`` rows (``P`` does not shrink with ``N``; the corrupted side alternates with the
  global step as in one process; the eq. 9/13 self-adversarial weights are per row); KBGAN's
  reward baseline and NSCaching's caches are each rank's own (refreshed from its rows).
  All of it is checkpointed per rank, so a resumed run continues exactly.

Embedding tables have sparse gradients (``nn.Embedding(sparse=True)``): instead of
DistributedDataParallel (whose all-reduce would move the dense ``[E, d]`` gradient every step,
and NCCL has no sparse all-reduce) :class:`GradientSync` gathers the rows each rank touched
and all-reduces only the dense gradients, in one bucket.

A collective that fails (another rank died, or did not answer within ``timeout`` seconds,
``train.dist_timeout``) raises :class:`RankFailure` naming this rank and the timeout.
"""
from __future__ import annotations

import contextlib
import datetime
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, PipelineError


class RankFailure(PipelineError):
    """A collective operation failed: another rank died, or did not answer within the timeout."""


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` ranks, its compute ``device`` and the collective
    ``timeout`` (seconds)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout: float = 600.0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and plots."""
        return self.rank == 0

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turns a failed collective into a :class:`RankFailure` saying what was going on."""
        try:
            yield
        except RuntimeError as error:  # DistBackendError, gloo connection errors and timeouts
            from pipeline.training import one_line  # (pipeline.training imports this module)

            detail = one_line(RuntimeError(re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(error).split()))))  # no source location
            raise RankFailure(
                f"rank {self.rank} of {self.size}: {what} failed ({detail}); another rank died or did not answer "
                f"within train.dist_timeout ({self.timeout:g} s)"
            ) from None


def join(rank: int, size: int, local_rank: int, device: torch.device, timeout: float) -> World:
    """Join (create) the default process group; ``size == 1``: no group, ``World()`` on ``device``.

    ``device`` cuda: this rank computes on ``cuda:local_rank`` with NCCL; cpu: gloo. The
    rendezvous follows torch's ``env://`` (``MASTER_ADDR``, ``MASTER_PORT``, set by torchrun).
    """
    if size == 1:
        return World(device=device, timeout=timeout)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    world = World(rank, size, device, timeout)
    with world.collective("joining the process group"):
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout))
    return world


def leave(world: World) -> None:
    """Destroy the process group of a distributed ``world`` (nothing for one process)."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s generator derived from ``seed``: ``seed`` itself for rank 0,
    else a 63-bit hash of ``(seed, rank)`` (numpy's SeedSequence)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def shard(world: World, batch_size: int) -> slice:
    """This rank's rows ``[r B/N, (r + 1) B/N)`` of a global batch of ``batch_size`` rows."""
    if batch_size % world.size:
        raise ConfigError(f"train.batch_size ({batch_size}) must be a multiple of the number of processes ({world.size})")
    width = batch_size // world.size
    return slice(world.rank * width, (world.rank + 1) * width)


# -- tensors and trees over the wire ------------------------------------------------------
def _map_leaves(tree: Any, kind: type, function: Callable[[Any], Any]) -> Any:
    """``tree`` (dicts, lists, tuples) with every leaf of type ``kind`` replaced by ``function(leaf)``."""
    if isinstance(tree, kind):
        return function(tree)
    if isinstance(tree, dict):
        return {key: _map_leaves(value, kind, function) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_leaves(value, kind, function) for value in tree)
    return tree


@dataclass(frozen=True)
class _Slot:
    """Placeholder of the ``index``-th tensor of a broadcast tree."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """A view of ``tensor`` in a dtype every backend sends (bool as uint8, complex as real pairs)."""
    if tensor.dtype == torch.bool:
        return tensor.view(torch.uint8)
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _send_device(world: World) -> torch.device:
    return world.device if world.device.type == "cuda" else torch.device("cpu")


def broadcast_tree(world: World, tree: Any) -> Any:
    """Rank 0's ``tree`` (a checkpoint: nested dicts/lists of tensors and plain values) on every
    rank; the other ranks pass anything (``None``). Tensors travel as tensors (no pickling of
    an ``[E, d]`` table), the rest pickled; received tensors are on the CPU."""
    if world.size == 1:
        return tree
    tensors: list[torch.Tensor] = []

    def slot(tensor: torch.Tensor) -> _Slot:
        tensors.append(tensor.detach().cpu().contiguous())
        return _Slot(len(tensors) - 1, tuple(tensor.shape), tensor.dtype)

    holder = [_map_leaves(tree, torch.Tensor, slot) if world.is_main else None]
    with world.collective("sharing rank 0's checkpoint"):
        dist.broadcast_object_list(holder, src=0, device=_send_device(world))
        skeleton = holder[0]
        if not world.is_main:
            slots: list[_Slot] = []
            _map_leaves(skeleton, _Slot, slots.append)
            tensors = [torch.empty(s.shape, dtype=s.dtype) for s in sorted(slots, key=lambda s: s.index)]
        for tensor in tensors:
            if tensor.numel():
                on_wire = _wire(tensor).to(_send_device(world))
                dist.broadcast(on_wire, src=0)
                _wire(tensor).copy_(on_wire)
    return _map_leaves(skeleton, _Slot, lambda s: tensors[s.index])


def gather_to_main(world: World, tree: Any) -> list[Any] | None:
    """Every rank's ``tree`` (tensors moved to the CPU), in rank order, on rank 0; None elsewhere."""
    tree = _map_leaves(tree, torch.Tensor, lambda tensor: tensor.detach().cpu())
    if world.size == 1:
        return [tree]
    gathered: list[Any] | None = [None] * world.size if world.is_main else None
    with world.collective("gathering the ranks' states for a checkpoint"):
        dist.gather_object(tree, gathered, dst=0)
    return gathered


def broadcast_parameters(world: World, *modules: torch.nn.Module) -> None:
    """Overwrite every parameter of ``modules`` with rank 0's (so all ranks start equal)."""
    if world.size == 1:
        return
    with world.collective("sharing rank 0's parameters"), torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                dist.broadcast(_wire(parameter.data), src=0)


def all_gather_rows(world: World, tensor: torch.Tensor, lengths: list[int] | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor [n_r, ...]`` (the row counts ``n_r`` may differ; the trailing
    shape and dtype must not), in rank order, on the device of ``tensor``. ``lengths``: the
    ``n_r`` when every rank knows them already (one collective instead of two)."""
    if world.size == 1:
        return [tensor]
    device, send = tensor.device, _send_device(world)
    with world.collective("gathering rows from every rank"):
        if lengths is None:
            count = torch.tensor([len(tensor)], device=send)
            counts = [torch.empty_like(count) for _ in range(world.size)]
            dist.all_gather(counts, count)
            lengths = [int(c) for c in counts]
        padded = torch.zeros((max(lengths), *tensor.shape[1:]), dtype=tensor.dtype, device=send)
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(world.size)]
        dist.all_gather([_wire(part) for part in parts], _wire(padded))
    return [part[:length].to(device) for part, length in zip(parts, lengths)]


# -- gradients ------------------------------------------------------------------------------
NO_GRADIENT, DENSE, SPARSE = 0, 1, 2


class GradientSync:
    """After each rank's backward of ``loss / N``: the summed gradients on every rank, dense.

    ``densifier`` (:class:`pipeline.training.GradientDensifier`) holds the optimizer's
    parameters and turns sparse gradients dense (``densify(parameter, rows, values)``). One
    process: just that. ``N`` ranks, per step: one all-gather of each rank's gradient kinds,
    sparse row counts and loss; one all-reduce of the dense gradients (per dtype); for sparse
    gradients (embedding tables) whose touched rows are fewer than the table's over all
    ranks, an all-gather of the rows and values, densified in rank order on every rank (the
    same sums in the same order everywhere: the ranks' parameters stay bit-identical).
    """

    def __init__(self, densifier: Any, world: World):
        self.densifier, self.world = densifier, world
        self.parameters: list[torch.Tensor] = densifier.parameters

    def __call__(self, loss_value: float) -> float:
        """Synchronise the gradients; return the loss summed over ranks (each passes ``L_r / N``
        for a mean, or ``L`` with one process)."""
        if self.world.size == 1:
            self.densifier()
            return loss_value
        world, parameters = self.world, self.parameters
        local = torch.zeros(2 * len(parameters) + 1, dtype=torch.float64)
        for i, parameter in enumerate(parameters):
            gradient = parameter.grad
            if gradient is not None:
                local[2 * i] = SPARSE if gradient.is_sparse else DENSE
                local[2 * i + 1] = gradient._nnz() if gradient.is_sparse else 0
        local[-1] = loss_value
        local = local.to(_send_device(world))
        gathered = [torch.empty_like(local) for _ in range(world.size)]
        with world.collective("exchanging gradient shapes"):
            dist.all_gather(gathered, local)
        everyone = torch.stack(gathered).cpu()  # [N, 2p + 1]: (kind, sparse rows) per parameter, loss
        kinds, rows = everyone[:, 0:-1:2].amax(0), everyone[:, 1:-1:2]  # [p], [N, p]
        sparse = [i for i, p in enumerate(parameters)
                  if kinds[i] == SPARSE and (everyone[:, 2 * i] != DENSE).all() and world.size * rows[:, i].max() < len(p)]
        dense = [i for i in range(len(parameters)) if kinds[i] != NO_GRADIENT and i not in sparse]
        self._all_reduce_dense([parameters[i] for i in dense])
        for dtype in dict.fromkeys(parameters[i].dtype for i in sparse):
            members = [i for i in sparse if parameters[i].dtype == dtype]
            self._gather_sparse([parameters[i] for i in members], rows[:, members].long())
        return float(everyone[:, -1].sum())

    def _all_reduce_dense(self, parameters: list[torch.Tensor]) -> None:
        """Sum the dense gradients (a rank without one contributes zeros) over ranks, one bucket per dtype."""
        for parameter in parameters:
            gradient = parameter.grad
            if gradient is None:
                parameter.grad = torch.zeros_like(parameter)
            elif gradient.is_sparse:
                self.densifier.densify(parameter, gradient._indices()[0], gradient._values())
        for dtype in dict.fromkeys(p.dtype for p in parameters):
            members = [p for p in parameters if p.dtype == dtype]
            bucket = torch.cat([_wire(p.grad).reshape(-1) for p in members]).to(_send_device(self.world))
            with self.world.collective("summing gradients"):
                dist.all_reduce(bucket)
            offset = 0
            for p in members:
                flat = _wire(p.grad).reshape(-1)
                flat.copy_(bucket[offset : offset + flat.numel()])
                offset += flat.numel()

    def _gather_sparse(self, parameters: list[torch.Tensor], counts: torch.Tensor) -> None:
        """Gather every rank's touched rows of ``parameters`` (``counts [N, k]`` rows per rank and
        parameter; all of one dtype) and densify them in rank order. One collective: each rank
        sends its row ids (int64) and values as one byte string."""
        dtype, widths = parameters[0].dtype, [p[0].numel() for p in parameters]
        indices = [p.new_empty(0, dtype=torch.long) if p.grad is None else p.grad._indices()[0] for p in parameters]
        values = [p.new_empty(0) if p.grad is None else p.grad._values().reshape(-1) for p in parameters]
        payload = torch.cat([part.contiguous().view(torch.uint8) for part in (*indices, *values)])
        rows_per_rank = counts.sum(1).tolist()  # [N]
        value_bytes = [sum(int(c) * w for c, w in zip(row, widths)) * parameters[0].element_size() for row in counts]
        parts = all_gather_rows(self.world, payload, [8 * rows + size for rows, size in zip(rows_per_rank, value_bytes)])
        ids, vals = [], []
        for rank, part in enumerate(parts):  # each rank's rows and values, split by parameter
            ids.append(part[: 8 * rows_per_rank[rank]].view(torch.long).split(counts[rank].tolist()))
            vals.append(part[8 * rows_per_rank[rank] :].view(dtype).split([int(c) * w for c, w in zip(counts[rank], widths)]))
        for k, parameter in enumerate(parameters):
            rows = torch.cat([ids[rank][k] for rank in range(self.world.size)])
            row_values = torch.cat([vals[rank][k] for rank in range(self.world.size)]).view(-1, *parameter.shape[1:])
            self.densifier.densify(parameter, rows, row_values)
