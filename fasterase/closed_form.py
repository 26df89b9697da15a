"""Closed-form ridge edits of the cross-attention key/value projections (UCE, MACE's refinement and
fusion), and a cache of preservation Grams.

Every to_k/to_v projection W (d_out x d) of a cross-attention layer reads the text embeddings c (d).
An edit asks the new W* to send edited tokens c_i to targets T_i, to keep preserved tokens c_p
where W sends them, and to stay near W:

    W* = argmin  sum_i |W* c_i - T_i|^2 + sum_p |W* c_p - W c_p|^2 + lambda |W* - W|^2
       = (lambda W + sum_i T_i c_i^T + W G_p) R^-1,   R = lambda I + sum_i c_i c_i^T + G_p,

with G_p = sum_p c_p c_p^T. Every projection reads the same embeddings, so the Gram matrices are
accumulated once and R is factored once (Cholesky). Two kinds of target keep the work per
projection to one matrix product:
- embedding targets T_i = W t_i (UCE; MACE's refinement; t_i the embedding of a guide or mapping
  concept): W* = W M, with one d x d matrix M = (lambda I + sum_i t_i c_i^T + G_p) R^-1 for all;
- LoRA targets T_i = (W + B_k A_k) c_i for the tokens of concept k (MACE's fusion,
  `fasterase.lora.fuse_loras`): W* = W + sum_k B_k (A_k G_k) R^-1, G_k = sum over concept k's
  tokens of c c^T. The rank-r factors of every projection and concept go through one solve as a
  stacked right-hand side; no dense B_k A_k is formed.
Sums and solves run in float64: text embeddings share a few dominant directions, so R is often
ill-conditioned, and there a float32 Cholesky fails or loses most of its digits. The solve is the
op `fasterase.kernels.ridge_solve` (plain PyTorch, or the CUDA extension).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .edits import encode_metadata, load_tagged, save_atomically
from .errors import UserError
from .kernels import ridge_solve
from .models.family import context_width, family_of
from .models.fingerprint import Fingerprints, checked, difference, fingerprints
from .models.text import encode_prompts

GRAM_FORMAT = "fasterase-gram"
# Rows of the symmetric Gram multiplied at once: wide enough for an efficient product, narrow
# enough that the products above the diagonal (the part thrown away) stay a small share.
GRAM_BLOCK = 128


def gram(x: torch.Tensor, weights: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
    """sum_n w_n y_n x_n^T over every leading index n, in float64, (d_y, d).

    x: (..., d) token embeddings. targets: y (..., d_y), the vector paired with each token; without
    it y = x and the result is symmetric. weights: broadcastable to x.shape[:-1]; a 0/1 mask
    selects tokens.
    """
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
    paired = rows if targets is None else targets.reshape(-1, targets.shape[-1]).to(torch.float64)
    if weights is not None:
        paired = paired * torch.broadcast_to(weights, x.shape[:-1]).reshape(-1, 1).to(torch.float64)
    if targets is not None:
        return paired.T @ rows
    # Symmetric: only the block rows of the lower triangle are multiplied (about half the work at
    # d = 768), then mirrored, which also makes the result exactly symmetric.
    dim = rows.shape[1]
    lower = rows.new_empty(dim, dim)
    for start in range(0, dim, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, dim)
        lower[start:stop, :stop] = paired[:, start:stop].T @ rows[:, :stop]
    return lower.tril() + lower.tril(-1).T


@dataclass
class RidgeGrams:
    """The token sums of an edit with embedding targets, shared by every projection: float64 (d, d).

    Over edited tokens c with target embeddings t and weights w: sources = sum w c c^T,
    cross = sum w t c^T, targets = sum w t t^T (only for reporting how well the edit fits).
    preserved = sum w c c^T over preserved tokens (add `gram`s or `prompt_gram`s to it). Batches of
    any number of prompts can be added one after another.
    """

    sources: torch.Tensor
    cross: torch.Tensor
    targets: torch.Tensor
    preserved: torch.Tensor

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str | None = None) -> "RidgeGrams":
        return cls(*(torch.zeros(dim, dim, dtype=torch.float64, device=device) for _ in range(4)))

    def add_edit(self, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Tokens c (..., d) to be sent where their targets t (..., d) are sent, weighted (...)."""
        if sources.shape != targets.shape:
            raise ValueError(f"sources {tuple(sources.shape)} and targets {tuple(targets.shape)} must pair one to one")
        self.sources += gram(sources, weights)
        self.cross += gram(sources, weights, targets)
        self.targets += gram(targets, weights)


def mapping_matrix(grams: RidgeGrams, lam: float, backend: str = "auto") -> torch.Tensor:
    """M (d x d, float64) with W* = W M for every projection: (lambda I + cross + preserved) R^-1,
    R = lambda I + sources + preserved.

    Solving for M's d rows and then multiplying every projection by M (`edit_weights`) costs less
    than solving the stacked rows of every projection (24,960 on SD1.x, against d = 768), and M is
    what `mapping_fit` reports on.
    """
    eye = torch.eye(grams.sources.shape[0], dtype=torch.float64, device=grams.sources.device)
    return ridge_solve(lam * eye + grams.cross + grams.preserved, [grams.sources, grams.preserved], lam, backend=backend)


