"""Thin typer commands, one per DVC stage. They parse arguments, read their section of
``params.yaml``, resolve file locations, and call into :mod:`pipeline`."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import typer
import yaml

from pipeline.errors import ConfigError

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


@contextlib.contextmanager
def section_errors(section: str) -> Iterator[None]:
    """Turn a missing key or a value of the wrong type met while reading the params section
    ``section`` into a ConfigError that names the section."""
    try:
        yield
    except KeyError as error:
        raise ConfigError(f"{section}: missing key {error.args[0]!r}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{section}: bad value: {error}") from None


def load_params(path: Path, section: str | None = None) -> Any:
    """The whole params file, or one top-level section of it."""
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    params = yaml.safe_load(path.read_text()) or {}
    if section is None:
        return params
    if section not in params:
        raise ConfigError(f"{path}: missing section {section!r}")
    return params[section]
