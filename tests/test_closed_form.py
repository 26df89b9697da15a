"""The ridge solver (`fasterase.kernels.ridge_solve` and the edits built on it) against the dense
float64 formula, on random and ill-conditioned systems, on every backend that runs here; and the
preservation Gram cache."""

from __future__ import annotations

import copy
import os
import types

import pytest
import torch

from fasterase.closed_form import (
    PreservationGram,
    RidgeGrams,
    edit_weights,
    gram,
    load_gram,
    mapping_fit,
    mapping_matrix,
    preservation_gram,
    prompt_gram,
    save_gram,
)
from fasterase.errors import UserError
from fasterase.kernels import BackendUnavailable, backend_for, backend_status, ridge_solve

F64 = torch.float64
CUDA_SOLVE = backend_status()["ridge_solve"]["cuda"]
cuda_only = pytest.mark.skipif(CUDA_SOLVE != "available", reason=f"ridge_solve [cuda] is {CUDA_SOLVE}")
BACKENDS = ["torch", pytest.param("cuda", marks=cuda_only)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def dense_ridge(weight, lam, sources, targets, preserved):
    """The formula as written: (lambda W + sum T_i c_i^T + W G_p)(lambda I + sum c_i c_i^T + G_p)^-1,
    sources (n, d), targets T (n, d_out), preserved (m, d), all float64."""
    eye = torch.eye(weight.shape[1], dtype=F64)
    left = lam * weight + targets.T @ sources + weight @ preserved.T @ preserved
    right = lam * eye + sources.T @ sources + preserved.T @ preserved
    return left @ torch.linalg.inv(right)


def projections(generator, dims=(24, 40, 24), d=32):
    return {f"p{i}": torch.randn(rows, d, generator=generator, dtype=F64) for i, rows in enumerate(dims)}


def test_gram_with_weights_and_targets():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 6, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.5
    w = mask * 0.3
    rows, paired, weights = x.reshape(-1, 8).double(), y.reshape(-1, 6).double(), w.reshape(-1).double()
    expected = sum(weights[n] * torch.outer(paired[n], rows[n]) for n in range(15))
    assert torch.allclose(gram(x, w, y), expected, rtol=1e-12, atol=1e-12)
    symmetric = gram(x, mask)
    assert torch.equal(symmetric, symmetric.T)
    assert torch.allclose(symmetric, rows[mask.flatten()].T @ rows[mask.flatten()], rtol=1e-12, atol=1e-12)
    assert torch.allclose(gram(x, torch.tensor(2.0)), 2 * rows.T @ rows, rtol=1e-12)


def test_symmetric_gram_over_several_blocks():
    """Only the lower triangle's block rows are multiplied: blocks, the ragged last one and the
    mirroring must give the whole product."""
    from fasterase.closed_form import GRAM_BLOCK

    g = torch.Generator().manual_seed(5)
    d = 2 * GRAM_BLOCK + 37
    x, w = torch.randn(2, 25, d, generator=g), torch.rand(2, 25, generator=g)
    rows, weights = x.reshape(-1, d).double(), w.reshape(-1, 1).double()
    symmetric = gram(x, w)
    assert torch.equal(symmetric, symmetric.T)
    assert torch.allclose(symmetric, (weights * rows).T @ rows, rtol=1e-12, atol=1e-12)


def test_embedding_targets_match_the_dense_formula_on_a_random_system():
    g = torch.Generator().manual_seed(1)
    d, lam = 32, 0.5
    c, t, p = (torch.randn(n, d, generator=g, dtype=F64) for n in (12, 12, 40))
    weights = projections(g, d=d)
    grams = RidgeGrams.zeros(d)
    for part in range(0, 12, 5):  # streamed in batches: the same sums
        grams.add_edit(c[part : part + 5], t[part : part + 5])
    grams.preserved += gram(p)
    edited = edit_weights(weights, mapping_matrix(grams, lam))
    for name, w in weights.items():
        expected = dense_ridge(w, lam, c, t @ w.T, p)
        assert relative(edited[name], expected) < 1e-12, name


def test_float32_weights_come_back_in_their_dtype():
    g = torch.Generator().manual_seed(2)
    c, t = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    grams = RidgeGrams.zeros(16)
    grams.add_edit(c, t)
    w = torch.randn(8, 16, generator=g)
    edited = edit_weights({"w": w}, mapping_matrix(grams, 0.1))["w"]
    assert edited.dtype == torch.float32
    expected = dense_ridge(w.double(), 0.1, c.double(), t.double() @ w.double().T, torch.zeros(0, 16, dtype=F64))
    assert relative(edited.double(), expected) < 1e-6


def ill_conditioned(generator, d=48):
    """Text embeddings as they are: a few dominant shared directions (norm ~10) and a faint rest
    (1e-4), with a small lambda, so that R's condition number is about 1e11-1e12."""
    basis = torch.randn(4, d, generator=generator, dtype=F64)

    def tokens(n):
        return 10 * torch.randn(n, 4, generator=generator, dtype=F64) @ basis + 1e-4 * torch.randn(n, d, generator=generator, dtype=F64)

    return tokens(30), tokens(30), tokens(50)


def test_ill_conditioned_system_needs_float64():
    g = torch.Generator().manual_seed(3)
    d, lam = 48, 1e-6
    c, t, p = ill_conditioned(g, d)
    weights = projections(g, d=d)
    right = lam * torch.eye(d, dtype=F64) + c.T @ c + p.T @ p
    condition = torch.linalg.cond(right).item()
    assert condition > 1e10
    grams = RidgeGrams.zeros(d)
    grams.add_edit(c, t)
    grams.preserved += gram(p)
    edited = edit_weights(weights, mapping_matrix(grams, lam))
    eps = torch.finfo(F64).eps
    for name, w in weights.items():
        left = lam * w + w @ t.T @ c + w @ p.T @ p
        # backward stable: the normal equations hold to rounding, whatever the conditioning
        assert ((edited[name] @ right - left).norm() / (edited[name].norm() * right.norm())).item() < 100 * eps
        # forward: as close to the dense float64 reference as the conditioning allows
        assert relative(edited[name], dense_ridge(w, lam, c, t @ w.T, p)) < 10 * condition * eps
    # the same system in float32 cannot be factored, and an LU solve of it is garbage
    _, info = torch.linalg.cholesky_ex(right.float())
    assert info.item() != 0
    w = weights["p0"]
    left = lam * w + w @ t.T @ c + w @ p.T @ p
    float32 = torch.linalg.solve(right.float(), left.float().T).T.double()
    assert relative(float32, dense_ridge(w, lam, c, t @ w.T, p)) > 0.1


def stacked_rhs(weights, lam, sources, targets, preserved):
    """Every projection's rows of lambda W + sum T_i c_i^T + W G_p, stacked: (sum d_out, d)."""
    return torch.cat([lam * w + targets[name].T @ sources + w @ preserved.T @ preserved for name, w in weights.items()])


def solve_stacked(weights, backend, rhs, grams, lam):
    device = "cuda" if backend == "cuda" else "cpu"
    solved = ridge_solve(rhs.to(device), [g.to(device) for g in grams], lam, backend=backend)
    assert solved.dtype == F64 and solved.shape == rhs.shape and solved.device.type == device
    return dict(zip(weights, solved.cpu().split([w.shape[0] for w in weights.values()])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_solve_matches_the_dense_formula_on_a_random_system(backend):
    """All projections in one solve, with general targets T_i (UCE's W t_i and MACE's (W + B A) c_i
    are special cases), against (lambda W + sum T_i c_i^T + W G_p)(lambda I + sum c_i c_i^T + G_p)^-1."""
    g = torch.Generator().manual_seed(6)
    d, lam = 32, 0.5
    c, p = torch.randn(12, d, generator=g, dtype=F64), torch.randn(40, d, generator=g, dtype=F64)
    weights = projections(g, d=d)
    targets = {name: torch.randn(12, w.shape[0], generator=g, dtype=F64) for name, w in weights.items()}
    rhs = stacked_rhs(weights, lam, c, targets, p)
    edited = solve_stacked(weights, backend, rhs, [gram(c), gram(p)], lam)
    for name, w in weights.items():
        assert relative(edited[name], dense_ridge(w, lam, c, targets[name], p)) < 1e-12, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_solve_on_an_ill_conditioned_system(backend):
    """Condition number about 1e7: the normal equations hold to rounding (backward stable), and the
    result is as close to the dense float64 reference as the conditioning allows."""
    g = torch.Generator().manual_seed(7)
    d, lam = 48, 1e-2
    basis = torch.randn(4, d, generator=g, dtype=F64)
    c, p = (10 * torch.randn(n, 4, generator=g, dtype=F64) @ basis + 1e-3 * torch.randn(n, d, generator=g, dtype=F64) for n in (30, 50))
    right = lam * torch.eye(d, dtype=F64) + c.T @ c + p.T @ p
    condition = torch.linalg.cond(right).item()
    assert 1e6 < condition < 1e8
    weights = projections(g, d=d)
    targets = {name: c @ w.T + torch.randn(30, w.shape[0], generator=g, dtype=F64) for name, w in weights.items()}
    rhs = stacked_rhs(weights, lam, c, targets, p)
    edited = solve_stacked(weights, backend, rhs, [gram(c), gram(p)], lam)
    eps = torch.finfo(F64).eps
    for (name, w), rows in zip(weights.items(), rhs.split([w.shape[0] for w in weights.values()])):
        assert ((edited[name] @ right - rows).norm() / (edited[name].norm() * right.norm())).item() < 100 * eps
        assert relative(edited[name], dense_ridge(w, lam, c, targets[name], p)) < 10 * condition * eps


@pytest.mark.parametrize("backend", BACKENDS)
def test_solve_op_schema_and_fake(backend):
    """The registered op fasterase::ridge_solve: schema, fake implementation (torch.compile) and
    kernel agree (torch.library.opcheck); on CPU its kernel is the reference."""
    device = "cuda" if backend == "cuda" else "cpu"
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 16, generator=g, dtype=F64)
    rhs = torch.randn(9, 16, generator=g).to(device)
    torch.library.opcheck(torch.ops.fasterase.ridge_solve.default, (rhs, [gram(x).to(device), torch.eye(16, dtype=F64, device=device)], 0.3))


def test_solve_dispatch_reports_why_a_backend_cannot_run():
    status = backend_status()["ridge_solve"]
    assert status["torch"] == "available"
    assert "ridge_solve is not written in triton" in status["triton"]
    rhs, grams = torch.randn(3, 4), [torch.eye(4, dtype=F64)]
    with pytest.raises(BackendUnavailable, match="triton"):
        ridge_solve(rhs, grams, 0.5, backend="triton")
    if CUDA_SOLVE != "available":
        assert CUDA_SOLVE.startswith("unavailable, because")
        with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run ridge_solve: "):
            ridge_solve(rhs, grams, 0.5, backend="cuda")
    assert torch.equal(ridge_solve(rhs, grams, 0.5), ridge_solve(rhs, grams, 0.5, backend="torch"))


def test_a_run_wide_backend_runs_the_reference_for_ops_not_written_in_it():
    assert [backend_for("ridge_solve", b) for b in ("auto", "torch", "triton", "cuda")] == ["auto", "torch", "torch", "cuda"]
    assert [backend_for("cross_attention", b) for b in ("auto", "torch", "triton", "cuda")] == ["auto", "torch", "triton", "torch"]


@cuda_only
def test_cuda_solve_refuses_a_system_that_is_not_positive_definite():
    rhs = torch.randn(3, 16, device="cuda")
    with pytest.raises(UserError, match="not positive definite with lambda 0.001"):
        ridge_solve(rhs, [-torch.eye(16, dtype=F64, device="cuda")], 1e-3, backend="cuda")


@cuda_only
def test_uce_gives_the_same_weights_whichever_backend_solves(tiny_pipeline_dir):
    from fasterase.config import make_config
    from fasterase.methods.configs import UCEConfig
    from fasterase.methods.uce import UCE
    from fasterase.models.loading import load_pipeline

    results = [
        UCE().erase(load_pipeline(tiny_pipeline_dir, device="cuda"), make_config(UCEConfig, {"concepts": ["circle"], "backend": backend})).tensors
        for backend in ("torch", "cuda")
    ]
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name])  # float32 round-off