def mapping_fit(grams: RidgeGrams, mapping: torch.Tensor) -> dict[str, float]:
    """How well M does what was asked, in the text-embedding space that every projection reads:
    "erased_residual", the share of the way from c to t left to go, sum w |M c - t|^2 / sum w |c - t|^2
    over edited tokens; "preserved_change", sum w |M c - c|^2 / sum w |c|^2 over preserved tokens."""
    # sum w |M c - t|^2 = tr(M S M^T) - 2 tr(M X^T) + tr(T), with S = sources, X = cross, T = targets
    residual = torch.trace(mapping @ grams.sources @ mapping.T) - 2 * torch.trace(mapping @ grams.cross.T) + torch.trace(grams.targets)
    distance = torch.trace(grams.sources) - 2 * torch.trace(grams.cross) + torch.trace(grams.targets)
    shift = mapping - torch.eye(mapping.shape[0], dtype=mapping.dtype, device=mapping.device)
    change, size = torch.trace(shift @ grams.preserved @ shift.T), torch.trace(grams.preserved)
    return {
        "erased_residual": float(residual / distance) if distance > 0 else 0.0,
        "preserved_change": float(change / size) if size > 0 else 0.0,
    }


def edit_weights(weights: dict[str, torch.Tensor], mapping: torch.Tensor) -> dict[str, torch.Tensor]:
    """W M for every projection W (d_out, d), in float64, each result in its weight's dtype and
    device. One product per projection: stacked, the float64 copies of SDXL's 340M key/value
    weights alone would take 2.7 GB (and as much for the product)."""
    return {name: (w.to(mapping.device, torch.float64) @ mapping).to(w.device, w.dtype) for name, w in weights.items()}


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


@torch.no_grad()
def prompt_gram(
    pipe, prompts: Iterable[str], batch_size: int = 256, progress: Callable[[int], object] | None = None
) -> torch.Tensor:
    """sum c c^T (float64, (d, d)) over every position of the prompts' text embeddings (start, words,
    end of text and padding, as the UNet reads them).

    Streams: prompts may be any iterable (the lines of a caption file), read and encoded batch_size
    at a time, so that only one batch's embeddings are ever held; progress(n) after each batch of n.
    """
    dim = context_width(pipe)
    total = torch.zeros(dim, dim, dtype=torch.float64, device=pipe.device)
    for batch in _batches(prompts, batch_size):
        total += gram(encode_prompts(pipe, batch, batch_size))
        if progress is not None:
            progress(len(batch))
    return total


def text_encoder_fingerprints(pipe) -> Fingerprints:
    """What a Gram of text embeddings depends on: the text encoders alone, not the UNet."""
    return fingerprints(pipe, family_of(pipe).text_encoders)


@dataclass
class PreservationGram:
    """sum c c^T over the token embeddings of many prompts (e.g. a caption set), kept to preserve
    what they generate; tied to the text encoder that embedded them."""

    gram: torch.Tensor  # (d, d) float64
    prompts: int
    tokens: int  # token embeddings summed: every position of every prompt
    text_encoder: Fingerprints  # text_encoder_fingerprints of the pipeline it came from
    model: str  # that pipeline's name, for messages


def preservation_gram(
    pipe, prompts: Iterable[str], model: str, batch_size: int = 256, progress: Callable[[int], object] | None = None
) -> PreservationGram:
    """The preservation Gram of `prompts` (any iterable, streamed as in `prompt_gram`)."""
    count = 0

    def counted(n: int) -> None:
        nonlocal count
        count += n
        if progress is not None:
            progress(n)

    total = prompt_gram(pipe, prompts, batch_size, counted).cpu()
    return PreservationGram(total, count, count * pipe.tokenizer.model_max_length, text_encoder_fingerprints(pipe), model)


def save_gram(path: str | os.PathLike, cache: PreservationGram) -> None:
    """Write a preservation Gram to `path` (.safetensors), atomically."""
    metadata = {"prompts": cache.prompts, "tokens": cache.tokens, "text_encoder": cache.text_encoder, "model": cache.model}
    save_atomically(Path(path), {"gram": cache.gram.to(torch.float64)}, encode_metadata(GRAM_FORMAT, metadata))


def load_gram(path: str | os.PathLike, pipe) -> PreservationGram:
    """The preservation Gram at `path`, refused unless it was made with `pipe`'s text encoder."""
    tensors, values = load_tagged(Path(path), GRAM_FORMAT)
    if "gram" not in tensors or any(key not in values for key in ("prompts", "tokens", "text_encoder", "model")):
        raise UserError(f"{path} lacks the gram tensor or its metadata")
    counts = (values["prompts"], values["tokens"])
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts) or not isinstance(values["model"], str):
        raise UserError(f"{path} has malformed metadata (prompts, tokens or model)")
    dim = context_width(pipe)
    gram_tensor = tensors["gram"]
    if gram_tensor.shape != (dim, dim) or not gram_tensor.is_floating_point() or not torch.isfinite(gram_tensor).all():
        raise UserError(f"{path}'s gram is not a finite {dim} x {dim} float matrix, as this model's text embeddings need")
    if reason := difference(checked(values["text_encoder"], str(path)), text_encoder_fingerprints(pipe)):
        raise UserError(f"{path} was made with the text encoder of '{values['model']}': {reason}")
    return PreservationGram(gram_tensor.to(torch.float64), *counts, values["text_encoder"], values["model"])


def preserved_prompts(cfg) -> list[str]:
    """The prompts a closed form keeps (UCE, MACE): the empty prompt, classifier-free guidance's
    unconditional branch (with `preserve_empty`), and every preserved concept in every template."""
    return [""] * cfg.preserve_empty + [t.format(p) for p in cfg.preserve for t in cfg.templates]


def weighted_grams(entries: list[tuple[str, float]], pipe) -> torch.Tensor | None:
    """sum w G over the preservation Grams at the (path, weight) entries (each refused unless made
    with `pipe`'s text encoder), float64 on pipe's device; None for no entries."""
    total = None
    for path, weight in entries:
        term = weight * load_gram(path, pipe).gram.to(pipe.device)
        total = term if total is None else total + term
    return total
