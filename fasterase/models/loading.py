"""Loading a StableDiffusionPipeline from the built-in world, a local folder, a single
.safetensors file, or a hub id."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

from ..errors import UserError

BUILTIN = "builtin"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns); older releases know only
    the old one."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def builtin_model_dir() -> Path:
    """The packaged built-in world's pipeline folder."""
    return Path(str(resources.files("fasterase.toyworld") / "weights" / "pipeline"))


def _finish(pipe, device: str | torch.device):
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False).eval()
    return pipe


def load_pipeline(model: str | Path | None = None, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """A diffusers StableDiffusionPipeline, frozen, in eval mode, with no safety checker.

    model: None or "builtin" (the built-in world), a diffusers folder, a single-file .safetensors
    checkpoint, or a hub id such as "org/name" (needs the network or the hub cache). Never unpickles.
    """
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    # Loading a small model should not draw progress bars over the command's own output.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    common = {_dtype_keyword(): dtype, "safety_checker": None, "requires_safety_checker": False}
    name = BUILTIN if model is None else str(model)
    path = builtin_model_dir() if name == BUILTIN else Path(name).expanduser()
    if name == BUILTIN and not path.is_dir():
        raise UserError(f"the built-in model is not installed at {path}; reinstall fasterase")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return _finish(StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **common), device)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: only .safetensors checkpoints are read (pickled .ckpt/.bin files are refused)")
        try:
            return _finish(StableDiffusionPipeline.from_single_file(str(path), **common), device)
        except Exception as exc:  # diffusers raises many types here; the user needs one line
            raise UserError(f"could not load {path} as a single-file Stable Diffusion checkpoint: {_first_line(exc)}") from exc
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise UserError(f"model path {name} does not exist")
    try:
        return _finish(StableDiffusionPipeline.from_pretrained(name, use_safetensors=True, **common), device)
    except Exception as exc:
        raise UserError(
            f"could not load '{name}' from the Hugging Face Hub ({_first_line(exc)}); "
            "if you are offline, pass a local diffusers folder or .safetensors file with --model PATH"
        ) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def model_name(model: str | Path | None) -> str:
    """How edits name their base model: "builtin", a resolved local path, or the hub id."""
    if model is None or str(model) == BUILTIN:
        return BUILTIN
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)
