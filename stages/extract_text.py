"""`extract-text`: SBERT features of each entity's sentences -> features/<ds>/text/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages import DATA_OPTION, PARAMS_OPTION, app, convert_section, load_params, resolve_dataset

TEXT_KEYS = {"model": str, "max_sentences": int, "batch_size": int, "dtype": str, "seed": int}


def text_settings(section: dict):
    """The ``extract_text`` params section as :class:`~pipeline.features.text.TextSettings`."""
    from pipeline.features.text import TextSettings

    return TextSettings(**convert_section("extract_text", section, TEXT_KEYS))


@app.command("extract-text")
def extract_text_command(
    dataset: str = typer.Argument(..., help="mkg-w, mkg-y or db15k"),
    data: Optional[Path] = DATA_OPTION,
    media: Optional[Path] = typer.Option(None, help="Align output (default: media/<dataset>/entities_media.parquet)."),
    out: Optional[Path] = typer.Option(None, help="Cache directory (default: features/<dataset>/text)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """SBERT embedding of each entity's sentences, zero-padded to [S, D]; incremental cache."""
    from pipeline.features.inputs import count_entities, read_entity_media
    from pipeline.features.text import extract_text

    dataset, data = resolve_dataset(dataset, params, data)
    settings = text_settings(load_params(params, "extract_text"))
    num_entities = count_entities(data / "entities.parquet")
    entity_media = read_entity_media(media or Path("media") / dataset / "entities_media.parquet", num_entities)
    out = out or Path("features") / dataset / "text"
    report = extract_text(entity_media.sentences, out, settings)
    if report.damaged:
        typer.echo(f"extract-text: damaged cache: {report.damaged}", err=True)
    typer.echo(f"extract-text: {report.num_entities} entities, {report.encoded} recomputed, {report.reused} reused -> {out}")
