"""Image grids, and writing evaluation outputs (grids, reports) whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError


def grid_image(rows: list[np.ndarray], labels: list[str] | None = None, scale: int = 4, gap: int = 2) -> Image.Image:
    """rows: each (K, H, W, 3) in [0, 1]; one row of images per entry, an optional label at its left."""
    h, w = rows[0].shape[1:3]
    cell_h, cell_w = h * scale, w * scale
    label_w = 8 * max((len(s) for s in labels), default=0) + 8 if labels else 0
    cols = max(r.shape[0] for r in rows)
    canvas = Image.new("RGB", (label_w + cols * (cell_w + gap), len(rows) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = i * (cell_h + gap)
        if labels:
            draw.text((4, y + cell_h // 2 - 6), labels[i], fill="black")
        for j, img in enumerate(row):
            tile = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell_w + gap), y))
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Writes a PNG whole or not at all (`write_atomically`)."""
    return write_atomically(path, lambda f: image.save(f, format="PNG"))


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Writes a file through a temporary file in the same folder, so no partial file is left."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # a full disk, say
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
