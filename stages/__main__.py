"""`python -m stages COMMAND`: run one pipeline stage. Input errors print one line and exit 2."""
import sys

import typer

from pipeline.errors import PipelineError
from stages import app
from stages import download  # noqa: F401  (each import registers its command)


def main() -> None:
    try:
        app()
    except PipelineError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


main()
