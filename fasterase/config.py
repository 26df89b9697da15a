"""Method configs: dataclasses with help text and defaults, loadable from YAML, validated on creation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .kernels import BACKEND_NAMES, backend_for

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def option(default, help: str):
    """A dataclass field with help text; lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check_choice(name: str, value: Any, choices) -> None:
    """UserError, one line, unless `value` is one of `choices` (an option with named values)."""
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


@dataclass
class MethodConfig:
    """Options every method shares."""

    concepts: list[str] = option([], "concepts to erase")
    preserve: list[str] = option([], "concepts whose generation must not change")
    steps: int = option(100, "training steps")
    seed: int = option(0, "random seed of sampling and training")
    backend: str = option("auto", "kernel backend: auto, torch, triton or cuda (ops not written in it run torch)")
    dtype: str = option("float32", "compute dtype on a GPU: float32, float16 or bfloat16 (the frozen weights are loaded in it; trained tensors keep float32 masters)")
    edit_dtype: str = option("base", "dtype of the edit's tensors: base (the base model's stored dtype), float32, float16 or bfloat16")
    sample_batch: int = option(0, "prompts sampled at a time when drawing images or trajectories; 0: by image size (64 at 256 px, 16 at 512 px, 4 at 1024 px)")
    templates: list[str] = option(
        ["{}", "a photo of a {}", "a picture of a {}", "an image of a {}"],
        "prompts of a concept; {} stands for the concept (and for an anchor, guide, mapping or neutral one)",
    )

    def __post_init__(self):
        for name in ("concepts", "preserve"):
            values = getattr(self, name)
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise UserError(f"{name} must be a list of strings")
            if any(not v.strip() for v in values):
                raise UserError(f"{name} must not contain an empty concept")
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, not {self.steps}")
        if self.sample_batch < 0:
            raise UserError(f"sample_batch must be at least 0, not {self.sample_batch}")
        check_choice("backend", self.backend, ("auto", *BACKEND_NAMES))
        check_choice("dtype", self.dtype, DTYPE_NAMES)
        check_choice("edit_dtype", self.edit_dtype, ("base", *DTYPE_NAMES))
        if not self.templates or any("{}" not in t for t in self.templates):
            raise UserError("every template must contain {} where the concept goes")

    def op_backend(self, op: str) -> str:
        """The backend `op` runs on in this run: `backend` where `op` is written in it, else the
        torch reference (see `fasterase.kernels.backend_for`)."""
        return backend_for(op, self.backend)

    def prompt_concepts(self) -> list[str]:
        """Every concept this config writes into a prompt; each is checked against the tokenizer
        before any work starts. Methods with anchor or guide concepts add theirs."""
        return self.concepts + self.preserve

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def per_concept(name: str, values: list[str], concepts: list[str]) -> list[str]:
    """An option that names concepts (a guide, a mapping), given once for every erased concept or
    once per concept, as one entry per concept; a one-line UserError otherwise."""
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise UserError(f"{name} must be a list of strings")
    if len(values) != 1 and len(values) != len(concepts):
        raise UserError(f"{name} must name one concept for all or one per erased concept ({len(concepts)}), not {len(values)}")
    return values * len(concepts) if len(values) == 1 else list(values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line UserError."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config {path} is not valid YAML{where}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of option: value")
    return data


def preset(method: str, name: str) -> dict[str, Any]:
    """The options of a packaged preset, e.g. ("kpop", "sd14")."""
    path = resources.files("fasterase.presets") / f"{method}-{name}.yaml"
    if not path.is_file():
        known = sorted(p.name[len(method) + 1 : -5] for p in resources.files("fasterase.presets").iterdir() if p.name.startswith(method + "-"))
        raise UserError(f"no preset {name!r} for {method}; known: {', '.join(known) or 'none'}")
    return read_yaml(Path(str(path)))


def make_config(config_class: type[MethodConfig], *layers: dict[str, Any]):
    """A config from option layers, later layers winning (e.g. preset, YAML file, command line)."""
    known = {f.name: f for f in dataclasses.fields(config_class)}
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in known:
                raise UserError(f"unknown option {key!r}; known options: {', '.join(known)}")
            merged[key] = value
    for key, value in merged.items():
        expected = known[key].default if known[key].default is not dataclasses.MISSING else known[key].default_factory()
        # An int is a fine float; a float is not an int, and a bool is neither.
        allowed = (int, float) if isinstance(expected, float) else type(expected)
        if isinstance(value, bool) != isinstance(expected, bool) or not isinstance(value, allowed):
            raise UserError(f"option {key!r} must be a {type(expected).__name__}, not {value!r}")
        if isinstance(expected, float) and isinstance(value, int):
            merged[key] = float(value)
    return config_class(**merged)
