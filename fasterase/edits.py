"""The edit file format: what an erasure changed, as safetensors with metadata, never pickle.

An edit holds only the tensors an erasure changed, keyed "<component>.<name in that component's
state_dict>" (e.g. "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"), and
metadata saying how it was made and for which base model: the fingerprints of the components it
changes (the text encoders, the UNet, or both), so that it applies to any model with the same
weights in those and to no other. KPOP's key, the learned prompt that recovers the erased concepts,
is a file of its own with its own format tag, bound to its edit, so that an edit can be released
without it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import signal
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import safetensors
import safetensors.torch
import torch
from torch import nn

from fasterase.errors import UserError
from fasterase.models.family import family_of
from fasterase.models.fingerprint import Fingerprints, checked, difference, portable_name

EDIT_FORMAT = "fasterase-edit"
KEY_FORMAT = "fasterase-key"
# 2: fingerprints of every element, per component (version 1 sampled signs). Still 2 since edits
# carry only the fingerprints of the components they change: the layout is the same and a reader
# compares every fingerprint an edit carries (`bound_components`), so the version 2 edits written
# before (UNet and text encoders, whatever they changed) apply to their base as they did, and
# releases that read version 2 read the new edits right.
FORMAT_VERSION = "2"
_FORMAT_TAGS = ("format", "format_version")


def _library_version() -> str:
    try:
        return importlib.metadata.version("fasterase")
    except importlib.metadata.PackageNotFoundError:
        # run from a source tree that was never installed
        return "0.0.0+local"


@dataclass
class EditMetadata:
    """How an edit was made: `config` is the method's config as a JSON-able dict."""

    method: str
    concepts: list[str]
    config: dict
    # the fingerprints of the base model's components the edit changes (`models.fingerprint`,
    # `changed_components`): the edit applies to a model with the same weights in each of them,
    # whatever its other components hold. A UNet edit computed from text embeddings (UCE, MACE)
    # binds to the UNet alone too: the fingerprints guard the weights the edit is written among, and
    # whether an erasure carries to another text encoder (or a text encoder's to another UNet) is
    # for `evaluate` to measure.
    base_fingerprints: Fingerprints
    base_model: str
    version: str = field(default_factory=_library_version)
    # shared with the key written together with the edit (KPOP's), which works with this edit
    # alone; "" when there is none (and in edits made before keys were bound to them)
    key: str = ""


@dataclass
class Edit:
    """`tensors`: "<component>.<state_dict name>" -> the new value of that tensor, any dtype."""

    tensors: dict[str, torch.Tensor]
    metadata: EditMetadata


def encode_metadata(format_tag: str, values: dict) -> dict[str, str]:
    """safetensors metadata (str -> str): the format tags as plain strings, every value as JSON.

    JSON for every value, strings included, so that str, list, dict and number values all come
    back as they went in without the reader knowing their types.
    """
    return {
        **{key: json.dumps(value) for key, value in values.items()},
        "format": format_tag,
        "format_version": FORMAT_VERSION,
    }


# A file to write: its path, tensors and (encoded) metadata.
File = tuple[Path, dict[str, torch.Tensor], dict[str, str]]


