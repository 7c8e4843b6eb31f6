"""`extract-visual`: BEiT features of each entity's aligned image(s) -> features/<ds>/visual/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.features.inputs import count_entities, read_entity_media
from pipeline.features.visual import VisualSettings, extract_visual
from stages import DATA_OPTION, PARAMS_OPTION, app, load_params, section_errors


def visual_settings(section: dict) -> VisualSettings:
    """The ``extract_visual`` params section as :class:`VisualSettings`."""
    with section_errors("extract_visual"):
        return VisualSettings(
            model=str(section["model"]),
            hidden_shape=tuple(int(size) for size in section["hidden_shape"]),
            kernel=tuple(int(size) for size in section["kernel"]),
            stride=tuple(int(size) for size in section["stride"]),
            image_mode=str(section["image_mode"]),
            batch_size=int(section["batch_size"]),
            dtype=str(section["dtype"]),
            seed=int(section["seed"]),
            checkpoint_seconds=float(section["checkpoint_seconds"]),
        )


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
    settings = visual_settings(load_params(params, "extract_visual"))
    num_entities = count_entities((data or Path("data") / dataset) / "entities.parquet")
    entity_media = read_entity_media(media or Path("media") / dataset / "entities_media.parquet", num_entities)
    out = out or Path("features") / dataset / "visual"
    report = extract_visual(entity_media.image_hashes, images or Path("crawl") / dataset / "images", out, settings)
    typer.echo(f"extract-visual: {report.num_entities} entities, {report.encoded} recomputed, {report.reused} reused -> {out}")
