"""Edits made by hand, cheaply, for tests that need a valid edit but not an erasure."""

from __future__ import annotations

import torch


def hand_made_edit(model, path, concepts=("circle",)):
    """An edit of `model` made by hand (cheap): the first cross-attention value projection zeroed,
    bound, as erase binds its edits, to the components it changes (the UNet)."""
    from fasterase.edits import Edit, EditMetadata, changed_components, save_edit
    from fasterase.models.fingerprint import fingerprints
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(model)
    name, weight = next((n, p) for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_v.weight"))
    tensors = {f"unet.{name}": torch.zeros_like(weight)}
    metadata = EditMetadata("uce", list(concepts), {}, fingerprints(pipe, changed_components(tensors)), str(model))
    save_edit(path, Edit(tensors, metadata))
    return path