def test_mapping_fit_and_solve_errors():
    g = torch.Generator().manual_seed(5)
    c, t = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    grams = RidgeGrams.zeros(16)
    grams.add_edit(c, t)
    grams.preserved += gram(torch.randn(20, 16, generator=g))
    loose, tight = (mapping_fit(grams, mapping_matrix(grams, lam)) for lam in (100.0, 1e-3))
    assert 0 < tight["erased_residual"] < loose["erased_residual"] < 1
    assert tight["preserved_change"] > loose["preserved_change"] > 0
    with pytest.raises(ValueError, match="lambda must be at least 0"):
        ridge_solve(c, [grams.sources], -1.0)
    # lambda 0: 4 edited tokens span 4 of 16 directions, and the message says which lambda would do
    with pytest.raises(UserError, match=r"span 4 of 16 directions; lambda \S+ or more"):
        ridge_solve(c, [grams.sources], 0.0)
    spanning = gram(torch.randn(40, 16, generator=g))
    torch.testing.assert_close(ridge_solve(c, [spanning], 0.0) @ spanning, c.to(F64))
    with pytest.raises(ValueError, match=r"gram 1 is \(8, 8\)"):
        ridge_solve(c, [grams.sources, torch.eye(8, dtype=F64)], 0.5)
    with pytest.raises(ValueError, match="rows, d"):
        ridge_solve(c[0], [grams.sources], 0.5)
    with pytest.raises(UserError, match="not positive definite with lambda 0.001"):
        ridge_solve(c, [-torch.eye(16, dtype=F64)], 1e-3)


