"""What cross-attention can record besides its output: the attention paid to chosen text columns.

Forget-Me-Not and MACE minimise the attention image positions pay to a concept's tokens; the
statistics below are what their losses are made of, so a backend never has to return the attention
matrix. Every backend takes a `Capture` and returns `AttentionStats` with the same meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class Capture:
    """Which text key columns to watch, per batch item, and how to weigh the query rows.

    columns: (B, Mk) bool, the watched columns of each item's text keys (prompt columns are never
        watched); or (B, W) long column indices, -1 for an unused slot, when `maps` should have
        one slice per watched column.
    rows: optional (B, Mq) float weights of the query rows (a 0/1 mask restricts the statistics to
        the concept's pixels); all ones when None.
    maps: whether to also return the probabilities on the watched columns (for pictures).
    """

    columns: torch.Tensor
    rows: torch.Tensor | None = None
    maps: bool = False

    def column_weights(self, text_columns: int) -> torch.Tensor:
        """(B, Mk) float: 1 on the watched columns, 0 elsewhere."""
        if self.columns.dtype == torch.bool:
            return self.columns.float()
        index = self.columns.clamp(min=0)
        valid = (self.columns >= 0).float()
        weights = torch.zeros(self.columns.shape[0], text_columns, device=self.columns.device)
        return weights.scatter_add_(1, index, valid).clamp(max=1)

    def check(self, batch: int, queries: int, text_columns: int) -> None:
        shape = tuple(self.columns.shape)
        if self.columns.dtype == torch.bool:
            if shape != (batch, text_columns):
                raise ValueError(f"capture columns {shape} (bool) must be (B={batch}, Mk={text_columns})")
        elif self.columns.dtype == torch.long:
            if self.columns.dim() != 2 or shape[0] != batch:
                raise ValueError(f"capture columns {shape} (indices) must be (B={batch}, W)")
        else:
            raise ValueError(f"capture columns must be bool or long, not {self.columns.dtype}")
        if self.maps and self.columns.dtype != torch.long:
            raise ValueError("capture maps need the columns as indices (B, W)")
        if self.rows is not None and tuple(self.rows.shape) != (batch, queries):
            raise ValueError(f"capture rows {tuple(self.rows.shape)} must be (B={batch}, Mq={queries})")


class AttentionStats(NamedTuple):
    """Sums over the (weighted) query rows, in float32.

    watched_sq: (B, H), sum of P^2 over the watched columns: the re-steering (FMN) and MACE losses.
    column_mass: (B, H, Mk), sum of P per text column.
    column_sq: (B, H, Mk), sum of P^2 per text column.
    maps: (B, H, Mq, W), P on the watched columns (zeros in unused slots), only when asked.
    """

    watched_sq: torch.Tensor
    column_mass: torch.Tensor
    column_sq: torch.Tensor
    maps: torch.Tensor | None = None
