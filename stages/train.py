"""`train`: fit the KGC model of params.yaml `train` with the sampler of `sampler`.

Outputs: models/<ds>/last.pt (resume point), models/<ds>/best.pt (best VALID MRR),
metrics/<ds>/train.json (headline: steps, best step, train time), reports/<ds>/train.json
(model, sampler, best VALID metrics, early stop, speed), plots/<ds>/train_curve.csv (per
validation), plots/<ds>/train_loss.csv (per log window), plots/<ds>/train_curve.png. An existing last.pt with the same configuration is
resumed; a different configuration starts fresh; a damaged last.pt or best.pt is set aside
(see :func:`pipeline.training.resume_point`).
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.errors import ConfigError
from stages import DATA_OPTION, PARAMS_OPTION, app, check_keys, load_params, resolve_dataset
from stages.launch import join_world, relaunch, stage_arguments, under_torchrun

POSITIVE_INTEGERS = ("dim", "num_negatives", "batch_size", "steps", "valid_every", "patience", "eval_batch_size", "log_every", "nproc")
POSITIVE_FLOATS = ("lr", "sampler_lr", "adversarial_temperature", "dist_timeout")
#: Keys a params file may leave out (their defaults); they do not change what is computed, so
#: they stay out of the run's fingerprint (the number of ranks joins it in pipeline.training.fit).
OPTIONAL = {"nproc": 1, "dist_timeout": 600.0}
#: When a run stops, not what it computes: out of the fingerprint, so a run is extended or given
#: early stopping by changing them (pipeline.training.fit).
STOPPING = ("steps", "patience")
NON_NEGATIVE_FLOATS = ("gamma", "regularization")
BOOLEANS = ("self_adversarial", "subsampling")
OTHER_KEYS = ("model", "loss", "seed", "threads", "device")  # + an options mapping per model, named like it


def check_train_section(section: dict[str, Any]) -> dict[str, Any]:
    """Validate the ``train`` section: known keys, types and ranges (ConfigError naming the
    key), names."""
    from pipeline.losses import LOSSES
    from pipeline.models import MODELS
    from pipeline.training import resolve_device

    check_keys("train", section, POSITIVE_INTEGERS + POSITIVE_FLOATS + NON_NEGATIVE_FLOATS + BOOLEANS + OTHER_KEYS + tuple(MODELS.names()))
    section = {**OPTIONAL, **section}

    def value(key: str) -> Any:
        if key not in section:
            raise ConfigError(f"train.{key} is missing")
        return section[key]

    for key in POSITIVE_INTEGERS:
        if isinstance(value(key), bool) or not isinstance(value(key), int) or value(key) <= 0:
            raise ConfigError(f"train.{key} must be a positive integer, got {value(key)!r}")
    for key in POSITIVE_FLOATS + NON_NEGATIVE_FLOATS:
        number = value(key)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0 or (number == 0 and key in POSITIVE_FLOATS):
            kind = "a positive number" if key in POSITIVE_FLOATS else "a non-negative number"
            raise ConfigError(f"train.{key} must be {kind}, got {number!r}")
    for key in BOOLEANS:
        if not isinstance(value(key), bool):
            raise ConfigError(f"train.{key} must be true or false, got {value(key)!r}")
    for key in ("seed", "threads"):
        if isinstance(value(key), bool) or not isinstance(value(key), int) or value(key) < 0:
            raise ConfigError(f"train.{key} must be a non-negative integer, got {value(key)!r}")
    if value("batch_size") % value("nproc"):
        raise ConfigError(f"train.batch_size ({value('batch_size')}) must be a multiple of train.nproc ({value('nproc')})")
    MODELS.get(value("model"))
    LOSSES.get(value("loss"))
    resolve_device(value("device"))
    return section


def check_sampler_section(section: dict[str, Any]) -> dict[str, Any]:
    """Validate the top-level ``sampler`` section: ``name``, ``seed``, ``<name>:`` options."""
    from pipeline.samplers import SAMPLERS

    check_keys("sampler", section, ("name", "seed", *SAMPLERS.names()))
    if "name" not in section:
        raise ConfigError("sampler.name is missing")
    SAMPLERS.get(section["name"])
    seed = section.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"sampler.seed must be a non-negative integer, got {seed!r}")
    options = section.get(str(section["name"]).lower()) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"sampler.{section['name']} must be a mapping of options, got {options!r}")
    sampler_class = SAMPLERS.get(section["name"])
    if not hasattr(sampler_class, "from_params"):  # options are constructor keywords (model-aware samplers check their own)
        parameters = inspect.signature(sampler_class).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            check_keys(f"sampler.{str(section['name']).lower()}", options, [name for name in parameters if name not in ("graph", "num_negatives", "seed")])
    return section


@app.command()
def train(
    dataset: Optional[str] = typer.Argument(None, help="mkg-w, mkg-y or db15k (default: the first of params.yaml `datasets`)."),
    data: Optional[Path] = DATA_OPTION,
    out: Optional[Path] = typer.Option(None, help="Checkpoint directory (default: models/<dataset>)."),
    metrics: Optional[Path] = typer.Option(None, help="Headline metrics JSON (default: metrics/<dataset>/train.json)."),
    report: Optional[Path] = typer.Option(None, help="Run report JSON (default: reports/<dataset>/train.json)."),
    plots: Optional[Path] = typer.Option(None, help="Directory of train_curve.csv/png and train_loss.csv (default: plots/<dataset>)."),
    features: Optional[Path] = typer.Option(None, help="Feature caches text/ and visual/ for model-aware samplers (default: features/<dataset>)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Train a KGC model with a negative sampler; validate, keep the best, resume, stop early.

    ``train.nproc`` > 1: data-parallel on that many processes of this machine (re-launched
    under torchrun); under ``torchrun ... -m stages train`` (several machines too) every rank
    runs this command and rank 0 alone writes.
    """
    import torch

    from pipeline.distributed import leave
    from pipeline.training import resolve_device

    config = check_train_section(load_params(params, "train"))
    sampler_config = check_sampler_section(load_params(params, "sampler"))
    if config["nproc"] > 1 and not under_torchrun():  # the ranks get the arguments as given
        options = {"data": data, "out": out, "metrics": metrics, "report": report, "plots": plots, "features": features, "params": params}
        resolve_dataset(dataset, params, data)  # a bad name fails here, once
        return relaunch(config["nproc"], stage_arguments("train", [dataset], options), config["threads"])
    dataset, data = resolve_dataset(dataset, params, data)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    world = join_world(resolve_device(config["device"]), config["dist_timeout"])
    try:
        _train(dataset, data, out, metrics, report, plots, features, config, sampler_config, world)
    finally:
        leave(world)


