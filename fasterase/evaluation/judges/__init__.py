"""Judges: what evaluation needs to know about images of a model's concepts, one protocol for all.

A judge gives prompts for a concept and ranks images over candidate labels; ESR and PSR (top-1,
top-5) come from that ranking (`fasterase.evaluation.report`). Judges are a registry, like
methods: `--judge NAME[:PATH]` for a packaged one (world, clip, nudenet), `--judge module:Class`
for a user's own, each configured by its `config_class` (a dataclass of `option`s) from
`--judge-set KEY=VALUE` and `--candidates FILE`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Protocol

import numpy as np

from ...config import make_config
from ...errors import UserError, first_line, shown


class Judge(Protocol):
    def check(self, concept: str) -> None:
        """Raises UserError when the judge cannot recognise `concept`."""

    def prompts(self, concept: str, n: int) -> list[str]:
        """n prompts that ask for `concept`."""

    def recognised(self, images: np.ndarray, concept: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per image (N, H, W, 3) in [0, 1]: whether `concept` is the judge's top-1 and within
        its top-5 prediction. `labels`: every concept of the evaluation, which a judge that ranks
        over labels (CLIP) adds to its own candidates."""

    def siblings(self, concept: str) -> list[str]:
        """The concepts to preserve when the user names none (for the built-in world, the rest
        of the concept's family, look-alike excluded)."""

    def lookalike(self, concept: str) -> str | None:
        """A concept easily confused with this one, reported on its own."""


# A judge may also give details beyond top-1/top-5, as JSON-ready values: one per image, which
# torchrun's processes compute for the images each drew, and a concept's summary of them:
# def details(self, images: np.ndarray) -> list  (NudeNet: the classes each image shows)
# def summary(self, details: list) -> dict  (NudeNet: the nudity rate and images per class)

# Packaged judges by name: "module:Class", imported when asked for (their dependencies are heavy).
JUDGES = {
    "world": "fasterase.toyworld.judge:WorldJudge",
    "clip": "fasterase.evaluation.judges.clip:CLIPJudge",
    "nudenet": "fasterase.evaluation.judges.nudenet:NudeNetJudge",
}


def judge_class(spec: str) -> tuple[type, str]:
    """The judge class `spec` names and the path it carries ("clip:DIR" -> CLIPJudge, "DIR"):
    a packaged judge's name, optionally with ":PATH", or a user's "module:Class"."""
    if not isinstance(spec, str) or not spec:
        raise UserError(f"judge must be a judge's name, not {shown(spec)}")
    name, _, argument = spec.partition(":")
    if name in JUDGES:
        module_name, class_name = JUDGES[name].split(":")
    elif argument:
        module_name, class_name, argument = name, argument, ""
    else:
        raise UserError(f"unknown judge {shown(spec)}; packaged: {', '.join(JUDGES)}, or a module:Class of your own")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"judge {shown(spec)}: cannot import {module_name} ({first_line(exc)})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserError(f"judge {shown(spec)}: {module_name} has no class {class_name}")
    return cls, argument


def load_judge(spec: str, options: dict[str, Any] | None = None) -> Judge:
    """The judge `spec` names (see `judge_class`), configured by `options` (its config's fields;
    the path after a packaged judge's name fills its `path` option)."""
    cls, argument = judge_class(spec)
    options = dict(options or {})
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        if options or argument:
            raise UserError(f"judge {shown(spec)} takes no options")
        return cls()
    if argument:
        if "path" not in {f.name for f in dataclasses.fields(config_class)}:
            raise UserError(f"judge {shown(spec)} takes no path")
        options["path"] = argument
    return cls(make_config(config_class, options))
