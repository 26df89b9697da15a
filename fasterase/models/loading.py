"""Loading a pipeline of a supported family from the built-in world, a local folder, a single
.safetensors file (offline with a config folder), or a hub id."""

from __future__ import annotations

import inspect
import re
from importlib import resources
from pathlib import Path

import torch

from ..errors import UserError, first_line
from .family import check_configs, family_of, folder_family, read_json

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


# Denoising steps of a drawing that asks for none. The built-in world's 32x32 images come out as
# well in 10 DDIM steps as in 25, the default for Stable Diffusion: the same recognition of every
# shape and emblem, and the same ESR/PSR of an edit, in 40% of the time
# (benchmarks/results/sampling-steps-cpu-2026-12-07.json).
SAMPLE_STEPS = 25
BUILTIN_SAMPLE_STEPS = 10


def default_sample_steps(pipe) -> int:
    """The steps `pipe` draws in when none are asked for: fewer for the built-in world (the folder
    diffusers loaded it from; a pipeline put together in memory has none)."""
    folder = pipe.name_or_path
    return BUILTIN_SAMPLE_STEPS if folder and Path(folder).resolve() == builtin_model_dir().resolve() else SAMPLE_STEPS


def _finish(pipe, device: str | torch.device, where: Path):
    check_configs(pipe, str(where))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for name in (*family_of(pipe).components(), "vae"):
        getattr(pipe, name).requires_grad_(False).eval()
    # Decoding a chunk of latents one image at a time keeps the VAE's activations to one image's.
    pipe.vae.enable_slicing()
    return pipe


def quiet_loading() -> None:
    """Loading a small model should not draw progress bars over the command's own output, and
    transformers warns about optional packages (torchvision) that fasterase never uses."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _pipeline_options(pipeline_class, dtype: torch.dtype) -> dict:
    """The loading options: the dtype, and no safety checker where the pipeline has one."""
    options = {_dtype_keyword(): dtype}
    if "safety_checker" in inspect.signature(pipeline_class.__init__).parameters:
        options |= {"safety_checker": None, "requires_safety_checker": False}
    return options


def load_pipeline(
    model: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    model_config: str | Path | None = None,
):
    """A diffusers pipeline of the model's family (`fasterase.models.family`), frozen, in eval
    mode, with no safety checker.

    model: None or "builtin" (the built-in world), a diffusers folder, a single-file .safetensors
    checkpoint (with model_config, a diffusers folder of the same family that gives its configs and
    tokenizers, it loads offline), or a hub id such as "org/name" (needs the network or the hub
    cache). Never unpickles. Anything but SD1.x, SD2.x and SDXL base is refused with one line.
    """
    import diffusers

    quiet_loading()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    path = model_path(model)
    if model_config is not None and not path.is_file():
        raise UserError("--model-config gives the configs of a single-file checkpoint; --model is not a file")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: only .safetensors checkpoints are read (pickled .ckpt/.bin files are refused)")
        from .single_file import checkpoint_family, load_single_file

        family = checkpoint_family(path)
        config_dir = Path(model_config).expanduser() if model_config is not None else None
        pipeline_class = getattr(diffusers, family.pipeline_class)
        return _finish(load_single_file(path, family, config_dir, pipeline_class, **_pipeline_options(pipeline_class, dtype)), device, path)
    pipeline_class = getattr(diffusers, folder_family(path).pipeline_class)
    _check_components(path)
    try:
        pipe = pipeline_class.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **_pipeline_options(pipeline_class, dtype))
    except Exception as exc:  # diffusers and transformers raise many types here; the user needs one line
        raise UserError(f"could not load the pipeline in {path}: {first_line(exc)}") from exc
    return _finish(pipe, device, path)


# Where weights of a component may be stored as a pickle, which diffusers would fall back to
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _check_components(folder: Path) -> None:
    """UserError if a component that model_index.json names has no folder, or has its weights
    only as a pickle (which fasterase never reads), before diffusers says it less plainly."""
    for name, spec in read_json(folder / "model_index.json").items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(part, str) for part in spec)):
            continue  # a setting, or a component the pipeline goes without ([null, null])
        if not (folder / name).is_dir():
            raise UserError(f"{folder} lacks its {name}: model_index.json names one, but there is no folder {name}/")
        if not any((folder / name).glob("*.safetensors")) and (pickled := [p.name for pattern in _PICKLED for p in (folder / name).glob(pattern)]):
            raise UserError(f"{folder / name} has its weights only as a pickle ({pickled[0]}), which fasterase never reads: convert them to .safetensors")


def local_path(model: str | Path | None) -> Path:
    """Where a model's files would be on this machine: the built-in world's folder, or the path
    given (which may not exist: a hub id)."""
    return builtin_model_dir() if model is None or str(model) == BUILTIN else Path(str(model)).expanduser()


def model_path(model: str | Path | None) -> Path:
    """Where a model's files are: the built-in world's folder, a local folder or .safetensors file,
    or the hub cache's folder of a hub id (downloading what is missing)."""
    name = BUILTIN if model is None else str(model)
    path = local_path(model)
    if name == BUILTIN and not path.is_dir():
        raise UserError(f"the built-in model is not installed at {path}; reinstall fasterase")
    if path.exists():
        return path
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise UserError(f"model path {name} does not exist")
    return _download(name)


# The UNet weights diffusers loads from a folder when no variant is asked for: one file, or shards.
_UNET_WEIGHTS = re.compile(r"^diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors$")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype a model's UNet weights are stored in (`model_path`'s folder or single file), read
    from a safetensors header: what its edits are written in by default, so that an edit of an
    fp16 release is fp16 whatever dtype the erasure computed in. float32 when it cannot be told."""
    import safetensors

    if path.is_dir():
        files = sorted(p for p in (path / "unet").glob("*.safetensors") if _UNET_WEIGHTS.match(p.name))
        prefix = ""
    else:
        files, prefix = [path], "model.diffusion_model."
    for file in files[:1]:
        with safetensors.safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():
                dtype = _SAFETENSORS_DTYPES.get(reader.get_slice(key).get_dtype()) if key.startswith(prefix) else None
                if dtype is not None:
                    return dtype
    return torch.float32


def _download(name: str) -> Path:
    """The hub cache's folder of pipeline `name` (safetensors only), downloading what is missing."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(name, use_safetensors=True))
    except Exception as exc:
        raise UserError(
            f"could not load '{name}' from the Hugging Face Hub ({first_line(exc)}); "
            "if you are offline, pass a local diffusers folder or .safetensors file with --model PATH"
        ) from exc


def model_name(model: str | Path | None) -> str:
    """How edits name their base model: "builtin", a resolved local path, or the hub id."""
    if model is None or str(model) == BUILTIN:
        return BUILTIN
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)