def _train(dataset, data, out, metrics, report, plots, features, config, sampler_config, world) -> None:
    """The stage's work on one rank of ``world`` (rank 0 writes and prints)."""
    import torch

    from pipeline.atomic import write_json
    from pipeline.evaluation import evaluate
    from pipeline.features import load_features
    from pipeline.graph import load_graph
    from pipeline.losses import SubsamplingWeights, build_loss
    from pipeline.models import build_model
    from pipeline.plots import plot_training_curves, write_csv
    from pipeline.samplers import SAMPLERS, build_sampler
    from pipeline.training import TrainSettings, fit

    def say(message: str) -> None:
        if world.is_main:
            typer.echo(message, err=True)

    graph = load_graph(data)
    device = world.device

    model_name = config["model"]
    model_config = {
        "name": model_name,
        "shared": {key: config[key] for key in ("dim", "gamma", "regularization")},
        "options": config.get(model_name.lower()) or {},
    }
    torch.manual_seed(config["seed"])
    model = build_model(model_name, graph, model_config["shared"], model_config["options"]).to(device)
    sampler_name = sampler_config["name"]
    sampler_options = sampler_config.get(str(sampler_name).lower()) or {}
    caches: dict[str, Any] = {"text": None, "visual": None}
    if hasattr(SAMPLERS.get(sampler_name), "from_params"):  # model-aware samplers (MMRNS) read the feature caches
        features = features or Path("features") / str(dataset)
        caches = {kind: load_features(features / kind, f"rebuild it: python -m stages extract-{kind} {dataset}") if (features / kind).is_dir() else None
                  for kind in caches}
        for kind in (kind for kind, cache in caches.items() if cache is None):
            say(f"train: no {kind} feature cache at {features / kind}; the sampler sees that modality as missing")
    sampler = build_sampler(sampler_name, sampler_options, graph, model, config["num_negatives"], sampler_config["seed"], **caches)
    for modality in getattr(sampler, "absent_modalities", ()):
        say(f"train: no entity has the {modality} modality; the sampler does not use it")
    sampler = sampler.to(device)
    loss = build_loss(config["loss"], config["gamma"], config["adversarial_temperature"], config["self_adversarial"])
    subsampling = SubsamplingWeights(graph.train, graph.num_entities, graph.num_relations).to(device) if config["subsampling"] else None
    settings = TrainSettings(**{key: config[key] for key in ("steps", "batch_size", "lr", "sampler_lr", "valid_every", "patience", "seed", "log_every")})
    fingerprint = {
        "dataset": dataset,
        "graph": [graph.num_entities, graph.num_relations, len(graph.train), len(graph.valid)],
        "train": {key: value for key, value in config.items() if key not in STOPPING and key not in OPTIONAL},
        "sampler": {"name": sampler_name, "seed": sampler_config["seed"], "options": sampler_options},
    }

    def validate(trained) -> dict[str, float]:
        return evaluate(trained, graph, "valid", batch_size=config["eval_batch_size"], world=world)["realistic"]["both"]

    started = time.perf_counter()
    result = fit(model, sampler, loss, graph, settings, out or Path("models") / str(dataset), validate, model_config, fingerprint,
                 subsampling, world=world)
    if not world.is_main:
        return
    plots = plots or Path("plots") / dataset
    write_csv(plots / "train_curve.csv", result.history, ["step", "loss", "valid_mrr", "valid_hits@10"])
    write_csv(plots / "train_loss.csv", result.losses, ["step", "loss"])
    plot_training_curves(plots / "train_curve.png", result.history, result.losses)
    write_json(metrics or Path("metrics") / dataset / "train.json",
               {"steps": result.step, "best_step": result.best.get("step"), "valid_mrr": result.best.get("mrr"),
                "train_seconds": round(result.train_seconds, 2)})
    write_json(
        report or Path("reports") / dataset / "train.json",
        {
            "dataset": dataset,
            "model": model_name,
            "sampler": sampler_name,
            "best_step": result.best.get("step"),
            "valid": {key: value for key, value in result.best.items() if key != "step"},
            "steps": result.step,
            "stopped_early": result.stopped_early,
            "train_seconds": round(result.train_seconds, 2),
            "wall_seconds": round(result.wall_seconds, 2),
            "triples_per_second": round(result.triples_per_second, 1),
            "processes": world.size,
        },
    )
    typer.echo(
        f"train: {model_name} + {sampler_name}, {result.step} steps, best valid MRR {result.best.get('mrr', float('nan')):.4f} "
        f"at step {result.best.get('step')}, {result.triples_per_second:.0f} triples/s, "
        f"this session {time.perf_counter() - started:.0f} s"
    )
