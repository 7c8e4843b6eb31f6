"""`python -m stages COMMAND`: run one pipeline stage. Input errors print one line and exit 2."""
import sys

import typer

from pipeline.errors import PipelineError
from stages import app
from stages import download  # noqa: F401  (each import registers its command)
from stages import crawl  # noqa: F401
from stages import align  # noqa: F401
from stages import extract_text  # noqa: F401
from stages import extract_visual  # noqa: F401
from stages import train  # noqa: F401
from stages import evaluate  # noqa: F401
from stages import report  # noqa: F401  (table2, report)
from stages import predict  # noqa: F401
from stages import export  # noqa: F401
from stages import inspection  # noqa: F401  (inspect)
from stages import figures  # noqa: F401  (figures-queue, figures)


def main() -> None:
    try:
        app()
    except PipelineError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


main()
