"""Closed-form edits: the shared ridge solve against the MACE reference's per-layer loop, on a GPU
(every case) or a CPU (SD1.x sizes, at most 10 concepts: the loops are minutes there).

- refine: UCE / MACE's closed-form refinement of every cross-attention key/value projection, for
  1, 10 and 100 (on a CPU 1 and 10) concepts, with and without a preservation Gram cache, at SD1.x sizes (d = 768,
  32 projections of 320/640/1280 rows) and SDXL sizes (d = 2048, 140 projections). The loop does
  what the MACE reference does for each projection: project every concept's target embeddings,
  accumulate both sides of the normal equations concept by concept, invert the right side
  (torch.inverse), one product. Ours accumulates the Grams once, solves once
  (`fasterase.kernels.ridge_solve`, backends torch and cuda) and multiplies all projections at once.
- fuse: MACE's fusion of 100 (on a CPU 10) concepts' rank-r LoRAs end to end (concept Grams from token
  embeddings, solve, merge), against the reference's loop that forms every W + B_k A_k densely.
- gram: the symmetric Gram of a batch of 256 prompts (lower-triangle block rows only), against the
  whole product.
- merge: 100 (on a CPU 10) rank-16 LoRAs merged into the projections, one product per projection
  (`fasterase.lora.merge_loras`) against a loop of one product per LoRA and projection.

Every timed function waits for the device. The reference loop is timed in the same run (median of
a few runs); extra_info holds both times, their ratio and the peak
memory of each. Inputs are random (token embeddings of unit variance, 8 prompts of 77 positions
per concept); matrix products use torch's default float32 precision (no TF32). Each run's rows go
to benchmarks/results/closed_form-<gpu>-<date>.json (benchmarks/conftest.py).

    python -m pytest benchmarks/bench_closed_form.py --benchmark-columns=median,rounds
"""

from __future__ import annotations

import functools

import pytest
import torch

from fasterase.closed_form import RidgeGrams, edit_weights, gram, mapping_matrix
from fasterase.kernels import backend_status
from fasterase.lora import fuse_loras, merge_loras
from measure import CUDA, DEVICE, median_seconds, megabytes, peak_bytes, synchronize

pytestmark = pytest.mark.usefixtures("record_result")

