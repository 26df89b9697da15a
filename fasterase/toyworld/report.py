"""The built-in world's quality bars, as `fasterase toyworld report` prints them."""

from __future__ import annotations

import time

import numpy as np

from ..evaluation.sampling import SamplingConfig, generate, sample_steps
from ..models.loading import load_pipeline
from . import world
from .classifier import predict
from .judge import WorldJudge
from .recipe import classifier_accuracy

BARS = {
    "classifier_accuracy": 0.98,  # every label family, held-out procedural images
    "generated_accuracy_mean": 0.85,  # "a photo of a {shape}", classified as that shape
    "generated_accuracy_min": 0.70,
    "emblem_accuracy_mean": 0.70,
    "sample_64_seconds": 60.0,
}


def world_report(model=None, n: int = 32, emblem_images: int = 4, heldout: int = 2000, sampling: SamplingConfig = SamplingConfig()) -> dict:
    judge = WorldJudge()
    data = world.sample_batch(heldout, seed=123_456)
    pipe = load_pipeline(model)

    def accuracy(concepts: list[str], per: int) -> tuple[dict[str, float], float]:
        """The share of each concept's images the classifier calls that concept, and the seconds
        the drawing took."""
        start = time.time()
        images = generate(pipe, [f"a photo of a {c}" for c in concepts for _ in range(per)], sampling)
        seconds = time.time() - start
        predicted = predict(judge.classifier, images)["object"].argmax(1).numpy().reshape(len(concepts), per)
        return {c: float((predicted[i] == world.OBJECTS.index(c)).mean()) for i, c in enumerate(concepts)}, seconds

    shapes, shapes_seconds = accuracy(list(world.SHAPES), n)
    # the speed bar reads the shapes' own drawing, per 64 images, rather than drawing 64 more
    sample_seconds = shapes_seconds * 64 / (len(world.SHAPES) * n)
    emblems, _ = accuracy(list(world.EMBLEMS), emblem_images)
    result = {
        "classifier_accuracy": classifier_accuracy(judge.classifier, data),
        "generated_accuracy": shapes,
        "generated_accuracy_mean": float(np.mean(list(shapes.values()))),
        "emblem_accuracy_mean": float(np.mean(list(emblems.values()))),
        "sample_64_seconds": sample_seconds,
        "images_per_shape": n,
        "images_per_emblem": emblem_images,
        "sampling": {"steps": sample_steps(pipe, sampling), "guidance": sampling.guidance},
    }
    result["bars_met"] = {
        "classifier_accuracy": min(result["classifier_accuracy"].values()) >= BARS["classifier_accuracy"],
        "generated_accuracy_mean": result["generated_accuracy_mean"] >= BARS["generated_accuracy_mean"],
        "generated_accuracy_min": min(shapes.values()) >= BARS["generated_accuracy_min"],
        "emblem_accuracy_mean": result["emblem_accuracy_mean"] >= BARS["emblem_accuracy_mean"],
        "sample_64_seconds": sample_seconds < BARS["sample_64_seconds"],
    }
    return result


def format_report(r: dict) -> str:
    ok = lambda met: "met" if met else "NOT MET"  # noqa: E731
    met = r["bars_met"]
    lines = ["classifier accuracy on held-out procedural images (bar: >= 98% each): "
             + ", ".join(f"{k} {v:.1%}" for k, v in r["classifier_accuracy"].items()) + f"  [{ok(met['classifier_accuracy'])}]"]
    lines.append(f"'a photo of a {{shape}}' recognised as the shape ({r['images_per_shape']} images each):")
    lines += [f"  {shape:10}{acc:7.1%}" for shape, acc in r["generated_accuracy"].items()]
    lines.append(f"  mean {r['generated_accuracy_mean']:.1%} (bar: >= 85%) [{ok(met['generated_accuracy_mean'])}], "
                 f"min {min(r['generated_accuracy'].values()):.1%} (bar: >= 70%) [{ok(met['generated_accuracy_min'])}]")
    lines.append(f"emblems recognised: mean {r['emblem_accuracy_mean']:.1%} over {len(world.EMBLEMS)} emblems "
                 f"(bar: >= 70%) [{ok(met['emblem_accuracy_mean'])}]")
    drawn = f"{r['sampling']['steps']} steps, guidance {r['sampling']['guidance']:g}"
    lines.append(f"sampling 64 images ({drawn}): {r['sample_64_seconds']:.1f} s (bar: < 60 s) [{ok(met['sample_64_seconds'])}]")
    return "\n".join(lines)
