"""Named sets of UNet parameters that methods train: the sets the papers name, in one place."""

from __future__ import annotations

from torch import nn

from ..attention import is_cross_attention
from ..errors import UserError

_CROSS_ATTENTION_KV = (".attn2.to_k.", ".attn2.to_v.")

# name -> whether a parameter name belongs to the set
PARAMETER_SETS = {
    "cross_attention": is_cross_attention,
    "cross_attention_kv": lambda name: any(part in name for part in _CROSS_ATTENTION_KV),
    "non_cross_attention": lambda name: not is_cross_attention(name),
    "all": lambda name: True,
}


def select_parameters(module: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The parameters of `module` in the named set, by name."""
    if which not in PARAMETER_SETS:
        raise UserError(f"unknown parameter set {which!r}; known: {', '.join(PARAMETER_SETS)}")
    belongs = PARAMETER_SETS[which]
    return {name: p for name, p in module.named_parameters() if belongs(name)}
