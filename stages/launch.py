"""Starting a stage on several processes: under torchrun, or re-launched through it.

``torchrun --nproc_per_node N [--nnodes M --node_rank K --rdzv_endpoint HOST:PORT] -m stages
train ...`` starts ``N x M`` ranks, each running the stage with torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a stage started
by hand (or by ``dvc repro``) with ``train.nproc > 1`` re-launches itself that way on this
machine (:func:`relaunch`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

REPOSITORY = Path(__file__).resolve().parent.parent


def under_torchrun() -> bool:
    """True in a process started by torchrun (it sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def stage_arguments(command: str, positional: list[Any], options: dict[str, Any]) -> list[str]:
    """``[command, *positional, --name value ...]`` for the values that are not None."""
    arguments = [command, *(str(value) for value in positional if value is not None)]
    for name, value in options.items():
        if value is not None:
            arguments += [f"--{name}", str(value)]
    return arguments


def relaunch(nproc: int, arguments: list[str], threads: int) -> None:
    """Run ``python -m stages ARGUMENTS`` as ``nproc`` ranks under torchrun on this machine
    (``--standalone``: a free local port) and wait; a PipelineError when a rank failed (its
    own error line is printed above by torchrun). ``threads``: torch threads per rank (0: the
    cores shared out)."""
    environment = dict(os.environ)
    environment["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "stages", *arguments]
    print(f"{arguments[0]}: train.nproc {nproc}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    code = subprocess.run(command, env=environment).returncode
    if code:
        raise PipelineError(f"{arguments[0]} on {nproc} processes failed (torchrun exit {code}); the failing rank's error is above")


def join_world(device: Any, timeout: float):
    """This process's :class:`pipeline.distributed.World`: from torchrun's environment, else one process."""
    from pipeline.distributed import join

    if not under_torchrun():
        return join(0, 1, 0, device, timeout)
    return join(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), device, timeout)


def free_port() -> int:
    """A TCP port free on this machine now (for MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_environment(rank: int, size: int, port: int, threads: int = 1) -> dict[str, str]:
    """This process's environment plus torchrun's variables for rank ``rank`` of ``size`` on this
    machine (``MASTER_PORT`` ``port``), ``threads`` OpenMP threads, the repository importable: for
    tests and benchmarks that start their ranks themselves."""
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])))
