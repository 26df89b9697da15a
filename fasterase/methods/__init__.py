"""The registry of erasure methods: one class per method, each with its config dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ..config import MethodConfig
from ..errors import UserError


@dataclass
class ErasureResult:
    """What a method changed: tensors named "<component>.<parameter>", and optionally a key
    (tensors kept out of the released edit, e.g. KPOP's prompt) with its metadata."""

    tensors: dict[str, torch.Tensor]
    key: dict[str, torch.Tensor] | None = None
    key_metadata: dict = field(default_factory=dict)
    # concept -> a LoRA state dict in the format diffusers' `load_lora_weights` reads, for methods
    # that train one per concept (MACE), written beside the edit when asked for
    loras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


# Called as progress(step, total, losses) every few steps; losses are Python floats.
Progress = Callable[[int, int, dict[str, float]], None]


class Method:
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]

    def erase(self, pipe, cfg: MethodConfig, progress: Progress | None = None) -> ErasureResult:
        raise NotImplementedError

    @classmethod
    def key_processors(cls, pipe, key: dict[str, torch.Tensor], metadata: dict, backend: str = "auto"):
        """A block in which `pipe` runs with this method's key in place."""
        raise UserError(f"{cls.name} edits have no key")


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import ca, esd, fewshot, fmn, kpop, mace, uce  # noqa: E402,F401  (each registers itself)