def save_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file whole or not at all (see `save_together`)."""
    save_together([(path, tensors, metadata)])


def save_together(files: list[File]) -> None:
    """Write safetensors files all or none: each into a temporary file beside its path, and only
    once every one is whole, renamed into place, with SIGINT and SIGTERM held back for the renames.
    A failure (a full disk) or an interruption before that removes every temporary file and leaves
    the earlier files as they were."""
    temporaries = [path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp") for path, _, _ in files]
    current = files[0][0]
    try:
        try:
            for temporary, (current, tensors, metadata) in zip(temporaries, files):
                # Creating the file ourselves gives it the permissions the umask allows;
                # safetensors' writer alone leaves 0600, which would hide a released edit from
                # other users.
                with open(temporary, "xb"):
                    pass
                mode = stat.S_IMODE(temporary.stat().st_mode)
                safetensors.torch.save_file(
                    {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}, temporary, metadata=metadata
                )
                os.chmod(temporary, mode)
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                for temporary, (current, _, _) in zip(temporaries, files):
                    os.replace(temporary, current)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        except BaseException:
            for temporary in temporaries:
                temporary.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise UserError(f"cannot write {current}: {error.strerror or error}") from None


def load_tagged(path: Path, format_tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (on CPU) and decoded metadata of a safetensors file carrying `format_tag`."""
    # safetensors' own errors for these name the path twice or, for a directory, "No such device"
    if not path.is_file():
        raise UserError(f"cannot read {path}: no such file")
    try:
        with safetensors.safe_open(path, framework="pt") as reader:
            metadata = reader.metadata() or {}
            found = metadata.get("format")
            if found != format_tag:
                raise UserError(f"{path} is not a {format_tag} file (format tag: {found or 'none'})")
            if metadata.get("format_version") != FORMAT_VERSION:
                raise UserError(
                    f"{path} has {format_tag} format version {metadata.get('format_version')};"
                    f" this fasterase reads version {FORMAT_VERSION}"
                )
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    except safetensors.SafetensorError as error:
        raise UserError(f"{path} is not a safetensors file ({error})") from None
    try:
        values = {key: json.loads(text) for key, text in metadata.items() if key not in _FORMAT_TAGS}
    except (json.JSONDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise UserError(f"{path} has metadata that is not JSON, or nested too deep") from None
    return tensors, values


def save_edit(path: str | os.PathLike, edit: Edit, key: tuple[Path, dict[str, torch.Tensor], dict] | None = None) -> None:
    """Write `edit` to `path` (a .safetensors file), and with it, all or neither, its key (path,
    tensors, metadata), bound to it by `edit.metadata.key`. UserError if they cannot be written."""
    files = [(Path(path), edit.tensors, encode_metadata(EDIT_FORMAT, asdict(edit.metadata)))]
    if key is not None:
        key_path, tensors, metadata = key
        files.append((Path(key_path), tensors, encode_metadata(KEY_FORMAT, {**metadata, "edit": edit.metadata.key})))
    save_together(files)


def load_edit(path: str | os.PathLike) -> Edit:
    """The edit at `path`. UserError if it is missing, not safetensors, or not a fasterase edit."""
    tensors, values = load_tagged(Path(path), EDIT_FORMAT)
    optional = {"key"}  # absent from edits made before keys were bound to them
    missing = [f.name for f in fields(EditMetadata) if f.name not in values and f.name not in optional]
    if missing:
        raise UserError(f"{path} lacks edit metadata: {', '.join(missing)}")
    names = [f.name for f in fields(EditMetadata) if f.name in values]
    kinds = {"concepts": list, "config": dict, "base_fingerprints": dict}
    for name in names:
        value, kind = values[name], kinds.get(name, str)
        if not isinstance(value, kind) or (name == "concepts" and not all(isinstance(c, str) for c in value)):
            raise UserError(f"{path} has edit metadata {name!r} of the wrong type ({type(value).__name__})")
    checked(values["base_fingerprints"], str(path))
    return Edit(tensors, EditMetadata(**{name: values[name] for name in names}))


def changed_components(names: Iterable[str]) -> tuple[str, ...]:
    """The components, sorted, of tensors named "<component>.<name>": those an edit's tensors or a
    LoRA's factors ("unet.<module>.lora_A.weight") change, which it binds to."""
    return tuple(sorted({name.partition(".")[0] for name in names}))


def bound_fingerprints(base: Fingerprints, names: Iterable[str]) -> Fingerprints:
    """The fingerprints in `base` that an edit (or a LoRA) of the tensors `names` binds to: those of
    the components it changes (`changed_components`)."""
    return {component: base[component] for component in changed_components(names)}


def bound_components(pipe, edit: Edit) -> tuple[str, ...]:
    """The components of `pipe` whose fingerprints `check_edit` compares with the edit's: every one
    the edit carries a fingerprint of. fasterase writes those of the components an edit changes;
    edits written before carry the UNet's and the text encoders' too, and keep binding to them, so
    that an edit released once never applies to more models than it did.

    UserError if the edit carries the fingerprint of a component that no edit of `pipe` binds to
    (the VAE, SDXL's second text encoder on SD1.x), or changes one it carries none of.
    """
    metadata = edit.metadata
    editable = family_of(pipe).components()
    if foreign := [c for c in metadata.base_fingerprints if c not in editable]:
        raise UserError(
            f"this edit was made for base model '{metadata.base_model}' and binds to its {foreign[0]}; edits of this model bind to its {' and '.join(editable)}"
        )
    for key in edit.tensors:
        component = key.partition(".")[0]
        # a change the fingerprints cannot vouch for: the base it was made for is unknown
        if component not in editable:
            raise UserError(f"this edit changes '{key}': edits change only the {' and '.join(editable)}, on the base they were made for")
        if component not in metadata.base_fingerprints:
            raise UserError(f"this edit changes '{key}' but carries no fingerprint of the {component} it was made for")
    return tuple(metadata.base_fingerprints)


def check_edit(pipe, edit: Edit, base: Fingerprints) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (model tensor, edit tensor) pairs that applying `edit` to `pipe` would copy.

    `base` holds the fingerprints of `pipe`'s `bound_components(pipe, edit)` (or more), taken when
    the base model was loaded, before any edit was applied. UserError if the edit was made for
    another base model (`bound_components`), names a tensor `pipe` lacks or shapes differently,
    gives integer or bool values for float weights (or the reverse), or holds nan or inf.
    """
    metadata = edit.metadata
    bound = bound_components(pipe, edit)
    if untaken := [c for c in bound if c not in base]:
        raise ValueError(f"no fingerprint of this model's {untaken[0]} was taken to check the edit against")
    if reason := difference(metadata.base_fingerprints, base):
        raise UserError(f"this edit was made for base model '{metadata.base_model}': {reason}")
    states: dict[str, dict[str, torch.Tensor]] = {}
    pairs = []
    for key, tensor in edit.tensors.items():
        component, _, name = key.partition(".")
        if component not in states:
            states[component] = {portable_name(component, k): v for k, v in getattr(pipe, component).state_dict(keep_vars=True).items()}
        target = states[component].get(name)
        if target is None:
            raise UserError(f"this edit changes '{key}', which this model does not have")
        if target.shape != tensor.shape:
            raise UserError(
                f"this edit's '{key}' has shape {tuple(tensor.shape)}, the model's {tuple(target.shape)}"
            )
        # Copying would cast silently: an int8 or bool tensor into float weights, or nan into them.
        if tensor.is_floating_point() != target.is_floating_point():
            raise UserError(f"this edit's '{key}' is {tensor.dtype}, the model's {target.dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"this edit's '{key}' holds nan or inf values")
        pairs.append((target, tensor))
    return pairs


def apply_edit(pipe, edit: Edit, base: Fingerprints) -> None:
    """Copy the edit's tensors into `pipe`'s components, in place, in each target's dtype and device.

    Every target is checked (`check_edit`) before the first copy, so a bad edit changes nothing.
    """
    pairs = check_edit(pipe, edit, base)
    with torch.no_grad():
        for target, tensor in pairs:
            target.copy_(tensor)


def edit_from_modules(
    modules: dict[str, nn.Module], names: dict[str, list[str]], metadata: EditMetadata
) -> Edit:
    """An Edit holding detached CPU copies of the named state_dict tensors of each component.

    `modules` maps a component name ("unet", "text_encoder") to its module, `names` maps it to
    names in that module's state_dict; the edit's keys are "<component>.<name>".
    """
    tensors = {}
    for component, component_names in names.items():
        state = modules[component].state_dict()
        for name in component_names:
            tensors[f"{component}.{portable_name(component, name)}"] = state[name].to("cpu", copy=True)
    return Edit(tensors, metadata)


def save_key(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str | list | dict]
) -> None:
    """Write a key (KPOP's learned prompt, which recovers erased concepts) to `path`, atomically."""
    save_atomically(Path(path), tensors, encode_metadata(KEY_FORMAT, metadata))


def load_key(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of the key at `path`. UserError if it is missing or not a fasterase key."""
    return load_tagged(Path(path), KEY_FORMAT)
