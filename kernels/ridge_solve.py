"""The ridge solve shared by every cross-attention projection: X (lambda I + sum_i G_i) = B.

UCE and MACE replace each key/value projection W by W* = (lambda W + targets) R^-1 with
R = lambda I + sum c c^T + G_p built from text embeddings alone, so R is the same for every
projection (see `fasterase.closed_form`). This op takes R's pieces once (the d x d Grams G_i and
lambda), factors R once (Cholesky, float64) and solves every stacked right-hand-side row B (R, d)
in one call: the rows of all projections, or the d rows of one mapping matrix that every
projection then multiplies (when there are more stacked rows than d, that is fewer operations).

Backends: `torch`, the plain-PyTorch reference; `cuda`, the C++ op `fasterase::ridge_solve`
(csrc/ridge_solve.cpp, the same steps through ATen's cuSOLVER/cuBLAS calls), which needs the
extension `fasterase._C` and CUDA tensors. The op's schema and fake implementation are defined
here, so the op composes with torch.compile whether or not the extension is built; the reference
is registered as its CPU kernel.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fasterase.errors import UserError

OP = "fasterase::ridge_solve"


def _ridge_solve_fake(rhs: torch.Tensor, grams: list[torch.Tensor], lam: float) -> torch.Tensor:
    torch._check(rhs.dim() == 2, lambda: f"{OP}: rhs must be (rows, d), not {tuple(rhs.shape)}")
    return rhs.new_empty(rhs.shape, dtype=torch.float64)


class NotPositiveDefinite(Exception):
    """The system's Cholesky factorisation failed: `ridge_solve` says why and which lambda would do."""


def _unsolvable(grams: list[torch.Tensor], lam: float) -> str:
    """Why lam I + sum(grams) cannot be factored, and a lambda that makes it solvable: the Grams
    span too few directions (fewer independent tokens than dimensions) or are not semi-definite."""
    eigenvalues = torch.linalg.eigvalsh(sum(g.to(torch.float64) for g in grams).cpu())
    top, dim = float(eigenvalues[-1]), eigenvalues.numel()
    # Directions below 1e-12 of the largest are lost to float64 round-off in the factorisation.
    spanned = int((eigenvalues > 1e-12 * max(top, 0.0)).sum())
    enough = max(1e-6 * top, 0.0) - min(float(eigenvalues[0]), 0.0)
    return (
        f"the ridge system is not positive definite with lambda {lam}: its tokens span {spanned} of {dim} directions; "
        f"lambda {enough:.1g} or more makes it solvable" if enough > 0 else f"the ridge system is not positive definite with lambda {lam}; raise lambda"
    )


def ridge_solve_reference(rhs: torch.Tensor, grams: list[torch.Tensor], lam: float) -> torch.Tensor:
    """X (R, d) float64, contiguous, with X (lam I + sum(grams)) = rhs; rhs (R, d), grams (d, d).

    Float64 throughout: text embeddings share a few dominant directions, so the system is often
    ill-conditioned, and there a float32 Cholesky fails or loses most of its digits. Raises
    NotPositiveDefinite where the factorisation fails.
    """
    system = lam * torch.eye(rhs.shape[1], dtype=torch.float64, device=rhs.device)
    for gram in grams:
        system = system + gram.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(system)  # reads the lower triangle
    if info.item():
        raise NotPositiveDefinite
    # X S = B with S symmetric is S X^T = B^T: every stacked row is one column of a single solve.
    return torch.cholesky_solve(rhs.to(torch.float64).T, factor).T.contiguous()


# Registered once per process: run from the repository's root, this folder is also importable as
# the top-level package `kernels` (transformers probes for a package of that name), and then this
# module runs twice.
if not hasattr(torch.ops.fasterase, "ridge_solve"):
    torch.library.define(OP, "(Tensor rhs, Tensor[] grams, float lam) -> Tensor")
    torch.library.register_fake(OP, _ridge_solve_fake)
    torch.library.register_kernel(OP, "cpu", ridge_solve_reference)


def ridge_solve_cuda(rhs: torch.Tensor, grams: list[torch.Tensor], lam: float) -> torch.Tensor:
    """The C++ op on CUDA tensors; its not-positive-definite failure becomes the reference's."""
    try:
        return torch.ops.fasterase.ridge_solve(rhs, grams, lam)
    except RuntimeError as error:
        if "not positive definite" in str(error):
            raise NotPositiveDefinite from None
        raise


def ridge_solve(rhs: torch.Tensor, grams: Sequence[torch.Tensor], lam: float, *, backend: str = "auto") -> torch.Tensor:
    """X with X (lam I + sum(grams)) = rhs: the ridge solve of every stacked right-hand-side row.

    rhs: (R, d), any floating dtype; grams: (d, d) symmetric positive semi-definite pieces of the
    system (float64 keeps their digits), on rhs's device; lam >= 0 (0 where the Grams alone are
    positive definite). Returns X (R, d) float64 on rhs's device. UserError when the system is not
    positive definite even in float64, saying which lambda would do.
    """
    if rhs.dim() != 2 or not rhs.is_floating_point():
        raise ValueError(f"ridge_solve: rhs must be a floating (rows, d) matrix, not {rhs.dtype} of shape {tuple(rhs.shape)}")
    d, grams = rhs.shape[1], list(grams)
    for i, gram in enumerate(grams):
        if gram.shape != (d, d) or gram.device != rhs.device:
            raise ValueError(f"ridge_solve: gram {i} is {tuple(gram.shape)} on {gram.device}; each must be ({d}, {d}) on {rhs.device}, like rhs's columns")
    if not lam >= 0:
        raise ValueError(f"ridge_solve: lambda must be at least 0, not {lam}")
    # dispatch imports this module's implementations
    from .dispatch import implementation

    try:
        return implementation("ridge_solve", backend, rhs)(rhs, grams, float(lam))
    except NotPositiveDefinite:
        raise UserError(_unsolvable(grams, lam)) from None