def test_prompt_gram_streams_in_batches(tiny_pipeline_dir):
    from fasterase.models.loading import load_pipeline
    from fasterase.models.text import encode_prompts

    pipe = load_pipeline(tiny_pipeline_dir)
    prompts = ["a circle", "a red square", "", "a photo of a star", "a blue ring"]
    whole = gram(encode_prompts(pipe, prompts))
    batches = []
    streamed = prompt_gram(pipe, (p for p in prompts), batch_size=2, progress=batches.append)
    assert torch.allclose(streamed, whole, rtol=1e-10, atol=1e-8)
    assert batches == [2, 2, 1]


def test_gram_cache_round_trip_and_refusal(tiny_pipeline_dir, tmp_path):
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    cache = preservation_gram(pipe, ["a circle", "a square", "a star"], "tiny", batch_size=2)
    assert (cache.prompts, cache.tokens) == (3, 3 * pipe.tokenizer.model_max_length) and cache.gram.dtype == F64
    path = tmp_path / "gram.safetensors"
    save_gram(path, cache)
    assert os.listdir(tmp_path) == ["gram.safetensors"], "no temporary file left behind"
    loaded = load_gram(path, pipe)
    assert torch.equal(loaded.gram, cache.gram)
    assert (loaded.prompts, loaded.tokens, loaded.text_encoder, loaded.model) == (3, cache.tokens, cache.text_encoder, "tiny")
    # the same text encoder with another UNet is fine; another text encoder is refused
    other_unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        next(other_unet.parameters()).neg_()
    assert load_gram(path, types.SimpleNamespace(unet=other_unet, text_encoder=pipe.text_encoder)).prompts == 3
    other = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    with pytest.raises(UserError, match="^.* was made with the text encoder of 'tiny': its text_encoder differs from this model's$"):
        load_gram(path, types.SimpleNamespace(unet=pipe.unet, text_encoder=other))
    for gram, text_encoder, message in (
        (torch.eye(2, dtype=F64), cache.text_encoder, "gram is not a finite"),
        (cache.gram, "other", "malformed fingerprints"),
    ):
        save_gram(path, PreservationGram(gram, 1, 77, text_encoder, "tiny"))
        with pytest.raises(UserError, match=message):
            load_gram(path, pipe)


def test_gram_cache_refuses_other_files(tmp_path):
    from fasterase.edits import save_key

    save_key(tmp_path / "key.safetensors", {"prompt": torch.zeros(2)}, {"method": "kpop"})
    with pytest.raises(UserError, match="not a fasterase-gram file"):
        load_gram(tmp_path / "key.safetensors", None)
    with pytest.raises(UserError, match="no such file"):
        load_gram(tmp_path / "missing.safetensors", None)
