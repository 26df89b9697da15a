"""Method configs: dataclasses with help text and defaults, loadable from YAML, validated on creation."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, shown
from .names import BACKEND_NAMES, DTYPE_NAMES

# No count, step, size or seed is larger: beyond, torch's generators and tensor shapes overflow.
INT_LIMIT = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38


def option(default, help: str, *, at_least: float = 0, positive: bool = False):
    """A dataclass field with help text and, for a number, its range: finite, at least `at_least`
    (0 unless said), above 0 when `positive`, and for an int at most INT_LIMIT (see
    `check_options`). Lists get a fresh copy per instance. A subclass that declares an option again
    (for another default) gives its range again."""
    metadata = {"help": help, "at_least": at_least, "positive": positive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def check_options(cfg) -> None:
    """A one-line UserError for the first option of `cfg` of the wrong type or out of its range,
    before anything runs: lists are lists of strings, a bool is no number, an int is a fine float
    (and becomes one), a float is no int, and every number is finite and within its option's range."""
    for f in dataclasses.fields(cfg):
        value, expected = getattr(cfg, f.name), _default(f)
        if isinstance(expected, list):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"option {f.name!r} must be a list of strings, not {shown(value)}")
            continue
        # An int is a fine float; a float is not an int, and a bool is neither.
        allowed = (int, float) if isinstance(expected, float) else type(expected)
        if isinstance(value, bool) != isinstance(expected, bool) or not isinstance(value, allowed):
            kind = type(expected).__name__
            raise UserError(f"option {f.name!r} must be {'an' if kind == 'int' else 'a'} {kind}, not {shown(value)}")
        if isinstance(expected, bool) or not isinstance(expected, (int, float)):
            continue
        if isinstance(expected, float):
            value = float(value)
            object.__setattr__(cfg, f.name, value)  # frozen configs (SamplingConfig) too
        low, positive = f.metadata["at_least"], f.metadata["positive"]
        # float32 is what the numbers become on the device: 1e300 is as infinite there as inf
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise UserError(f"{f.name} must be a finite number (within float32's range), not {value}")
        if value < low or (positive and value <= 0):
            raise UserError(f"{f.name} must be {'positive' if positive else f'at least {low}'}, not {value}")
        if isinstance(value, int) and value > INT_LIMIT:
            raise UserError(f"{f.name} must be at most {INT_LIMIT}, not {value}")


def check_template(template: str) -> None:
    """A prompt template has exactly one {} where the concept goes, and no other field."""
    try:
        valid = template.count("{}") == 1 and template.format("x") == template.replace("{}", "x")
    except (IndexError, KeyError, ValueError):
        valid = False
    if not valid:
        raise UserError(f"template {shown(template)} must contain exactly one {{}} where the concept goes, and no other braces")


def check_choice(name: str, value: Any, choices) -> None:
    """UserError, one line, unless `value` is one of `choices` (an option with named values)."""
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


@dataclass
class MethodConfig:
    """Options every method shares."""

    concepts: list[str] = option([], "concepts to erase")
    preserve: list[str] = option([], "concepts whose generation must not change")
    steps: int = option(100, "training steps", at_least=1)
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
        check_options(self)
        for name in ("concepts", "preserve"):
            if any(not v.strip() for v in getattr(self, name)):
                raise UserError(f"{name} must not contain an empty concept")
        check_choice("backend", self.backend, ("auto", *BACKEND_NAMES))
        check_choice("dtype", self.dtype, DTYPE_NAMES)
        check_choice("edit_dtype", self.edit_dtype, ("base", *DTYPE_NAMES))
        if not self.templates:
            raise UserError("templates must hold at least one template")
        for template in self.templates:
            check_template(template)

    def op_backend(self, op: str) -> str:
        """The backend `op` runs on in this run: `backend` where `op` is written in it, else the
        torch reference (see `fasterase.kernels.backend_for`)."""
        from .kernels import backend_for  # imports torch, which checking a config does not need

        return backend_for(op, self.backend)

    def input_paths(self) -> list[str]:
        """The files and folders this config reads (no output may be written over them)."""
        return []

    def prompt_concepts(self) -> list[str]:
        """Every concept this config writes into a prompt; each is checked against the tokenizer
        before any work starts. Methods with anchor or guide concepts add theirs."""
        return self.concepts + self.preserve

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)  # hashable: it keys the cache of a base model's evaluation images
class SamplingConfig:
    """How images are drawn (`fasterase.evaluation.sampling`)."""

    steps: int = option(0, "denoising steps per image; 0: the model's default (`default_sample_steps`: 10 on the built-in world, 25 on others)", at_least=0)
    guidance: float = option(5.0, "classifier-free guidance scale")
    batch_size: int = option(0, "prompts drawn at a time; 0: `chunk_size`'s default for the model")
    seed: int = option(0, "seed of the first chunk's noise")

    def __post_init__(self):
        check_options(self)


