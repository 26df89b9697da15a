"""The registry of erasure methods: each by name, with its config dataclass (`configs`) and its
Method class (`fasterase.methods.<name>`, imported on first use), so that a whole config is
checked before torch is imported."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..config import MethodConfig, check_paths, make_config, preset as load_preset, read_yaml, strings
from ..errors import UserError, shown
from .configs import CAConfig, ESDConfig, FewShotConfig, FMNConfig, KPOPConfig, MACEConfig, UCEConfig

if TYPE_CHECKING:
    import torch


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
    # whether torchrun's processes share the erasure (`fasterase.distributed`); else it runs in one
    shares_work: ClassVar[bool] = False

    def erase(self, pipe, cfg: MethodConfig, progress: Progress | None = None) -> ErasureResult:
        raise NotImplementedError

    @classmethod
    def key_processors(cls, pipe, key: dict[str, torch.Tensor], metadata: dict, backend: str = "auto"):
        """A block in which `pipe` runs with this method's key in place."""
        raise UserError(f"{cls.name} edits have no key")


# Every method: its name and config class. The module fasterase.methods.<name> defines its Method
# and registers it (`register`) when imported.
CONFIGS: dict[str, type[MethodConfig]] = {
    "ca": CAConfig, "esd": ESDConfig, "fewshot": FewShotConfig, "fmn": FMNConfig, "kpop": KPOPConfig, "mace": MACEConfig, "uce": UCEConfig,
}
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of the method called `name`; a one-line UserError for any other name."""
    if not isinstance(name, str):
        raise UserError(f"method must be a method's name, not {shown(name)}")
    if name not in CONFIGS:
        raise UserError(f"unknown method {shown(name)}; available: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name]


def get_method(name: str) -> type[Method]:
    """The Method class called `name` (importing its module, and with it torch)."""
    config_class(name)
    importlib.import_module(f"{__name__}.{name}")
    return METHODS[name]


def erase_config(
    method: str, concepts: list[str] | None = None, *, config: str | Path | None = None, preset: str | None = None, **options: Any
) -> MethodConfig:
    """The config of an erasure, checked whole (`fasterase.erase` takes the same arguments):
    the method's options from its preset, then the YAML file `config`, then `options` and
    `concepts`. Reads no model and imports no torch."""
    cls = config_class(method)
    concepts = strings("concepts", concepts, optional=True)
    check_paths(config=config)
    if preset is not None and not isinstance(preset, str):
        raise UserError(f"preset must be a preset's name, not {shown(preset)}")
    layers = [load_preset(method, preset)] if preset else []
    if config is not None:
        layers.append(read_yaml(config))
    overrides = {k: v for k, v in options.items() if v is not None}
    if concepts:
        overrides["concepts"] = list(concepts)
    cfg = make_config(cls, *layers, overrides)
    if not cfg.concepts:
        raise UserError(f"{method} needs at least one concept to erase")
    return cfg
