"""Attacks on an erased model: a registry like the methods', each attack by name with its config
dataclass (`configs`, no torch) and its Attack class (`fasterase.attacks.<name>`, imported on first
use).

An attack gets the edited pipeline, the original one, the concept, the evaluation's prompts of the
concept (one per image, each drawn from its own seed) and, on request, images of the concept. It
returns what it found (`Found`): one attacked prompt per evaluation prompt, in the same order, so
that the attacked images are drawn from the same seeds as the evaluation's, and the tensors those
prompts need (an inverted word's vectors). What an attack found is written to a file of its own
(`save_found`) and can be replayed on another edit of the same base model (`installed`).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..config import make_config, preset as load_preset
from ..errors import UserError, first_line, shown
from ..methods import Progress
from .configs import AttackConfig, InversionConfig, PromptAttackConfig, RingABellConfig

if TYPE_CHECKING:
    import torch

    from ..concept_images import ConceptImages

FOUND_FORMAT = "fasterase-attack"

# Every attack: its name and config class. The module fasterase.attacks.<name> defines its Attack
# and registers it (`register`) when imported.
ATTACK_CONFIGS: dict[str, type[AttackConfig]] = {"inversion": InversionConfig, "prompt": PromptAttackConfig, "ringabell": RingABellConfig}
ATTACKS: dict[str, type["Attack"]] = {}

@dataclass
class AttackTarget:
    """What an attack works on. The pipelines' weights are frozen: an attack changes no weight."""

    edited: Any  # the pipeline with the edit applied
    original: Any  # the base pipeline, without the edit
    concept: str
    prompts: list[str]  # the evaluation's prompts of the concept, one per image
    images: Callable[[], "ConceptImages"]  # the concept's images (a folder, else drawn by the original model), made when first asked for


@dataclass
class Found:
    """What an attack found: `prompts`, one attacked prompt per evaluation prompt (same order, so
    the same seeds), the `tensors` they need (`Attack.installed`), and `record`, JSON-ready facts
    for the report and the file (tokens, losses)."""

    prompts: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict = field(default_factory=dict)


class Attack:
    name: ClassVar[str]
    # a user's own attack ("module:Class") names its options' dataclass here (a subclass of
    # `configs.AttackConfig`); the packaged ones are listed in ATTACK_CONFIGS
    config_class: ClassVar[type[AttackConfig]]

    def find(self, target: AttackTarget, cfg: AttackConfig, progress: Progress | None = None) -> Found:
        raise NotImplementedError

    @classmethod
    def installed(cls, pipe, found: Found) -> contextlib.AbstractContextManager:
        """A block in which `pipe` draws `found.prompts` as the attack meant them (an inverted word's
        vectors in place); plain prompts need nothing."""
        return contextlib.nullcontext()


def register(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


def _user_attack(spec: str) -> type[Attack]:
    """A user's own attack, "module:Class": an Attack subclass with a `config_class`."""
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"attack {shown(spec)}: cannot import {module_name} ({first_line(exc)})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Attack) and isinstance(getattr(cls, "config_class", None), type)):
        raise UserError(f"attack {shown(spec)}: {module_name} has no Attack subclass {class_name} with a config_class")
    return cls


def attack_config_class(name: str) -> type[AttackConfig]:
    """The config dataclass of the attack called `name` (a packaged one, or a user's own
    "module:Class"); a one-line UserError for any other name."""
    if not isinstance(name, str):
        raise UserError(f"attack must be an attack's name, not {shown(name)}")
    if name in ATTACK_CONFIGS:
        return ATTACK_CONFIGS[name]
    if ":" in name:
        return _user_attack(name).config_class
    raise UserError(f"unknown attack {shown(name)}; available: {', '.join(sorted(ATTACK_CONFIGS))}, or a module:Class of your own")


def attack_config(name: str, options: dict[str, Any] | None = None, preset: str | None = None) -> AttackConfig:
    """The config of attack `name`: its `preset` (fasterase/attacks/presets/NAME-PRESET.yaml, e.g.
    the paper's settings), then `options`; checked whole, reading no model and importing no torch."""
    cls = attack_config_class(name)
    if options is not None and not isinstance(options, dict):
        raise UserError(f"attack options must be a dict of the attack's options, not {shown(options)}")
    if preset is not None and not isinstance(preset, str):
        raise UserError(f"preset must be a preset's name, not {shown(preset)}")
    layers = [load_preset(name, preset, package=f"{__name__}.presets")] if preset else []
    return make_config(cls, *layers, dict(options or {}))


def get_attack(name: str) -> type[Attack]:
    """The Attack class called `name` (importing its module, and with it torch)."""
    attack_config_class(name)
    if ":" in name:
        return _user_attack(name)
    importlib.import_module(f"{__name__}.{name}")
    return ATTACKS[name]


def save_found(path: str | Path, attack: str, found: Found, metadata: dict) -> None:
    """Write what an attack found to `path` (.safetensors), atomically: its tensors, and as metadata
    the attack's name, its prompts and record, and `metadata` (concept, config, edit)."""
    from ..edits import encode_metadata, save_atomically

    values = {**metadata, "attack": attack, "prompts": found.prompts, "record": found.record}
    save_atomically(Path(path), {name: t.detach().cpu().contiguous() for name, t in found.tensors.items()}, encode_metadata(FOUND_FORMAT, values))


def load_found(path: str | Path) -> tuple[str, Found, dict]:
    """(attack name, what it found, the file's metadata) from a file `save_found` wrote."""
    from ..edits import load_tagged

    tensors, values = load_tagged(Path(path), FOUND_FORMAT)
    prompts, attack = values.get("prompts"), values.get("attack")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts) or not isinstance(attack, str):
        raise UserError(f"{path} lacks the attack's name or its prompts")
    if attack not in ATTACK_CONFIGS:
        # a file names no module to import: what a user's own attack found is not replayed from it
        raise UserError(f"{path} was found by {shown(attack)}; replay reads what the packaged attacks ({', '.join(sorted(ATTACK_CONFIGS))}) found")
    record = values.get("record") if isinstance(values.get("record"), dict) else {}
    return attack, Found(prompts, tensors, record), values
