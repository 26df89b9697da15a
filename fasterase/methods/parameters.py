"""The UNet parameters of a named set (`fasterase.names.PARAMETER_SETS`), which methods train."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from ..names import PARAMETER_SETS


def select_parameters(module: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The parameters of `module` in the named set, by name."""
    if which not in PARAMETER_SETS:
        raise UserError(f"unknown parameter set {which!r}; known: {', '.join(PARAMETER_SETS)}")
    belongs = PARAMETER_SETS[which]
    return {name: p for name, p in module.named_parameters() if belongs(name)}
