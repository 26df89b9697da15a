"""Names of model parts and of option values, as plain data and tests on strings.

The torch code and the configs both read them from here, and nothing here imports torch, so that
the CLI and the API check a whole config (`fasterase.methods.configs`) in a fraction of a second,
before the heavy imports.
"""

from __future__ import annotations

import re

DTYPE_NAMES = ("float32", "float16", "bfloat16")
# the kernel backends (`fasterase.kernels.dispatch`); "auto" chooses among them
BACKEND_NAMES = ("torch", "triton", "cuda")
# the text-encoder components of any model family (`fasterase.models.family`)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# What an image method's `masks` names besides a folder (`fasterase.concept_images`)
MASK_SOURCES = ("attention", "none")

# Where a learned prompt goes, by the names diffusers gives the UNet's attention layers.
INJECTION_SITES = {
    "mid": ("mid_block.",),
    "mid_up": ("mid_block.", "up_blocks."),
    "all": ("down_blocks.", "mid_block.", "up_blocks."),
}


def is_cross_attention(name: str) -> bool:
    """Whether a name from `unet.attn_processors` or `unet.named_parameters` is in a cross-attention layer."""
    return ".attn2." in name or name.endswith(".attn2.processor")


_CROSS_ATTENTION_KV = (".attn2.to_k.", ".attn2.to_v.")

# Named sets of UNet parameters that methods train, the sets the papers name:
# name -> whether a parameter name belongs to the set.
PARAMETER_SETS = {
    "cross_attention": is_cross_attention,
    "cross_attention_kv": lambda name: any(part in name for part in _CROSS_ATTENTION_KV),
    "non_cross_attention": lambda name: not is_cross_attention(name),
    "all": lambda name: True,
}


_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer of a text-encoder parameter name ("...layers.11.mlp..." -> 11), or None."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


# Named sets of text-encoder parameters (few-shot unlearning): name -> whether a parameter name
# belongs to the set, given the index of the encoder's last layer.
TEXT_ENCODER_SETS = {
    "mlp_last_attention": lambda name, last: ".mlp." in name or (".self_attn." in name and layer_index(name) == last),
    "mlp": lambda name, last: ".mlp." in name,
    "attention": lambda name, last: ".self_attn." in name,
    "mlp_attention": lambda name, last: ".mlp." in name or ".self_attn." in name,
    "all": lambda name, last: True,
}
