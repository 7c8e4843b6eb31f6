"""Damaged checkpoints and feature caches as a user meets them: train sets a damaged last.pt or
best.pt aside (and says `resuming from step N` when it resumes); evaluate, predict and export
refuse an empty, truncated or foreign checkpoint in one line (exit 2, no traceback); train
names a damaged feature cache and the command that rebuilds it."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.training import read_checkpoint
from test_stages_cli import _stages
from test_training import Run, params_file, small_graph, write_canonical


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "empty": lambda path: path.write_bytes(b""),
    "truncated": truncate,
    "junk": lambda path: path.write_bytes(b"this is not a checkpoint\n"),
    "a tensor": lambda path: torch.save(torch.zeros(3), path),
}


def steps_of(result) -> list[int]:
    return [row["step"] for row in result.history]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_last_is_set_aside_and_training_starts_fresh(tmp_path, capsys, how):
    graph = small_graph()
    _, reference = Run(graph, steps=20)(tmp_path / "reference")
    Run(graph, steps=20)(tmp_path / "run")
    DAMAGES[how](tmp_path / "run" / "last.pt")
    damaged = (tmp_path / "run" / "last.pt").read_bytes()
    best = (tmp_path / "run" / "best.pt").read_bytes()
    capsys.readouterr()
    _, result = Run(graph, steps=20)(tmp_path / "run")
    said = capsys.readouterr().err
    assert "last.pt" in said and "set aside as last.pt.corrupt-1" in said and "training starts fresh" in said
    assert "resuming" not in said and "Traceback" not in said
    assert (tmp_path / "run" / "last.pt.corrupt-1").read_bytes() == damaged  # nothing lost
    assert (tmp_path / "run" / "best.pt.previous-1").read_bytes() == best
    assert result.history == reference.history  # a fresh run from the same seeds
    assert read_checkpoint(tmp_path / "run" / "last.pt")["step"] == 20


def test_resume_says_its_step(tmp_path, capsys):
    graph = small_graph()
    Run(graph, steps=20)(tmp_path)
    capsys.readouterr()
    _, result = Run(graph, steps=30)(tmp_path)
    assert f"resuming from step 20 ({tmp_path / 'last.pt'})" in capsys.readouterr().err
    assert steps_of(result) == [10, 20, 30]


@pytest.mark.parametrize("how", ["truncated", "another run's"])
def test_damaged_best_is_rewritten_when_last_holds_the_best_model(tmp_path, capsys, how):
    graph = small_graph()
    rising = iter([0.1, 0.2])
    Run(graph, steps=20)(tmp_path / "run", validate=lambda m: {"mrr": next(rising), "hits@10": 0.0})
    if how == "truncated":
        truncate(tmp_path / "run" / "best.pt")
    else:
        other = Run(graph, steps=10)
        other.fingerprint = {**other.fingerprint, "lr": "other"}
        other(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "best.pt", tmp_path / "run" / "best.pt")
    capsys.readouterr()
    Run(graph, steps=20)(tmp_path / "run", validate=lambda m: pytest.fail("a finished run validates nothing"))
    said = capsys.readouterr().err
    assert "set aside as best.pt.corrupt-1" in said and "rewritten from last.pt (step 20, the best model)" in said
    assert "resuming from step 20" in said
    best = read_checkpoint(tmp_path / "run" / "best.pt")
    assert best["step"] == 20 and best["metrics"]["mrr"] == 0.2
    assert best["fingerprint"] == read_checkpoint(tmp_path / "run" / "last.pt")["fingerprint"]


def test_damaged_best_of_an_earlier_step_restarts_the_run(tmp_path, capsys):
    graph = small_graph()
    _, reference = Run(graph, steps=20)(tmp_path / "reference")
    falling = iter([0.5, 0.1])
    Run(graph, steps=20)(tmp_path / "run", validate=lambda m: {"mrr": next(falling), "hits@10": 0.0})
    truncate(tmp_path / "run" / "best.pt")
    capsys.readouterr()
    _, result = Run(graph, steps=20)(tmp_path / "run")
    said = capsys.readouterr().err
    assert "last.pt (step 20) does not hold the best model (step 10)" in said and "last.pt.without-best-1" in said
    assert (tmp_path / "run" / "best.pt.corrupt-1").is_file() and (tmp_path / "run" / "last.pt.without-best-1").is_file()
    assert result.history == reference.history and read_checkpoint(tmp_path / "run" / "best.pt")["step"] == result.best["step"]


# -- the commands ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A directory with params.yaml, data/tiny (30 entities), data/other (31 entities) and
    models/tiny/{last,best}.pt written by the real train command."""
    root = tmp_path_factory.mktemp("trained")
    write_canonical(root / "data" / "tiny", small_graph())
    other = small_graph(1)
    write_canonical(root / "data" / "other", dataclasses.replace(other, num_entities=31))
    params = params_file()
    params["train"].update({"dim": 8, "batch_size": 16, "steps": 20, "valid_every": 10, "log_every": 5, "device": "cpu", "threads": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    done = _stages("train", "tiny", "--data", "data/tiny", cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def one_line_error(done, *fragments: str) -> str:
    """The command's one error line (exit 2, no traceback), checked to contain ``fragments``."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


COMMANDS = {
    "evaluate": ["evaluate", "tiny"],
    "predict": ["predict", "tiny", "--head", "entity 1", "--relation", "relation 0"],
    "export": ["export", "tiny", "--out", "export"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_damaged_best_is_one_line_naming_file_and_fix(trained, tmp_path, command, how):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    DAMAGES[how](tmp_path / "models" / "tiny" / "best.pt")
    done = _stages(*COMMANDS[command], "--data", "data/tiny", "--checkpoint", "models/tiny/best.pt", cwd=tmp_path)
    line = one_line_error(done, "models/tiny/best.pt: not a readable checkpoint", "python -m stages train")
    if command == "evaluate":
        assert "python -m stages train tiny" in line


def test_checkpoint_of_another_graph_is_one_line(trained):
    done = _stages("evaluate", "other", "--data", "data/other", "--checkpoint", "models/tiny/best.pt", cwd=trained)
    one_line_error(done, "models/tiny/best.pt: trained on another graph (30 entities", "this one: 31,", "python -m stages train other")


def test_train_command_sets_a_damaged_last_aside(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    truncate(tmp_path / "models" / "tiny" / "last.pt")
    done = _stages("train", "tiny", "--data", "data/tiny", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "set aside as last.pt.corrupt-1" in done.stderr and (tmp_path / "models" / "tiny" / "last.pt.corrupt-1").is_file()
    again = _stages("train", "tiny", "--data", "data/tiny", cwd=tmp_path)
    assert again.returncode == 0 and "resuming from step 20" in again.stderr, again.stderr


@pytest.mark.parametrize("name", ["features.npy", "meta.json", "index.parquet"])
def test_train_names_a_damaged_feature_cache_and_its_repair(trained, tmp_path, name):
    from pipeline.features.cache import EncodedBatch, update_cache

    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    cache = tmp_path / "features" / "tiny" / "text"
    update_cache(cache, ["k"] * 30, {"model": "m"}, (4, 384), "float16", lambda todo: iter([EncodedBatch(
        todo, torch.ones(len(todo), 4, 384).numpy(), torch.ones(len(todo), dtype=torch.bool).numpy(),
        torch.ones(len(todo), dtype=torch.int32).numpy(), [None] * len(todo), torch.ones(len(todo), dtype=torch.bool).numpy())]))
    truncate(cache / name)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["sampler"]["name"] = "mmrns"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = _stages("train", "tiny", "--data", "data/tiny", cwd=tmp_path)
    one_line_error(done, f"features/tiny/text/{name}: ", "rebuild it: python -m stages extract-text tiny")


def test_train_command_sets_another_datasets_last_aside(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    (tmp_path / "models" / "other").mkdir()
    shutil.copy(tmp_path / "models" / "tiny" / "last.pt", tmp_path / "models" / "other" / "last.pt")
    done = _stages("train", "other", "--data", "data/other", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "models/other/last.pt: a checkpoint of another graph (30 entities, 3 relations): set aside as last.pt.foreign-1" in done.stderr
    assert read_checkpoint(tmp_path / "models" / "other" / "last.pt.foreign-1")["step"] == 20
    assert read_checkpoint(tmp_path / "models" / "other" / "last.pt")["model"]["entities.weight"].shape[0] == 31
