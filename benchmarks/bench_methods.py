"""Every method on the built-in world, ours against its reference algorithm, in the same run.

The reference algorithms (`reference_trajectory_methods.py`: ESD, KPOP, CA;
`reference_attention_methods.py`: FMN, MACE, UCE) run each method's loop as its official code
does (batch 1, one concept at a time, targets recomputed every step, ESD's trajectories sampled
per iteration, attention maps stored, torch.inverse per layer) on the same model with the same
config; FMN and MACE both read one folder of the concepts' images, drawn by the base model
beforehand (as the official code reads images prepared beforehand). Each case erases `circle`
(MACE also ten emblems, preserving the other ninety) both ways from a freshly loaded pipeline
and records, in extra_info and benchmarks/results/methods-<gpu or cpu>-<date>.json:
- wall time and peak memory of each erasure (model loading excluded), and their ratios;
- the UNet sample-evaluations of each: forward rows, and the rows of forwards that autograd
  records (each is differentiated: backward rows);
- the ESR-1 and PSR-1 of both edits, judged on the same prompts and noise (`fasterase.api.compare`);
  a speed-up counts only at equal quality, both within 5 points;
- the issue's targets for the method and whether they are met.

Scales (`--methods-scale`): smoke (a couple of steps; the default with --benchmark-disable, for
CI: both paths run, nothing is timed), quick (a quarter of the training, on a CPU in minutes a
method) and full (each method's defaults on the built-in world: the recorded runs; the default
otherwise). Ours is the benchmarked function (one round: an erasure is long); the reference is
timed once beside it.

    python -m pytest benchmarks/bench_methods.py -q --methods-scale full -s
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

import pytest
import torch
from PIL import Image

from fasterase.api import compare
from fasterase.concept_images import drawing_prompts
from fasterase.config import SamplingConfig
from fasterase.edits import Edit, EditMetadata, bound_fingerprints, save_edit
from fasterase.evaluation.sampling import generate
from fasterase.methods import erase_config, get_method
from fasterase.methods.configs import ImageMethodConfig
from fasterase.models.family import family_of
from fasterase.models.fingerprint import fingerprints
from fasterase.models.loading import load_pipeline, model_name
from fasterase.toyworld.world import EMBLEMS
from measure import DEVICE, measured, megabytes
from reference_attention_methods import reference_fmn, reference_mace, reference_uce
from reference_trajectory_methods import reference_ca, reference_esd, reference_kpop

pytestmark = pytest.mark.usefixtures("record_result")

REFERENCES = {
    "kpop": reference_kpop, "esd": reference_esd, "ca": reference_ca, "fmn": reference_fmn, "mace": reference_mace, "uce": reference_uce,
}
# Options that cut the work of each method at the smoke and quick scales (full: the defaults).
SMOKE = {
    "kpop": dict(steps=2, trajectories=1, sample_steps=2),
    "esd": dict(steps=2, trajectories=1, sample_steps=2),
    "ca": dict(steps=2, trajectories=1, sample_steps=2),
    "fmn": dict(steps=2, image_count=1, sample_steps=2),
    "mace": dict(steps=2, image_count=1, sample_steps=2),
    "uce": {},
}
QUICK = {
    "kpop": dict(steps=40, trajectories=4),
    "esd": dict(steps=25, trajectories=4),
    "ca": dict(steps=25, trajectories=4),
    "fmn": dict(steps=10, image_count=2),
    "mace": dict(steps=15, image_count=2),
    "uce": {},
}
SCALES = {"smoke": SMOKE, "quick": QUICK, "full": {name: {} for name in REFERENCES}}
# images per concept in the quality check, and its DDIM steps (0: the model's default, as evaluate's)
EVALUATION = {"smoke": (2, 4), "quick": (16, 0), "full": (32, 0)}
EQUAL_QUALITY = 0.05  # ESR-1 and PSR-1 within 5 points
# Each case: a method, the concepts it erases and those it preserves (None: the method's
# default), with the targets (speed-up, UNet row ratio, peak memory ratio reference/ours;
# None where it sets none).
CASES = {
    "kpop": ("kpop", ["circle"], None, (3, 5, None)),
    "esd": ("esd", ["circle"], None, (3, 5, None)),
    "ca": ("ca", ["circle"], None, (3, None, None)),
    "fmn": ("fmn", ["circle"], None, (3, None, 2)),
    "mace": ("mace", ["circle"], None, (3, None, 2)),
    "uce": ("uce", ["circle"], None, (None, None, None)),
    # MACE's LoRAs train together in ours, one concept after another in the reference. The other
    # ninety emblems are preserved, which the evaluation checks: without them MACE erases nearly
    # every emblem with the ten, on both sides (PSR-1 0.046 in methods-cpu-2026-12-02.json).
    "mace-10-emblems": ("mace", list(EMBLEMS[:10]), list(EMBLEMS[10:]), (5, None, 2)),
}


@dataclasses.dataclass
class UNetRows:
    """UNet sample-evaluations: rows of every forward, and rows of forwards autograd records."""

    forward: int = 0
    backward: int = 0


@contextlib.contextmanager
def counting_unet_rows() -> Iterator[UNetRows]:
    """Counts the rows of every UNet2DConditionModel call in the block, of any instance (a
    reference's frozen copy too)."""
    from diffusers import UNet2DConditionModel

    rows = UNetRows()
    forward = UNet2DConditionModel.forward

    def counted(self, sample, *args, **kwargs):
        output = forward(self, sample, *args, **kwargs)
        rows.forward += sample.shape[0]
        result = output[0] if isinstance(output, tuple) else output.sample
        if result.requires_grad:
            rows.backward += sample.shape[0]
        return output

    UNet2DConditionModel.forward = counted
    try:
        yield rows
    finally:
        UNet2DConditionModel.forward = forward


@dataclasses.dataclass
class Run:
    tensors: dict[str, torch.Tensor]
    seconds: float
    peak_bytes: int | None
    rows: UNetRows


def erasure(run_method) -> Run:
    """`run_method(pipe)` on a freshly loaded built-in pipeline, measured."""
    pipe = load_pipeline(None, device=DEVICE)
    with counting_unet_rows() as rows:
        tensors, seconds, peak = measured(lambda: run_method(pipe))
    return Run(tensors, seconds, peak, rows)


def drawn_images(cfg: ImageMethodConfig, folder: Path) -> str:
    """The concepts' images, drawn once by the base model as the method would draw them, in a
    folder of one subfolder per concept. Both sides read it: the official FMN and MACE code read
    images prepared beforehand, so drawing them is neither side's work."""
    prompts = drawing_prompts(cfg.concepts, cfg.templates, cfg.image_count)
    for j, pixels in enumerate(generate(load_pipeline(None, device=DEVICE), prompts, cfg.sampling())):
        concept = folder / cfg.concepts[j // cfg.image_count]
        concept.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).round().astype("uint8")).save(concept / f"{j % cfg.image_count}.png")
    return str(folder)


