"""Thin typer commands, one per DVC stage. They parse arguments, read their section of
``params.yaml``, resolve file locations, and call into :mod:`pipeline`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import typer
import yaml

from pipeline.errors import ConfigError, unknown_key

app = typer.Typer(
    help="MMRNS pipeline stages. `dvc repro` runs them in order; each can also be run by hand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def pipeline_stages() -> None:
    """MMRNS pipeline stages (run in order by `dvc repro`)."""


PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="The params file to read.")
DATA_OPTION = typer.Option(None, "--data", help="Canonical dataset directory (default: data/<dataset>).")


def convert_section(section: str, values: Any, converters: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """The params section ``section`` with every key of ``converters`` converted by it; an
    unknown key, a missing key or a value that does not convert is a ConfigError naming
    ``section.key`` (and the value)."""
    check_keys(section, values, converters)
    converted = {}
    for key, convert in converters.items():
        if key not in values:
            raise ConfigError(f"{section}.{key} is missing")
        try:
            converted[key] = convert(values[key])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{section}.{key}: bad value {values[key]!r} ({error})") from None
    return converted


DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"  # <name>.yaml manifests (+ embedded copies)
# Top-level keys of params.yaml: `datasets` (what `dvc repro` runs) and one section per stage.
# A stage reading a new section adds it here; any other top-level key is an error.
PARAMS_SECTIONS = ("datasets", "download", "crawl", "align", "extract_visual", "extract_text", "train", "sampler", "evaluate")


def dataset_name(name: str) -> str:
    """``name`` as a known dataset (the stem of a ``datasets/*.yaml`` manifest), lower-cased."""
    valid = sorted(path.stem for path in DATASETS_DIR.glob("*.yaml"))
    if str(name).lower() not in valid:
        raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(valid)}")
    return str(name).lower()


def resolve_dataset(dataset: str | None, params: Path, data: Path | None) -> tuple[str, Path]:
    """The dataset's name (``dataset``, else the first of params.yaml ``datasets``) and its
    canonical directory (``data``, else ``data/<name>``, in which case the name must be known)."""
    if dataset is None:
        datasets = load_params(params, "datasets")
        if not isinstance(datasets, list) or not datasets:
            raise ConfigError(f"{params}: datasets must be a non-empty list of dataset names, got {datasets!r}")
        dataset = str(datasets[0])
    if data is not None:
        return dataset, data
    dataset = dataset_name(dataset)
    return dataset, Path("data") / dataset


def check_keys(section: str, values: Any, valid: Any) -> dict:
    """``values`` (the params section ``section``) if it is a mapping whose keys are all in
    ``valid``; else a ConfigError naming the unknown key and the closest valid one."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section or 'params'} must be a mapping, got {values!r}")
    for key in values:
        if key not in valid:
            raise unknown_key(section, key, valid)
    return values


def load_params(path: Path, section: str | None = None) -> Any:
    """The whole params file, or one top-level section of it. Unknown top-level keys are errors."""
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    try:
        check_keys("", params, PARAMS_SECTIONS)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if section is None:
        return params
    if section not in params:
        raise ConfigError(f"{path}: missing section {section!r}")
    return params[section]