# d, and the rows of each cross-attention to_k/to_v projection (to_k and to_v of every attn2)
MODELS = {
    "sd1": (768, [c for c in [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3 for _ in "kv"]),
    "sdxl": (2048, [c for c in [640] * 4 + [1280] * 20 + [1280] * 10 + [1280] * 30 + [640] * 6 for _ in "kv"]),
}
if not CUDA:
    MODELS = {"sd1": MODELS["sd1"]}
CONCEPTS = [1, 10, 100] if CUDA else [1, 10]
MANY = 100 if CUDA else 10  # the concepts (LoRAs) of the fusion and merge cases
TOKENS_PER_CONCEPT = 8 * 77
LAM = 0.5


def backend_param(provider: str):
    """The pytest.param of a provider, skipped with the dispatcher's reason when it cannot run here."""
    status = backend_status()["ridge_solve"][provider]
    return pytest.param(provider, marks=pytest.mark.skipif(status != "available", reason=f"ridge_solve [{provider}] is {status}"))


PROVIDERS = [backend_param("torch"), backend_param("cuda")]


@functools.lru_cache(maxsize=1)
def inputs(model: str, concepts: int, cached: bool) -> dict:
    """Weights, every concept's source and target token embeddings, and a preservation Gram."""
    d, rows = MODELS[model]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    weights = {f"p{i}.weight": torch.randn(r, d, device=DEVICE, generator=g) / d**0.5 for i, r in enumerate(rows)}
    sources = torch.randn(concepts, TOKENS_PER_CONCEPT, d, device=DEVICE, generator=g)
    targets = torch.randn(concepts, TOKENS_PER_CONCEPT, d, device=DEVICE, generator=g)
    preserved = gram(torch.randn(20_000, d, device=DEVICE, generator=g)) if cached else None
    return {"weights": weights, "sources": sources, "targets": targets, "preserved": preserved}


def shared_refine(case: dict, backend: str) -> dict[str, torch.Tensor]:
    d = case["sources"].shape[-1]
    grams = RidgeGrams.zeros(d, DEVICE)
    grams.add_edit(case["sources"], case["targets"])
    if case["preserved"] is not None:
        grams.preserved += case["preserved"]
    edited = edit_weights(case["weights"], mapping_matrix(grams, LAM, backend))
    synchronize()
    return edited


def loop_refine(case: dict, layer_cache: dict | None) -> dict[str, torch.Tensor]:
    """The MACE reference's closed-form refinement: per projection, per concept; layer_cache holds,
    per projection, the cached preservation sums (W G_p, G_p) that the reference reads from disk."""
    d = case["sources"].shape[-1]
    eye = torch.eye(d, device=DEVICE)
    edited = {}
    for name, w in case["weights"].items():
        left, right = LAM * w, LAM * eye
        for sources, targets in zip(case["sources"], case["targets"]):
            values = targets @ w.T  # the target embeddings through this projection
            left = left + values.T @ sources
            right = right + sources.T @ sources
        if layer_cache is not None:
            left = left + layer_cache[name][0]
            right = right + layer_cache[name][1]
        edited[name] = left @ torch.inverse(right)
    synchronize()
    return edited


def median_ms(fn, runs: int, smoke: bool) -> tuple[float, int | None] | None:
    """Median wall time of fn in milliseconds over `runs` runs after one warm-up, and the peak
    memory of one run above what was in use before it; a smoke run (--benchmark-disable) calls fn
    once and measures nothing."""
    if smoke:
        fn()
        return None
    return median_seconds(fn, runs) * 1e3, peak_bytes(fn)


def record(benchmark, kind: str, params: dict, ours_fn, reference: tuple[float, int], target: str, met) -> None:
    """extra_info (recorded in the results file): both times, the speedup, both peaks, and whether
    the issue's target (`met`, a function of ours_ms and the speedup) holds."""
    if benchmark.stats is None:  # a smoke run
        return
    ours_ms, (reference_ms, reference_peak) = benchmark.stats.stats.median * 1e3, reference
    facts = {
        **params,
        "ours_ms": round(ours_ms, 3),
        "reference_ms": round(reference_ms, 3),
        "speedup": round(reference_ms / ours_ms, 2),
        "ours_peak_mb": megabytes(peak_bytes(ours_fn)),
        "reference_peak_mb": megabytes(reference_peak),
        "target": target,
        "target_met": bool(met(ours_ms, reference_ms / ours_ms)),
    }
    benchmark.extra_info.update({"benchmark": kind, **facts})


@functools.lru_cache(maxsize=None)
def loop_refine_ms(model: str, concepts: int, cached: bool, smoke: bool):
    case = inputs(model, concepts, cached)
    layer_cache = None
    if cached:
        layer_cache = {name: (w @ case["preserved"].float(), case["preserved"].float()) for name, w in case["weights"].items()}
    return median_ms(lambda: loop_refine(case, layer_cache), 3, smoke)


@pytest.mark.parametrize("backend", PROVIDERS)
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("concepts", CONCEPTS)
@pytest.mark.parametrize("model", list(MODELS))
def test_refine(benchmark, model, concepts, cached, backend):
    reference = loop_refine_ms(model, concepts, cached, benchmark.disabled)
    ours = functools.partial(shared_refine, inputs(model, concepts, cached), backend)
    benchmark.pedantic(ours, rounds=10, warmup_rounds=2)
    params = {"model": model, "concepts": concepts, "cache": cached, "backend": backend}
    record(benchmark, "refine", params, ours, reference, "speedup >= 10", lambda ms, speedup: speedup >= 10)


@functools.lru_cache(maxsize=1)
def fusion_inputs(model: str, concepts: int, rank: int) -> dict:
    case = inputs(model, concepts, True)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    loras = [
        {name: (torch.randn(w.shape[0], rank, device=DEVICE, generator=g) * 1e-2, torch.randn(rank, w.shape[1], device=DEVICE, generator=g) * 1e-2)
         for name, w in case["weights"].items()}
        for _ in range(concepts)
    ]
    return {**case, "loras": loras}


def shared_fuse(case: dict, backend: str) -> dict[str, torch.Tensor]:
    concept_grams = [gram(tokens) for tokens in case["sources"]]
    fused = fuse_loras(case["weights"], case["loras"], concept_grams, case["preserved"], LAM, backend)
    synchronize()
    return fused


def loop_fuse(case: dict) -> dict[str, torch.Tensor]:
    """The MACE reference's fusion: per projection, per concept, the dense W + B_k A_k."""
    d = case["sources"].shape[-1]
    eye, preserved = torch.eye(d, device=DEVICE), case["preserved"].float()
    fused = {}
    for name, w in case["weights"].items():
        left, right = LAM * w + w @ preserved, LAM * eye + preserved
        for sources, lora in zip(case["sources"], case["loras"]):
            up, down = lora[name]
            values = sources @ (w + up @ down).T
            left = left + values.T @ sources
            right = right + sources.T @ sources
        fused[name] = left @ torch.inverse(right)
    synchronize()
    return fused


@functools.lru_cache(maxsize=None)
def loop_fuse_ms(model: str, rank: int, smoke: bool):
    case = fusion_inputs(model, MANY, rank)
    return median_ms(lambda: loop_fuse(case), 1, smoke)


@pytest.mark.parametrize("backend", PROVIDERS)
@pytest.mark.parametrize("rank", [1, 16])
@pytest.mark.parametrize("model", list(MODELS))
def test_fuse_many_concepts(benchmark, model, rank, backend):
    reference = loop_fuse_ms(model, rank, benchmark.disabled)
    ours = functools.partial(shared_fuse, fusion_inputs(model, MANY, rank), backend)
    benchmark.pedantic(ours, rounds=5, warmup_rounds=1)
    params = {"model": model, "concepts": MANY, "rank": rank, "backend": backend}
    record(benchmark, "fuse", params, ours, reference, "ours_ms < 1000", lambda ms, speedup: ms < 1000)


def loop_merge(weights: dict[str, torch.Tensor], loras: list[dict]) -> dict[str, torch.Tensor]:
    merged = {name: w.clone() for name, w in weights.items()}
    for lora in loras:
        for name, (up, down) in lora.items():
            merged[name].addmm_(up, down)
    synchronize()
    return merged


def shared_merge(weights: dict[str, torch.Tensor], loras: list[dict]) -> dict[str, torch.Tensor]:
    merged = merge_loras(weights, loras)
    synchronize()
    return merged


@pytest.mark.parametrize("model", list(MODELS))
def test_merge_many_rank16_loras(benchmark, model):
    case = fusion_inputs(model, MANY, 16)
    weights, loras = case["weights"], case["loras"]
    reference = median_ms(lambda: loop_merge(weights, loras), 5, benchmark.disabled)
    ours = functools.partial(shared_merge, weights, loras)
    benchmark.pedantic(ours, rounds=20, warmup_rounds=2)
    record(benchmark, "merge", {"model": model, "loras": MANY, "rank": 16}, ours, reference, "speedup > 1", lambda ms, speedup: speedup > 1)



def full_gram(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum w x x^T as one whole product, both triangles (what `gram` halves)."""
    rows = x.reshape(-1, x.shape[-1]).double()
    product = (rows * weights.reshape(-1, 1).double()).T @ rows
    synchronize()
    return product


def timed_gram(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    result = gram(x, weights)
    synchronize()
    return result


@pytest.mark.parametrize("model", list(MODELS))
def test_gram_of_a_batch_of_prompts(benchmark, model):
    """One batch of `cache build` or of a method's prompts: 256 prompts of 77 positions, half masked."""
    dim = MODELS[model][0]
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(256, 77, dim, device=DEVICE, generator=generator)
    weights = (torch.rand(256, 77, device=DEVICE, generator=generator) > 0.5).float()
    reference = median_ms(lambda: full_gram(x, weights), 10, benchmark.disabled)
    ours = functools.partial(timed_gram, x, weights)
    benchmark.pedantic(ours, rounds=20, warmup_rounds=2)
    record(benchmark, "gram", {"model": model, "prompts": 256}, ours, reference, "speedup > 1 (half the products)", lambda ms, speedup: speedup > 1)
