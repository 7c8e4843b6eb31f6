"""`extract-visual`: BEiT features of each entity's aligned image(s) -> features/<ds>/visual/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages import DATA_OPTION, PARAMS_OPTION, app, convert_section, load_params, resolve_dataset


def _sizes(value) -> tuple[int, ...]:
    return tuple(int(size) for size in value)


VISUAL_KEYS = {"model": str, "hidden_shape": _sizes, "kernel": _sizes, "stride": _sizes, "image_mode": str,
               "batch_size": int, "dtype": str, "seed": int, "checkpoint_seconds": float}


def visual_settings(section: dict):
    """The ``extract_visual`` params section as :class:`~pipeline.features.visual.VisualSettings`."""
    from pipeline.features.visual import VisualSettings

    return VisualSettings(**convert_section("extract_visual", section, VISUAL_KEYS))


@app.command("extract-visual")
def extract_visual_command(
    dataset: str = typer.Argument(..., help="mkg-w, mkg-y or db15k"),
    data: Optional[Path] = DATA_OPTION,
    media: Optional[Path] = typer.Option(None, help="Align output (default: media/<dataset>/entities_media.parquet)."),
    images: Optional[Path] = typer.Option(None, help="Content-addressed image store (default: crawl/<dataset>/images)."),
    out: Optional[Path] = typer.Option(None, help="Cache directory (default: features/<dataset>/visual)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """BEiT last hidden state of each entity's image, 2-D average pooled; incremental cache."""
    from pipeline.features.inputs import count_entities, read_entity_media
    from pipeline.features.visual import extract_visual

    dataset, data = resolve_dataset(dataset, params, data)
    settings = visual_settings(load_params(params, "extract_visual"))
    num_entities = count_entities(data / "entities.parquet")
    entity_media = read_entity_media(media or Path("media") / dataset / "entities_media.parquet", num_entities)
    out = out or Path("features") / dataset / "visual"
    report = extract_visual(entity_media.image_hashes, images or Path("crawl") / dataset / "images", out, settings)
    if report.damaged:
        typer.echo(f"extract-visual: damaged cache: {report.damaged}", err=True)
    typer.echo(f"extract-visual: {report.num_entities} entities, {report.encoded} recomputed, {report.reused} reused -> {out}")
