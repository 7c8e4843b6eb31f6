"""Errors the pipeline raises for bad input. Each message names what is wrong and where."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable


class PipelineError(Exception):
    """Base class: an error caused by input or configuration, reported without a traceback."""


class DataError(PipelineError):
    """Bad content in an input file: names the file, and the line where there is one."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None, content: str | None = None):
        self.path, self.problem, self.line, self.content = str(path), problem, line, content
        where = f"{path}:{line}" if line is not None else str(path)
        text = f"{where}: {problem}"
        if content is not None:
            text += f" (line content: {content!r})"
        super().__init__(text)


class ConfigError(PipelineError):
    """A parameter with the wrong type or range, or an unknown name: names the key."""


def unknown_key(where: str, key: str, valid: Iterable[str]) -> ConfigError:
    """A ConfigError for the unknown key ``where.key`` naming the closest valid key (difflib)."""
    valid = sorted(str(name) for name in valid)
    name = f"{where}.{key}" if where else str(key)
    closest = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"did you mean {(where + '.' if where else '') + closest[0]!r}? " if closest else ""
    return ConfigError(f"unknown key {name!r}; {hint}valid: {', '.join(valid)}")
