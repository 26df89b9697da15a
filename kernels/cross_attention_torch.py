"""The torch backend of cross_attention: PyTorch's fused attention wherever no statistics are asked for.

`scaled_dot_product_attention` never stores the attention matrix (flash or memory-efficient
kernels on CUDA, the flash kernel on the CPU) and brings its own backward, so a call without a
capture costs O(B H Mq D) memory instead of the reference's O(B H Mq (Mk + Mp)). Only a capture
pays for probabilities: it needs them, and gets them from the materialising reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .capture import AttentionStats, Capture
from .reference import cross_attention_reference


def cross_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    scale: float | None = None,
    capture: Capture | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """The contract of `cross_attention_reference` (shapes, dtypes, scale, capture)."""
    if capture is not None:
        return cross_attention_reference(q, k, v, prompt_k, prompt_v, scale, capture)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if prompt_k is not None:
        # SDPA takes one key set per batch item, so the shared prompt keys are repeated over the
        # batch: B*H*Mp*D values, small beside the B*H*Mq*Mp probabilities no longer stored.
        batch = q.shape[0]
        k = torch.cat([k, prompt_k.to(q.dtype).expand(batch, -1, -1, -1)], dim=2)
        v = torch.cat([v, prompt_v.to(q.dtype).expand(batch, -1, -1, -1)], dim=2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
