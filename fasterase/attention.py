"""Attention processors for diffusers' cross-attention layers (attn2), built on `fasterase.kernels`.

Only cross-attention is replaced; self-attention keeps the library's processor. Processors are set
through `set_attn_processor` and restored when the `cross_attention_processors` block ends.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from . import kernels
from .kernels import AttentionStats, Capture
from .names import INJECTION_SITES, is_cross_attention



class LearnedPrompt(nn.Module):
    """KPOP's learnable prompt, in the text-embedding space.

    mode "concat": `length` tokens appended to the text tokens before the key and value
    projections (the attention then runs over 77 + length keys). mode "additive": one token per
    text position, added to the text embedding.
    """

    def __init__(self, mode: str, length: int, dim: int, init: torch.Tensor | None = None):
        super().__init__()
        if mode not in ("concat", "additive"):
            raise ValueError(f"prompt mode must be 'concat' or 'additive', not {mode!r}")
        self.mode = mode
        # float32 whatever the model's dtype: trained, it is its own master copy
        self.tokens = nn.Parameter(torch.zeros(length, dim) if init is None else init.to(torch.float32, copy=True))
        # Items [active_from:] of a batch see the prompt; None switches it off. A Python int, so a
        # step that mixes items with and without the prompt keeps static shapes and no host sync.
        self.active_from: int | None = None

    @contextlib.contextmanager
    def active(self, start: int = 0) -> Iterator[None]:
        previous, self.active_from = self.active_from, start
        try:
            yield
        finally:
            self.active_from = previous


@dataclass
class AttentionCapture:
    """Watch the attention that image positions pay to chosen text tokens, in every cross-attention
    layer of a UNet forward, without keeping attention matrices.

    columns: (B, Mk) bool, the watched text tokens of each batch item (see `models.text.token_columns`).
    masks: optional (B, 1, h, w) weights in [0, 1] over the image (the concept's pixels), resized
        to each layer's query grid; the statistics then count only those positions.
    stats: what each layer recorded, in call order; clear it before each forward.
    """

    columns: torch.Tensor
    masks: torch.Tensor | None = None
    maps: bool = False
    stats: list[AttentionStats] = field(default_factory=list)

    def request(self, queries: int) -> Capture:
        """The kernel's capture request for a layer with `queries` image positions."""
        return Capture(self.columns, None if self.masks is None else self._rows(queries), self.maps)

    def _rows(self, queries: int) -> torch.Tensor:
        height, width = self.masks.shape[-2:]
        rows = round(math.sqrt(queries * height / width))
        grid = nn.functional.interpolate(self.masks.float(), size=(rows, queries // rows), mode="area")
        return grid.flatten(1)

    def watched_sq(self) -> torch.Tensor:
        """(B,): sum over layers and heads of the squared attention on the watched tokens, the
        loss of attention re-steering (FMN) and of MACE's LoRAs."""
        return torch.stack([s.watched_sq.sum(1) for s in self.stats]).sum(0)


@dataclass
class CrossAttentionProcessor:
    """Cross-attention through `fasterase.kernels.cross_attention`, optionally with a learned prompt.

    Follows diffusers' processor contract: `__call__(attn, hidden_states, encoder_hidden_states, ...)`.
    """

    backend: str = "auto"
    prompt: LearnedPrompt | None = None
    capture: AttentionCapture | None = None

    def __post_init__(self):
        if self.prompt is not None and self.capture is not None:
            raise ValueError("a cross-attention layer either carries a learned prompt or captures statistics, not both")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("CrossAttentionProcessor is for cross-attention layers (attn2) only")
        if attention_mask is not None:
            raise ValueError("CrossAttentionProcessor does not support masks on the text keys")
        residual = hidden_states
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch = hidden_states.shape[0]
        heads = attn.heads
        start = None if self.prompt is None else self.prompt.active_from
        text = encoder_hidden_states
        if start is not None and self.prompt.mode == "additive":
            tokens = self.prompt.tokens.to(text.dtype)
            text = torch.cat([text[:start], text[start:] + tokens[: text.shape[1]]])

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # (B, M, H*D) -> (B, H, M, D)
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split_heads(attn.to_q(hidden_states)), split_heads(attn.to_k(text)), split_heads(attn.to_v(text))
        if start is not None and self.prompt.mode == "concat":
            tokens = self.prompt.tokens.to(text.dtype)
            prompt_k = attn.to_k(tokens).view(-1, heads, q.shape[-1]).transpose(0, 1)  # (H, Mp, D)
            prompt_v = attn.to_v(tokens).view(-1, heads, q.shape[-1]).transpose(0, 1)
            parts = []
            if start > 0:
                parts.append(kernels.cross_attention(q[:start], k[:start], v[:start], scale=attn.scale, backend=self.backend))
            if start < batch:
                parts.append(kernels.cross_attention(
                    q[start:], k[start:], v[start:], prompt_k=prompt_k, prompt_v=prompt_v, scale=attn.scale, backend=self.backend
                ))
            out = torch.cat(parts) if len(parts) > 1 else parts[0]
        elif self.capture is not None:
            out, stats = kernels.cross_attention(q, k, v, scale=attn.scale, capture=self.capture.request(q.shape[2]), backend=self.backend)
            self.capture.stats.append(stats)
        else:
            out = kernels.cross_attention(q, k, v, scale=attn.scale, backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def cross_attention_processors(unet, make: Callable[[str], object | None]) -> Iterator[None]:
    """Sets `make(name)` on every cross-attention layer where it returns a processor; restores
    the previous processors on exit."""
    original = dict(unet.attn_processors)
    replaced = dict(original)
    for name in original:
        if is_cross_attention(name) and (processor := make(name)) is not None:
            replaced[name] = processor
    unet.set_attn_processor(replaced)
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def prompt_processors(unet, prompt: LearnedPrompt, inject: str, backend: str = "auto"):
    """The processors block that injects `prompt` at `inject` ("mid", "mid_up", "all") and runs
    the other cross-attention layers on `backend` too."""
    if inject not in INJECTION_SITES:
        raise ValueError(f"inject must be one of {', '.join(INJECTION_SITES)}, not {inject!r}")
    sites = INJECTION_SITES[inject]
    return cross_attention_processors(
        unet, lambda name: CrossAttentionProcessor(backend, prompt if name.startswith(sites) else None)
    )


def capture_processors(unet, capture: AttentionCapture, backend: str = "auto"):
    """The processors block in which every cross-attention layer records into `capture`."""
    return cross_attention_processors(unet, lambda name: CrossAttentionProcessor(backend, capture=capture))


def backend_processors(unet, backend: str):
    """The processors block that runs every cross-attention layer on `backend`; None when
    `backend` is "auto" and diffusers' own processor may stay."""
    if backend == "auto":
        return contextlib.nullcontext()
    return cross_attention_processors(unet, lambda name: CrossAttentionProcessor(backend))
