"""The built-in world's judge (`--judge world`, the default on the built-in model): its prompts and its classifier."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from . import world
from .classifier import WorldClassifier, predict

_HEAD = {"shape": "object", "emblem": "object", "colour": "colour", "style": "style"}


def classifier_path() -> Path:
    return Path(str(resources.files("fasterase.toyworld") / "weights" / "classifier.safetensors"))


class WorldJudge:
    def __init__(self, classifier: WorldClassifier | None = None):
        self.classifier = classifier or WorldClassifier.load(classifier_path())

    def check(self, concept: str) -> None:
        if world.concept_family(concept) is None:
            raise UserError(
                f"the built-in world has no concept {concept!r}; it has shapes ({', '.join(world.SHAPES)}), "
                f"colours, styles and {world.NUM_EMBLEMS} emblems (e.g. {', '.join(world.EMBLEMS[:3])})"
            )

    def prompts(self, concept: str, n: int) -> list[str]:
        family = world.concept_family(concept)
        if family in ("shape", "emblem"):
            return [f"a photo of a {concept}"] * n
        if family == "colour":
            return [f"a photo of a {concept} {world.SHAPES[i % len(world.SHAPES)]}" for i in range(n)]
        return [f"a photo of a {world.SHAPES[i % len(world.SHAPES)]} on a {concept} background" for i in range(n)]

    def recognised(self, images: np.ndarray, concept: str, labels: list[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Top-1/top-5 over every class of the concept's head, whatever the evaluation's `labels`:
        shapes and emblems share one head (with "nothing"), as the papers rank over all 1000
        ImageNet classes, not over a family."""
        family = world.concept_family(concept)
        logits = predict(self.classifier, images)[_HEAD[family]]
        classes = world.OBJECTS if _HEAD[family] == "object" else world.family_members(family)
        target = classes.index(world.style_of(concept) if family == "style" else concept)
        ranked = torch.argsort(logits, dim=1, descending=True).numpy()
        return ranked[:, 0] == target, (ranked[:, :5] == target).any(axis=1)

    def siblings(self, concept: str) -> list[str]:
        family = world.concept_family(concept)
        own = world.style_of(concept) if family == "style" else concept
        return [m for m in world.family_members(family) if m != own and m != world.LOOKALIKES.get(concept)]

    def lookalike(self, concept: str) -> str | None:
        return world.LOOKALIKES.get(concept)
