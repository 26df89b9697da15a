"""What evaluation needs to know about a model's world: prompts for a concept, and whether images
show it. The built-in world has an exact classifier; other models need a judge of their own."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Judge(Protocol):
    def check(self, concept: str) -> None:
        """Raises UserError when the judge cannot recognise `concept`."""

    def prompts(self, concept: str, n: int) -> list[str]:
        """n prompts that ask for `concept`."""

    def recognised(self, images: np.ndarray, concept: str) -> tuple[np.ndarray, np.ndarray]:
        """Per image (N, H, W, 3) in [0, 1]: whether `concept` is the judge's top-1 and within
        its top-5 prediction."""

    def siblings(self, concept: str) -> list[str]:
        """The other concepts of its family, look-alike excluded: the default preservation set."""

    def lookalike(self, concept: str) -> str | None:
        """A concept easily confused with this one, reported on its own."""
