"""fasterase's attention and solver ops, each with a plain-PyTorch reference, behind one dispatcher.

Backends: `torch` (runs everywhere: PyTorch's fused attention, the reference where statistics are
captured), `triton`, `cuda` (the compiled extension). `auto` picks the first backend that can run
the given inputs; a forced backend that cannot run raises `BackendUnavailable` with its reasons.
`backend_for` maps a run-wide choice onto an op (ops not written in the chosen backend run torch).
"""

from __future__ import annotations

import torch

from .capture import AttentionStats, Capture
from .dispatch import BACKEND_NAMES, BackendUnavailable, backend_for, backend_status, implementation
from .reference import cross_attention_reference
from .ridge_solve import ridge_solve, ridge_solve_reference

__all__ = [
    "AttentionStats",
    "BACKEND_NAMES",
    "Capture",
    "BackendUnavailable",
    "backend_for",
    "backend_status",
    "cross_attention",
    "cross_attention_reference",
    "ridge_solve",
    "ridge_solve_reference",
]


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    scale: float | None = None,
    capture: Capture | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, AttentionStats]:
    """Cross-attention of image queries over text keys, optionally concatenated with a prompt.

    q: (B, H, Mq, D); k, v: (B, H, Mk, D); prompt_k, prompt_v: (H, Mp, D), shared by the batch
    and never repeated over it by the fast backends. fp32, fp16 or bf16; returns (B, H, Mq, D)
    in q's dtype. With `capture` (see `Capture`), returns (output, AttentionStats); gradients flow
    through the statistics too.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"cross_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit (B, H, M, D)")
    if (prompt_k is None) != (prompt_v is None):
        raise ValueError("cross_attention: give both prompt_k and prompt_v, or neither")
    if prompt_k is not None and (prompt_k.shape != prompt_v.shape or prompt_k.shape[0] != q.shape[1] or prompt_k.shape[-1] != q.shape[-1]):
        raise ValueError(f"cross_attention: prompt_k {tuple(prompt_k.shape)} does not fit (H={q.shape[1]}, Mp, D={q.shape[-1]})")
    if capture is not None:
        capture.check(q.shape[0], q.shape[2], k.shape[2])
    op = implementation("cross_attention", backend, q, (q, k, v, prompt_k, prompt_v, scale, capture))
    return op(q, k, v, prompt_k, prompt_v, scale, capture)
