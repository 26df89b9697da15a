"""A short identifier of a base model's weights, so that an edit is applied only to the model it was made for."""

from __future__ import annotations

import hashlib

import torch

from .family import family_of

SAMPLES_PER_TENSOR = 256
# Tensor-name prefixes that depend on the library version: transformers 4 names the CLIP text
# encoder's tensors "text_model.encoder...", transformers 5 "encoder..." (but keeps the prefix in
# SDXL's second encoder, a CLIPTextModelWithProjection).
VERSIONED_PREFIXES = {"text_encoder": "text_model.", "text_encoder_2": "text_model."}


def portable_name(component: str, name: str) -> str:
    """A component's tensor name as edits and fingerprints write it, the same under every library
    version (without the versioned prefix), so an edit made under one applies under the other."""
    prefix = VERSIONED_PREFIXES.get(component)
    return name.removeprefix(prefix) if prefix else name


def _strided_sample(tensor: torch.Tensor) -> torch.Tensor:
    """Up to SAMPLES_PER_TENSOR elements (1-D) taken at a fixed stride over the flattened tensor."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
    return flat[::stride][:SAMPLES_PER_TENSOR]


def fingerprint(pipe, components: tuple[str, ...] | None = None) -> str:
    """16 hex characters (the start of a sha256) identifying the weights of `components` of `pipe`,
    by default every component a method may change: the UNet and the family's text encoders.

    Compute it on the base model, before any edit is applied. For every tensor of their state dicts,
    in sorted key order, it hashes the key (its `portable_name`), the shape, and the signs of up to 256 elements taken at
    a fixed stride over the flattened tensor: one small gather per tensor and never a pass over the
    weights, so it costs milliseconds on a 1-billion-parameter model.

    Signs, not values, because the same weights loaded as float32, float16 or bfloat16 must give
    the same fingerprint, and no rounding of the values does that: casting the samples to bfloat16
    gives round_bf16(w) from a float32 load but round_bf16(round_fp16(w)) from a float16 load, and
    the two differ (double rounding) in about 6% of the elements of a typical weight tensor, so in
    almost every tensor. Rounding to nearest never changes a sign (float16 underflow and overflow
    give ±0 and ±inf), so the signs are exactly the same in all three dtypes. Integer buffers are
    not cast when a model is loaded in another dtype, so their values are hashed as they are.
    The price: a fine-tune so slight that none of the sampled weights (about 200,000 in SD 1.x)
    changes sign keeps the fingerprint of its base.
    """
    digest = hashlib.sha256()
    for component in components or family_of(pipe).components():
        state = {portable_name(component, key): tensor for key, tensor in getattr(pipe, component).state_dict().items()}
        for key in sorted(state):
            tensor = state[key]
            sample = _strided_sample(tensor)
            invariant = torch.signbit(sample) if tensor.is_floating_point() else sample.to(torch.int64)
            digest.update(f"{component}.{key}:{tuple(tensor.shape)}\n".encode())
            digest.update(invariant.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
