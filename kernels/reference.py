"""Plain-PyTorch references: the ground truth that every fast backend is tested against.

They materialise the attention matrix, so they run anywhere and cost O(B H Mq Mk) memory.
"""

from __future__ import annotations

import torch


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q [k; prompt_k]^T * scale) [v; prompt_v], in float32, returned in q's dtype.

    q: (B, H, Mq, D); k, v: (B, H, Mk, D); prompt_k, prompt_v: (H, Mp, D), shared by the batch.
    """
    if prompt_k is not None:
        batch = q.shape[0]
        k = torch.cat([k, prompt_k.expand(batch, -1, -1, -1).to(k.dtype)], dim=2)
        v = torch.cat([v, prompt_v.expand(batch, -1, -1, -1).to(v.dtype)], dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)  # (B, H, Mq, Mk [+ Mp])
    return (probs @ v.float()).to(q.dtype)
