"""Writes a diffusers pipeline folder as an original-format single-file checkpoint, for tests.

The inverse of diffusers' conversions in `diffusers/loaders/single_file_utils.py`
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`), for the tensors SD1.x, SD2.x and SDXL-base pipelines have: the
names the original repositories (CompVis, Stability's generative-models) give them, so that
`from_single_file` converts them back to the folder's weights exactly.

    model.diffusion_model.*       the UNet: input_blocks / middle_block / output_blocks
    first_stage_model.*           the VAE: encoder.down.*.block / decoder.up.* (reversed) / mid.attn_1
    cond_stage_model.transformer.*  SD1.x's CLIP text encoder, transformers' names
    cond_stage_model.model.*      SD2.x's OpenCLIP text encoder (resblocks, fused in_proj)
    conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*   SDXL's two encoders
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import safetensors.torch
import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_LAYERS = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _load(folder: Path, component: str) -> dict[str, torch.Tensor]:
    (file,) = sorted((folder / component).glob("*.safetensors"))
    return safetensors.torch.load_file(str(file))


def _resnet(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_RESNET[layer]}.{param}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel names -> "model.diffusion_model." names.

    The original UNet numbers its blocks flat: input block 0 is conv_in, then each down block has
    layers_per_block (resnet, attention) pairs and, but the last, a downsampler; each up block one
    pair more, its upsampler after the attention where there is one."""
    per_block = config["layers_per_block"]
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, tensor in state.items():
        head, _, param = key.rpartition(".")
        if head in _UNET_LAYERS:
            new = f"{_UNET_LAYERS[head]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + block * (per_block + 1) + layer
            new = f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * (per_block + 1) + per_block}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * (per_block + 1) + layer
            new = f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(m[1])
            slot = 2 if block in up_has_attention else 1
            new = f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
        else:
            raise ValueError(f"no original name for UNet tensor {key}")
        out["model.diffusion_model." + new] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> "first_stage_model." names. The decoder's up blocks are
    numbered from the lowest resolution in diffusers, from the highest in the original; the
    mid-block attention is 1x1 convolutions there."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = tensor
    return out


def _bare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text-encoder names without "text_model." (transformers 5 writes both kinds)."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L as the original checkpoints hold it: transformers' names under `prefix`."""
    return {f"{prefix}text_model.{k}": v for k, v in _bare(state).items() if k != "embeddings.position_ids"}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel(WithProjection) as OpenCLIP names it under `prefix`: q, k and v fused into
    in_proj, the projection transposed (OpenCLIP multiplies x @ text_projection)."""
    state = _bare(state)
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state.pop("embeddings.position_ids", None)
    for key in sorted(state):
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            raise ValueError(f"no OpenCLIP name for text-encoder tensor {key}")
        layer, module, param = m.groups()
        block = f"{prefix}transformer.resblocks.{layer}."
        if module == "self_attn.q_proj":
            parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"{block}attn.in_proj_{param}"] = torch.cat(parts)
        elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
            out[f"{block}{_OPENCLIP_LAYER[module]}.{param}"] = state[key]
    return out


def write_single_file(folder: Path, path: Path, family: str = "sd1") -> Path:
    """Write the pipeline in `folder` (safetensors weights) as one original-format .safetensors
    file at `path`. family: "sd1" (CLIP), "sd2" (the text encoder as OpenCLIP) or "sdxl"."""
    folder, path = Path(folder), Path(path)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    tensors = {**unet_to_ldm(_load(folder, "unet"), unet_config), **vae_to_ldm(_load(folder, "vae"), vae_config)}
    if family == "sd1":
        tensors |= clip_to_ldm(_load(folder, "text_encoder"), "cond_stage_model.transformer.")
    elif family == "sd2":
        tensors |= open_clip_to_ldm(_load(folder, "text_encoder"), "cond_stage_model.model.")
    elif family == "sdxl":
        tensors |= clip_to_ldm(_load(folder, "text_encoder"), "conditioner.embedders.0.transformer.")
        tensors |= open_clip_to_ldm(_load(folder, "text_encoder_2"), "conditioner.embedders.1.model.")
    else:
        raise ValueError(f"unknown family {family!r}")
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
