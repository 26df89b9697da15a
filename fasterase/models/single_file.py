"""Loading a single-file .safetensors checkpoint (the original Stable Diffusion / SDXL format that
civitai and the original repositories publish) offline.

Such a file holds weights only. diffusers' `from_single_file` takes the rest (component configs,
tokenizers, scheduler) from a diffusers folder of the same family, and without one it asks the hub
for the family's reference folder, which fails offline. So the family is read from the tensor names
first (without loading a tensor), and the configs come from a local folder (`--model-config DIR`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, first_line
from .family import FAMILIES, SUPPORTED, Family, folder_family

_UNET = "model.diffusion_model."
_UNET_CONV_IN = _UNET + "input_blocks.0.0.weight"
_NEEDS_CONFIG = (
    "a single-file checkpoint needs the configs of its family: pass --model-config DIR with a local "
    "diffusers folder of the same family (SD1.x/SD2.x/SDXL)"
)


def _unsupported(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what} is not supported; fasterase loads {SUPPORTED} checkpoints")


def checkpoint_family(path: Path) -> Family:
    """The family of a single-file checkpoint, from its tensor names (and one shape).

    Reads only the file's header: deciding must not cost loading gigabytes, and a family we cannot
    edit is better refused now, in one line, than by diffusers deep in a conversion.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            in_channels = f.get_slice(_UNET_CONV_IN).get_shape()[1] if _UNET_CONV_IN in names else None
    except Exception as exc:  # safetensors raises its own error type, or OSError
        raise UserError(f"{path} is not a readable .safetensors file ({first_line(exc)})") from exc
    parts = {part for name in names for part in name.split(".")}
    if "joint_blocks" in parts:
        raise _unsupported(path, "Stable Diffusion 3")
    if "double_blocks" in parts:
        raise _unsupported(path, "Flux")
    if in_channels is None:
        raise _unsupported(path, "a file without a Stable Diffusion UNet (model.diffusion_model.*)")
    if in_channels != 4:
        raise _unsupported(path, f"a UNet with {in_channels} input channels (inpainting, instruction editing or depth)")

    def has(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in names)

    if has("conditioner.embedders.0.") and has("conditioner.embedders.1."):
        return FAMILIES["sdxl"]
    if has("conditioner.embedders.0.model."):
        raise _unsupported(path, "the SDXL refiner")
    if has("cond_stage_model.model."):
        return FAMILIES["sd2"]
    if has("cond_stage_model.transformer."):
        return FAMILIES["sd1"]
    raise _unsupported(path, "a checkpoint with no text encoder of a known family")


def load_single_file(path: Path, family: Family, config_dir: Path | None, pipeline_class, **kwargs):
    """`pipeline_class.from_single_file(path)` of a checkpoint of `family`, with every config,
    tokenizer and the scheduler read from `config_dir` (a folder of the same family) and nothing
    fetched; kwargs go to it (dtype, safety_checker=None, ...).

    Without config_dir diffusers asks the hub for its reference folder of the family: that is tried
    only when online, and a failed connection becomes the advice to pass --model-config.
    """
    import huggingface_hub.constants
    import torch

    if config_dir is not None:
        found = folder_family(config_dir)
        if found != family:
            raise UserError(
                f"{path} is an {family.title} checkpoint but --model-config {config_dir} is an "
                f"{found.title} folder; pass a diffusers folder of the same family"
            )
        # A local folder as `config` makes diffusers read model_index.json and every component's
        # config, tokenizer and scheduler from it (from_pretrained(config_dir, subfolder=...));
        # local_files_only keeps the weights file and those reads from ever reaching for the hub.
        options = {"config": str(config_dir), "local_files_only": True}
    elif huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot load {path} offline (HF_HUB_OFFLINE): {_NEEDS_CONFIG}")
    else:
        options = {}
    try:
        pipe = pipeline_class.from_single_file(str(path), **options, **kwargs)
    except Exception as exc:  # diffusers raises many types here; the user needs one line
        if config_dir is None and _is_connection_error(exc):
            raise UserError(f"cannot load {path}: the hub is out of reach ({first_line(exc)}); {_NEEDS_CONFIG}") from exc
        raise UserError(f"could not load {path} as a single-file {family.title} checkpoint: {first_line(exc)}") from exc
    # diffusers builds the text encoders without weights and fills in those the file has: one the
    # file lacks stays an empty ("meta") tensor, and would only fail later, far from its cause.
    empty = [
        f"{name}.{key}"
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in module.state_dict().items()
        if tensor.is_meta
    ]
    if empty:
        shown = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise UserError(f"{path} lacks {len(empty)} of the weights its {family.title} pipeline needs ({shown})")
    return pipe


def _is_connection_error(exc: BaseException | None) -> bool:
    """Whether the hub could not be reached: huggingface_hub says so with its own errors, or lets
    those of requests/httpx through, somewhere along the chain of causes."""
    from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled

    while exc is not None:
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        if "Connect" in type(exc).__name__ or "Timeout" in type(exc).__name__:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