def strings(name: str, value, *, optional: bool = False) -> list[str] | None:
    """`value` as a list of strings, or a one-line UserError naming the argument: a str is
    refused, not read as the list of its characters."""
    if value is None and optional:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{name} must be a list of strings, not {shown(value)}")
    return list(value)


def check_paths(**arguments) -> None:
    """A one-line UserError naming the first argument that is neither None nor a path (a
    non-empty str or an os.PathLike); a model may also be a hub id, which is a str."""
    for name, value in arguments.items():
        if value is not None and not (isinstance(value, os.PathLike) or (isinstance(value, str) and value)):
            raise UserError(f"{name} must be a path, not {shown(value)}")


def check_callables(**arguments) -> None:
    """A one-line UserError naming the first argument that is neither None nor callable (a progress or notify hook)."""
    for name, value in arguments.items():
        if value is not None and not callable(value):
            raise UserError(f"{name} must be a function, not {shown(value)}")


def check_sampling(sampling) -> None:
    """A one-line UserError unless `sampling` is a SamplingConfig."""
    if not isinstance(sampling, SamplingConfig):
        raise UserError(f"sampling must be a SamplingConfig, not {shown(sampling)}")


def check_count(name: str, value) -> None:
    """A UserError unless `value` is an int of at least 1 (a number of images)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a whole number of at least 1, not {shown(value)}")


def weighted_paths(name: str, value: str) -> list[tuple[str, float]]:
    """'a.safetensors:8e4,b.safetensors' as [("a.safetensors", 8e4), ("b.safetensors", 1.0)]: paths
    separated by commas, each with an optional weight after its last colon (a finite number of at
    least 0); a one-line UserError otherwise. '' is none."""
    entries = []
    for item in value.split(",") if value.strip() else []:
        path, _, weight = item.strip().rpartition(":")
        try:
            entry = (path, float(weight)) if path else (item.strip(), 1.0)
        except ValueError:  # a colon that is part of the path
            entry = (item.strip(), 1.0)
        if not entry[0] or not math.isfinite(entry[1]) or not 0 <= entry[1] <= FLOAT32_MAX:
            raise UserError(f"{name} entries must be 'path' or 'path:weight' with a finite weight of at least 0, not {shown(item)}")
        entries.append(entry)
    return entries


def per_concept(name: str, values: list[str], concepts: list[str]) -> list[str]:
    """An option that names concepts (a guide, a mapping), given once for every erased concept or
    once per concept, as one entry per concept; a one-line UserError otherwise."""
    if len(values) != 1 and len(values) != len(concepts):
        raise UserError(f"{name} must name one concept for all or one per erased concept ({len(concepts)}), not {len(values)}")
    return values * len(concepts) if len(values) == 1 else list(values)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line UserError."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not UTF-8 text") from None
    except RecursionError:
        raise UserError(f"config {path} is nested too deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config {path} is not valid YAML{where}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of option: value")
    return data


def preset(method: str, name: str, package: str = "fasterase.presets") -> dict[str, Any]:
    """The options of a packaged preset, e.g. ("kpop", "sd14"): `package`'s file METHOD-NAME.yaml
    (an attack's: fasterase.attacks.presets)."""
    folder = resources.files(package)
    path = folder / f"{method}-{name}.yaml"
    if not path.is_file():
        known = sorted(p.name[len(method) + 1 : -5] for p in folder.iterdir() if p.name.startswith(method + "-") and p.name.endswith(".yaml"))
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
    return config_class(**merged)
