"""Plain-PyTorch references: the ground truth that every fast backend is tested against.

They materialise the attention matrix, so they run anywhere and cost O(B H Mq Mk) memory.
"""

from __future__ import annotations

import torch

from .capture import AttentionStats, Capture


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    scale: float | None = None,
    capture: Capture | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """softmax(q [k; prompt_k]^T * scale) [v; prompt_v], in float32, returned in q's dtype; with
    `capture`, also the attention statistics of its watched text columns.

    q: (B, H, Mq, D); k, v: (B, H, Mk, D); prompt_k, prompt_v: (H, Mp, D), shared by the batch.
    """
    text_columns = k.shape[2]
    if prompt_k is not None:
        batch = q.shape[0]
        k = torch.cat([k, prompt_k.expand(batch, -1, -1, -1).to(k.dtype)], dim=2)
        v = torch.cat([v, prompt_v.expand(batch, -1, -1, -1).to(v.dtype)], dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)  # (B, H, Mq, Mk [+ Mp])
    out = (probs @ v.float()).to(q.dtype)
    if capture is None:
        return out
    text = probs[..., :text_columns]
    rows = torch.ones(text.shape[0], text.shape[2], device=text.device) if capture.rows is None else capture.rows.float()
    rows = rows[:, None, :, None]  # (B, 1, Mq, 1)
    column_mass = (text * rows).sum(2)
    column_sq = (text.square() * rows).sum(2)
    watched_sq = (column_sq * capture.column_weights(text_columns)[:, None, :]).sum(-1)
    maps = None
    if capture.maps:
        index = capture.columns.clamp(min=0)[:, None, None, :].expand(-1, text.shape[1], text.shape[2], -1)
        maps = text.gather(3, index) * (capture.columns >= 0)[:, None, None, :]
    return out, AttentionStats(watched_sq, column_mass, column_sq, maps)
