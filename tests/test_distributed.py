"""Data-parallel training (pipeline.distributed): two gloo ranks, spawned by the tests as
torchrun would (tests/distributed_worker.py), against one process given the same global batch;
sharded evaluation against one process; a rank that dies or hangs; the stage under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import distributed_worker as worker
from pipeline.distributed import World, rank_seed, shard
from pipeline.errors import ConfigError
from pipeline.evaluation import evaluate
from pipeline.training import BatchStream, GradientDensifier, build_optimizer, read_checkpoint, step_loss
from stages.launch import free_port, rank_environment
from stages.train import check_train_section

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(worker.__file__)


def start_ranks(arguments: list[str], size: int = 2) -> list[subprocess.Popen]:
    """``size`` worker processes with torchrun's environment, one thread each."""
    port = free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), *arguments], env=rank_environment(rank, size, port), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(size)]


def finish(processes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process; kills them all if one outlives ``timeout`` seconds."""
    results = []
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=timeout)
            results.append((process.returncode, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def run_ranks(arguments: list[str]) -> None:
    for code, stderr in finish(start_ranks(arguments)):
        assert code == 0, stderr


def reference(sampler_name: str, steps: int, size: int = 2) -> dict[int, tuple[dict, dict]]:
    """One process given each step's global batch: the union of the ``size`` shards, each shard's
    negatives drawn with its rank's generator, the mean of the shards' losses back-propagated,
    dense gradients, one Adam step. ``{step: (model state, sampler parameters)}`` after every step."""
    graph, model, sampler = worker.build(sampler_name)
    settings = worker.SETTINGS
    optimizer = build_optimizer(model, sampler, settings)
    densify = GradientDensifier(optimizer)
    batches = BatchStream(len(graph.train), settings.batch_size, settings.seed)
    generators = [torch.Generator().manual_seed(rank_seed(worker.SAMPLER_SEED, rank)) for rank in range(size)]
    loss_fn, snapshots = worker.loss_function(), {}
    for step in range(steps):
        rows = batches.next()
        optimizer.zero_grad(set_to_none=True)
        for rank in range(size):
            sampler.generator = generators[rank]
            positives = graph.train[rows[shard(World(rank, size), settings.batch_size)]]
            (step_loss(model, sampler, loss_fn, positives, step) / size).backward()
        densify()
        optimizer.step()
        snapshots[step + 1] = ({k: v.clone() for k, v in model.state_dict().items()},
                               {k: v.detach().clone() for k, v in sampler.named_parameters()})
    return snapshots


def assert_same_parameters(checkpoint: dict, expected: tuple[dict, dict]) -> None:
    model_state, sampler_parameters = expected
    for name, value in model_state.items():
        torch.testing.assert_close(checkpoint["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in sampler_parameters.items():
        torch.testing.assert_close(checkpoint["sampler"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sampler_name", ["uniform", "mmrns"])
def test_two_ranks_equal_one_process_on_the_global_batch_and_resume(tmp_path, sampler_name):
    """2 gloo ranks x 8 rows vs one process on the 16 rows: same parameters (model and
    sampler) after 3 steps, and after 3 more steps resumed from rank 0's last.pt (which
    restores rank 1's own generator and sampler state)."""
    expected = reference(sampler_name, 6)
    run_ranks(["train", sampler_name, "3", str(tmp_path)])
    first = read_checkpoint(tmp_path / "last.pt")
    assert first["step"] == 3 and len(first["ranks"]) == 1 and "generator" in first["ranks"][0]["sampler"]["_extra_state"]
    assert not torch.equal(first["ranks"][0]["sampler"]["_extra_state"]["generator"], first["sampler"]["_extra_state"]["generator"])
    assert_same_parameters(first, expected[3])
    assert (tmp_path / "replicas_equal").read_text() == "True"  # the ranks' parameters are bit-identical
    if sampler_name == "mmrns":  # the sampler's own parameters were trained and all-reduced
        initial = dict(worker.build("mmrns")[2].named_parameters())
        assert any(not torch.equal(first["sampler"][name], initial[name]) for name in expected[3][1])

    run_ranks(["train", sampler_name, "6", str(tmp_path)])
    second = read_checkpoint(tmp_path / "last.pt")
    assert second["step"] == 6 and json.loads(second["fingerprint"])["world_size"] == 2
    assert_same_parameters(second, expected[6])
    assert [row["step"] for row in second["loop"]["history"]] == [3, 6]


def test_sharded_evaluation_equals_one_process_exactly(tmp_path):
    run_ranks(["evaluate", str(tmp_path)])
    sharded = torch.load(tmp_path / "metrics.pt", weights_only=True)
    graph, model, _ = worker.build("uniform")
    for (split, batch_size), metrics in sharded.items():
        assert metrics == evaluate(model, graph, split, batch_size=batch_size), (split, batch_size)
    assert len(sharded) == 4


@pytest.mark.parametrize("failure", ["die", "hang"])
def test_a_failed_rank_ends_the_run_with_a_clear_error(tmp_path, failure):
    """Rank 1 exits (die) or stops answering (hang) at step 2: rank 0 fails with one error line
    naming itself and train.dist_timeout, within the timeout, instead of waiting forever."""
    started = time.monotonic()
    processes = start_ranks([failure, str(tmp_path)])
    (code, stderr), = finish(processes[:1], timeout=120)
    elapsed = time.monotonic() - started
    for process in processes[1:]:  # the hanging rank is ended here
        process.kill()
        process.communicate()
    print(stderr)
    assert code == 2, stderr
    assert "error: rank 0 of 2:" in stderr and "another rank died or did not answer within train.dist_timeout" in stderr
    assert elapsed < 100
    assert not (tmp_path / "best.pt").exists()  # no validation ran (it is at step 3)


def test_global_batch_must_divide_among_ranks():
    from test_training import params_file

    assert shard(World(1, 4), 16) == slice(4, 8)
    with pytest.raises(ConfigError, match=r"train.batch_size \(18\) must be a multiple of the number of processes \(4\)"):
        shard(World(0, 4), 18)
    with pytest.raises(ConfigError, match=r"train.batch_size \(400\) must be a multiple of train.nproc \(3\)"):
        check_train_section(dict(params_file()["train"], nproc=3))
    with pytest.raises(ConfigError, match="train.dist_timeout must be a positive number, got 0"):
        check_train_section(dict(params_file()["train"], dist_timeout=0))
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, rank) for rank in range(4)}) == 4


def test_train_stage_relaunches_itself_under_torchrun(tmp_path):
    """train.nproc 2: `python -m stages train` runs 2 ranks through torchrun; rank 0 writes once."""
    from test_training import params_file, write_canonical

    write_canonical(tmp_path / "data", worker.small_graph())
    params = params_file()
    params["train"].update({"dim": 8, "batch_size": 16, "steps": 4, "valid_every": 2, "log_every": 2, "device": "cpu",
                            "nproc": 2, "threads": 1, "dist_timeout": 60})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "stages", "train", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "models"),
               "--metrics", str(tmp_path / "train.json"), "--report", str(tmp_path / "report.json"), "--plots", str(tmp_path / "plots"),
               "--params", str(tmp_path / "params.yaml")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert "train.nproc 2: -m torch.distributed.run --standalone --nproc_per_node=2" in result.stderr
    assert result.stdout.count("train: TransE + uniform, 4 steps") == 1  # rank 0 alone reports
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 4
    checkpoint = read_checkpoint(tmp_path / "models" / "last.pt")
    assert json.loads(checkpoint["fingerprint"])["world_size"] == 2 and len(checkpoint["ranks"]) == 1