def write_edit(path: Path, method: str, cfg, tensors: dict[str, torch.Tensor], base: dict) -> Path:
    """The edit `fasterase erase` would write for these tensors (no key), bound as erase binds
    it (`base`: the built-in model's fingerprints)."""
    metadata = EditMetadata(method=method, concepts=list(cfg.concepts), config=cfg.to_dict(), base_fingerprints=bound_fingerprints(base, tensors), base_model=model_name(None))
    save_edit(path, Edit({name: value.cpu() for name, value in tensors.items()}, metadata))
    return path


def ratio(reference: float | None, ours: float | None) -> float | None:
    return None if not reference or not ours else round(reference / ours, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_method_against_reference(benchmark, methods_scale, case, tmp_path):
    method, concepts, preserve, (min_speedup, min_rows, min_memory) = CASES[case]
    cfg = erase_config(method, concepts, preserve=preserve, **SCALES[methods_scale][method])
    if isinstance(cfg, ImageMethodConfig) and not cfg.images:
        cfg = dataclasses.replace(cfg, images=drawn_images(cfg, tmp_path / "images"))
    reference = erasure(lambda pipe: REFERENCES[method](pipe, cfg))
    ours = benchmark.pedantic(erasure, args=(lambda pipe: get_method(method)().erase(pipe, cfg).tensors,), rounds=1, iterations=1)
    assert set(reference.tensors) == set(ours.tensors), "both edits change the same tensors"

    n, steps = EVALUATION[methods_scale]
    # A case of ten concepts draws a tenth of the images per concept (erased and preserved), so that
    # its evaluation is about as long as that of a one-concept case (100 emblems x 3 against 8 shapes x 32).
    n = max(1, n // len(concepts))
    pipe = load_pipeline(None)
    base = fingerprints(pipe, family_of(pipe).components())
    result = compare(
        [write_edit(tmp_path / f"{side}.safetensors", method, cfg, run.tensors, base) for side, run in (("ours", ours), ("reference", reference))],
        n=n, sampling=SamplingConfig(steps=steps),
    )
    quality = {side: {score: result["edits"][i][score] for score in ("esr1", "psr1")} for i, side in enumerate(("ours", "reference"))}
    equal = all(abs(quality["ours"][s] - quality["reference"][s]) <= EQUAL_QUALITY for s in ("esr1", "psr1"))
    speedup = ratio(reference.seconds, ours.seconds)
    rows_ratio = ratio(reference.rows.forward, ours.rows.forward)
    memory_ratio = ratio(reference.peak_bytes, ours.peak_bytes)
    met = {}
    if min_speedup is not None:
        met[f"speedup >= {min_speedup} at equal quality"] = equal and speedup >= min_speedup
    if min_rows is not None:
        met[f"unet rows ratio >= {min_rows}"] = rows_ratio is not None and rows_ratio >= min_rows
    if min_memory is not None:
        met[f"peak memory ratio >= {min_memory}"] = memory_ratio is not None and memory_ratio >= min_memory
    benchmark.extra_info.update({
        "method": method, "scale": methods_scale, "concepts": concepts, "device": str(DEVICE),
        "ours_seconds": round(ours.seconds, 2), "reference_seconds": round(reference.seconds, 2), "speedup": speedup,
        "ours_peak_mb": megabytes(ours.peak_bytes), "reference_peak_mb": megabytes(reference.peak_bytes), "memory_ratio": memory_ratio,
        "ours_unet_rows": dataclasses.asdict(ours.rows), "reference_unet_rows": dataclasses.asdict(reference.rows), "rows_ratio": rows_ratio,
        "quality": quality, "evaluation_images": n, "equal_quality": equal,
        "targets_met": met,
    })
    print(f"\n{case}: {benchmark.extra_info}")
