"""Folders of the world's procedural images of a concept, with their exact masks: the input that
methods learning from images read (`fasterase.concept_images`), made without any model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from . import world


def write_concept_folder(concept: str, images: str | Path, masks: str | Path | None = None, count: int = 4, seed: int = 0) -> list[Path]:
    """Renders `count` scenes of a world concept into `images` as PNGs (concept-00.png, ...) and,
    when `masks` is given, their masks under the same names (white: the concept; for a style, the
    background that shows it). Folders are created; returns the image paths."""
    family = world.concept_family(concept)
    if family is None:
        raise UserError(f"the built-in world has no concept {concept!r}")
    if count < 1:
        raise UserError(f"count must be at least 1, not {count}")
    rng = np.random.default_rng(seed)
    folders = [Path(images)] + ([Path(masks)] if masks is not None else [])
    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        return [_write_scene(concept, family, i, rng, folders) for i in range(count)]
    except OSError as error:
        raise UserError(f"cannot write {error.filename or folders[0]}: {error.strerror or error}") from None


def _write_scene(concept: str, family: str, i: int, rng: np.random.Generator, folders: list[Path]) -> Path:
    """Scene i: its image into folders[0] and, when there is a mask folder, its mask into folders[1]."""
    if family in ("shape", "emblem"):
        scene = world.random_scene(rng, obj=concept)
    else:  # a colour or a style, shown on the shapes in turn
        scene = world.random_scene(rng, obj=world.SHAPES[i % len(world.SHAPES)])
        if family == "colour":
            scene = dataclasses.replace(scene, colour=concept)
        else:
            scene = dataclasses.replace(scene, style=world.style_of(concept))
    image, inside = world.render(scene)
    mask = ~inside if family == "style" else inside
    name = f"{concept}-{i:02d}.png"
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folders[0] / name)
    if len(folders) > 1:
        Image.fromarray(mask.astype(np.uint8) * 255).save(folders[1] / name)
    return folders[0] / name
