"""Errors the pipeline raises for bad input. Each message names what is wrong and where."""
from __future__ import annotations

from pathlib import Path


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
