"""LoRAs of the cross-attention projections: export in diffusers' format, merging many into base
weights, and MACE's closed-form fusion.

A LoRA is given, for every projection weight it changes ("<module>.weight"), as its factors
(up B (d_out, r), down A (r, d)), any scale folded into them: the weight becomes W + B A. Nothing
here changes a weight in place, and no dense B A is formed per LoRA: merging stacks every LoRA's
factors of a projection side by side, B_cat (d_out, n r) @ A_cat (n r, d), one matrix product per
projection whatever the number of LoRAs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .edits import encode_metadata, load_tagged, save_atomically
from .errors import UserError
from .kernels import ridge_solve

LORA_FORMAT = "fasterase-lora"

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "<module>.weight" -> (up (d_out, r), down (r, d))


def lora_state_dict(factors: Factors) -> dict[str, torch.Tensor]:
    """One LoRA of the UNet as diffusers' `load_lora_weights` reads it (peft names, scale folded
    into the up factor, so alpha = rank)."""
    tensors = {}
    for weight_name, (up, down) in factors.items():
        module = weight_name.removesuffix(".weight")
        tensors[f"unet.{module}.lora_A.weight"] = down.cpu().contiguous()
        tensors[f"unet.{module}.lora_B.weight"] = up.cpu().contiguous()
    return tensors


def save_lora(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """A LoRA state dict (`lora_state_dict`), atomically, with its metadata."""
    save_atomically(Path(path), tensors, encode_metadata(LORA_FORMAT, metadata))


def load_lora(path: str | os.PathLike) -> tuple[Factors, dict]:
    """The UNet factors and metadata of a LoRA written by `save_lora`. UserError if it is missing
    or not a fasterase LoRA."""
    tensors, metadata = load_tagged(Path(path), LORA_FORMAT)
    modules = {key.removeprefix("unet.").rsplit(".lora_", 1)[0] for key in tensors}
    if expected := {f"unet.{m}.lora_{part}.weight" for m in modules for part in "AB"} ^ set(tensors):
        raise UserError(f"{path} is not a LoRA of the UNet's weights in pairs (lora_A, lora_B): {sorted(expected)[0]} is unmatched")
    return {f"{m}.weight": (tensors[f"unet.{m}.lora_B.weight"], tensors[f"unet.{m}.lora_A.weight"]) for m in sorted(modules)}, metadata


def merge_loras(weights: dict[str, torch.Tensor], loras: Sequence[Factors], scales: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """W + sum_k s_k B_k A_k for every weight W (d_out, d), as one product per weight over the
    concatenated factors; new tensors, each in its weight's dtype and device.

    loras[k] maps weight names to LoRA k's factors (up (d_out, r_k), down (r_k, d)); a weight absent
    from loras[k] has no LoRA k. scales: s_k, folded into the up factors (default 1). The product
    runs in float32, or float64 where a weight or factor is float64.
    """
    if scales is not None and len(scales) != len(loras):
        raise ValueError(f"{len(scales)} scales for {len(loras)} LoRAs")
    if unknown := {name for lora in loras for name in lora} - set(weights):
        raise ValueError(f"LoRAs for weights not given: {', '.join(sorted(unknown))}")
    merged = {}
    for name, weight in weights.items():
        pairs = [(k, *lora[name]) for k, lora in enumerate(loras) if name in lora]
        for k, up, down in pairs:
            if up.dim() != 2 or down.dim() != 2 or up.shape[0] != weight.shape[0] or down.shape[1] != weight.shape[1] or up.shape[1] != down.shape[0]:
                raise ValueError(f"LoRA {k} on {name}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not make {tuple(weight.shape)}")
        dtype = torch.promote_types(torch.float32, weight.dtype)
        for _, up, down in pairs:
            dtype = torch.promote_types(dtype, torch.promote_types(up.dtype, down.dtype))
        result = weight.to(dtype, copy=True)
        if pairs:
            # concatenated first, converted once: one conversion per projection, not per LoRA
            ups = torch.cat([up.to(weight.device) for _, up, _ in pairs], dim=1).to(dtype)  # (d_out, sum r)
            downs = torch.cat([down.to(weight.device) for *_, down in pairs]).to(dtype)  # (sum r, d)
            if scales is not None:
                ranks = torch.tensor([down.shape[0] for *_, down in pairs], device=weight.device)
                ups = ups * torch.tensor([scales[k] for k, *_ in pairs], dtype=dtype, device=weight.device).repeat_interleave(ranks)
            result.addmm_(ups, downs)
        merged[name] = result.to(weight.dtype)
    return merged


def fuse_loras(
    weights: dict[str, torch.Tensor],
    loras: Sequence[Factors],
    concept_grams: Sequence[torch.Tensor],
    preserved: torch.Tensor,
    lam: float,
    backend: str = "auto",
    preserved_targets: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """MACE's closed-form fusion: W* = W + sum_k B_k (A_k G_k) R^-1 for every projection W,
    R = lambda I + sum_k G_k + preserved (see `fasterase.closed_form`).

    loras[k]: concept k's factors (scale folded in); concept_grams[k]: G_k, sum over concept k's
    tokens of c c^T (d, d); preserved: the preservation Gram P (d, d), whose tokens keep W's
    projections, or those of preserved_targets T (per weight; the reference's original weights):
    then W* gains (T - W) P R^-1. The rows A_k G_k of every concept and projection, and P's, are
    solved together (`fasterase.kernels.ridge_solve`, in float64 on preserved's device), then
    merged with the up factors. Results in each weight's dtype and device.
    """
    if len(loras) != len(concept_grams):
        raise ValueError(f"{len(loras)} concepts' LoRAs but {len(concept_grams)} concept Grams")
    if unknown := {name for lora in loras for name in lora} - set(weights):
        raise ValueError(f"LoRAs for projections not given: {', '.join(sorted(unknown))}")
    device, f64 = preserved.device, torch.float64
    blocks = [(k, name, up, down) for k, lora in enumerate(loras) for name, (up, down) in lora.items()]
    if not blocks and preserved_targets is None:
        return {name: w.clone() for name, w in weights.items()}
    grams = [g.to(device, f64) for g in concept_grams]
    # every A_k G_k, (sum r, d) in the order of blocks: one product per concept over its projections' down factors
    parts = [torch.cat([down.to(device) for _, down in lora.values()]).to(f64) @ grams[k] for k, lora in enumerate(loras) if lora]
    sizes = [down.shape[0] for *_, down in blocks]
    if preserved_targets is not None:
        parts.append(preserved.to(f64))  # P R^-1: P is symmetric, so its rows are what is solved
        sizes.append(preserved.shape[0])
    solved = ridge_solve(torch.cat(parts), [preserved.to(f64), *grams], lam, backend=backend).split(sizes)
    fused: list[Factors] = [{} for _ in loras]
    for (k, name, up, _), part in zip(blocks, solved):
        fused[k][name] = (up, part)
    merged = merge_loras(weights, fused)
    if preserved_targets is None:
        return merged
    kept = solved[-1]
    return {
        name: (value.to(device, f64) + (preserved_targets[name].to(device, f64) - weights[name].to(device, f64)) @ kept).to(value.device, value.dtype)
        for name, value in merged.items()
    }
