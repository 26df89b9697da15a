"""Prompt sets: the prompts an evaluation draws, from a file, as I2P and the attack benchmarks
publish them.

A CSV file with a `prompt` column and optionally `seed` (the image's noise), `guidance` (its
classifier-free guidance scale) and `concept` (the concept the prompt asks for); or plain text,
one prompt a line. Each row draws one image, seeded by its own seed or else by (the run's seed,
its row index), so a rerun draws the same images whatever the batch size.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, reading_text, shown


@dataclass(frozen=True)  # hashable: rows key the cache of a base model's evaluation images
class PromptRow:
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    concept: str | None = None


def _number(path: Path, line: int, column: str, text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or (kind is int and not 0 <= value < 2**31):
        raise UserError(f"{path} line {line}: {column} {shown(text)} is not {'a whole number from 0' if kind is int else 'a finite number'}")
    return value


def read_prompt_set(path: str | Path) -> list[PromptRow]:
    """The rows of a prompt set file (.csv with a header, or text); a one-line UserError for a
    file that cannot be read, a CSV without a prompt column, or a seed or guidance that is not a number."""
    path = Path(path)
    with reading_text(path):
        text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() != ".csv":
        rows = [PromptRow(line.strip()) for line in text.splitlines() if line.strip()]
    else:
        try:
            reader = csv.DictReader(text.splitlines())
            columns = reader.fieldnames or []
            if "prompt" not in columns:
                raise UserError(f"{path} has no 'prompt' column (its columns: {', '.join(columns) or 'none'})")
            rows = []
            for line, record in enumerate(reader, start=2):
                prompt = (record.get("prompt") or "").strip()
                if not prompt:
                    continue
                seed, guidance, concept = ((record.get(c) or "").strip() for c in ("seed", "guidance", "concept"))
                rows.append(PromptRow(
                    prompt,
                    _number(path, line, "seed", seed, int) if seed else None,
                    _number(path, line, "guidance", guidance, float) if guidance else None,
                    concept or None,
                ))
        except csv.Error as error:
            raise UserError(f"{path} is not a valid CSV file ({error})") from None
    if not rows:
        raise UserError(f"{path} has no prompts")
    return rows
