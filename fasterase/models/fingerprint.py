"""Fingerprints of a base model's weights, per component, so that an edit is applied only where the
components it changes are those it was made for (`fasterase.edits`).

A fingerprint sees every element of every tensor of a component: a weight changed anywhere, by any
amount that survives rounding to half precision, changes it. It is the same whether the model was
loaded in float32 or float16 (or bfloat16), which needs the one idea below.

The same stored weights w load as w (float32), round_fp16(w) or round_bf16(w). No function of the
loaded values gives one answer for all three: round_bf16(round_fp16(w)) differs from round_bf16(w)
for about 6% of the elements of a weight tensor (double rounding). But each half-precision
rounding of w is computed exactly from a float32 load and from a load in that same precision. So
a component's fingerprint is a sha256 per *canonical* dtype, of its weights rounded to it: a
float32 load has both (float16 and bfloat16), a float16 load the float16 one, a bfloat16 load the
bfloat16 one. Two loads of one model agree on every canonical dtype they share; an edit made on
a float16 load applies to float32 and float16 loads of its base, and is refused, with the reason,
on a bfloat16 load of a float32 model (the one pair with nothing in common). Integer buffers are
hashed as they are (a load casts only floats).

Cost: one pass over the weights, a cast and a sha256 (about 2 GB/s on one core) per canonical
dtype, in threads; about a second for SD1.x's UNet and text encoder loaded in float16, most of it
the UNet's: take only the components needed.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import UserError
from .family import family_of

# component -> canonical dtype name ("float16", "bfloat16") -> 16 hex characters (the start of a sha256)
Fingerprints = dict[str, dict[str, str]]

CANONICAL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Tensor-name prefixes that depend on the library version: transformers 4 names the CLIP text
# encoder's tensors "text_model.encoder...", transformers 5 "encoder..." (but keeps the prefix in
# SDXL's second encoder, a CLIPTextModelWithProjection).
VERSIONED_PREFIXES = {"text_encoder": "text_model.", "text_encoder_2": "text_model."}


def portable_name(component: str, name: str) -> str:
    """A component's tensor name as edits and fingerprints write it, the same under every library
    version (without the versioned prefix), so an edit made under one applies under the other."""
    prefix = VERSIONED_PREFIXES.get(component)
    return name.removeprefix(prefix) if prefix else name


def _exact_canonicals(dtype: torch.dtype) -> tuple[str, ...]:
    """The canonical dtypes into which weights loaded as `dtype` round exactly as the stored ones would."""
    if dtype in (torch.float32, torch.float64):
        return tuple(CANONICAL_DTYPES)
    return tuple(name for name, canonical in CANONICAL_DTYPES.items() if canonical == dtype)


def _component_hash(state: dict[str, torch.Tensor], canonical: torch.dtype) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        values = tensor.to(canonical) if tensor.is_floating_point() else tensor
        digest.update(f"{name}:{values.dtype}{tuple(tensor.shape)}\n".encode())
        # hashlib releases the GIL on buffers this size, so components hash in parallel threads
        digest.update(memoryview(values.reshape(-1).cpu().contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]


def fingerprints(pipe, components: tuple[str, ...] | None = None) -> Fingerprints:
    """The fingerprints of `components` of `pipe` (by default every component a method or an
    evaluation reads: the UNet, the family's text encoders and the VAE), in every canonical dtype
    their loaded dtypes allow. Take them from the base model, before an edit is applied."""
    names = (*family_of(pipe).components(), "vae") if components is None else components
    states = {
        component: {portable_name(component, key): t for key, t in getattr(pipe, component).state_dict().items()}
        for component in names
    }
    canonicals = {}
    for component, state in states.items():
        allowed = set(CANONICAL_DTYPES)
        for tensor in state.values():
            if tensor.is_floating_point():
                allowed &= set(_exact_canonicals(tensor.dtype))
        canonicals[component] = [name for name in CANONICAL_DTYPES if name in allowed]
    jobs = [(component, name) for component in names for name in canonicals[component]]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        hashes = pool.map(lambda job: _component_hash(states[job[0]], CANONICAL_DTYPES[job[1]]), jobs)
        result: Fingerprints = {component: {} for component in names}
        for (component, name), value in zip(jobs, hashes):
            result[component][name] = value
    return result


def difference(recorded: Fingerprints, actual: Fingerprints) -> str | None:
    """None when every component in `recorded` has, in `actual`, the same weights; otherwise why
    not, as a phrase ("its unet differs from this model's")."""
    differing, incomparable = [], []
    for component, hashes in recorded.items():
        here = actual.get(component, {})
        shared = [name for name in hashes if name in here]
        if not shared:
            incomparable.append((component, hashes, here))
        elif any(hashes[name] != here[name] for name in shared):
            differing.append(component)
    if differing:
        return f"its {' and '.join(differing)} {'differs' if len(differing) == 1 else 'differ'} from this model's"
    if incomparable:
        component, hashes, here = incomparable[0]
        return (
            f"its fingerprint of the {component} is of a {' or '.join(hashes) or 'no'} load, this model's {component}"
            f" is loaded in {' or '.join(here) or 'another dtype'}: load it in float32 to compare"
        )
    return None


def checked(value, where: str) -> Fingerprints:
    """`value` read from a file's metadata as Fingerprints; UserError naming `where` if it is not one."""
    if not (
        isinstance(value, dict)
        and value
        and all(
            isinstance(component, str)
            and isinstance(hashes, dict)
            and all(name in CANONICAL_DTYPES and isinstance(digest, str) for name, digest in hashes.items())
            for component, hashes in value.items()
        )
    ):
        raise UserError(f"{where} has malformed fingerprints")
    return value
