"""Running an attack and scoring it: the attack success rate (ASR), the share of the attacked
images that the judge recognises as the concept (top-1), beside the edited model's rate on the
plain prompts from the same seeds (the baseline) and the original model's."""

from __future__ import annotations

import functools

import numpy as np

from ..concept_images import ConceptImages, concept_images
from ..config import SamplingConfig
from ..evaluation.sampling import generate
from . import AttackTarget, Found, Progress, get_attack
from .configs import AttackConfig

# The attack's own images of the concept are drawn from seeds past the evaluation's, so that it
# never learns from the very noise its images are then judged on.
ATTACK_IMAGE_SEED = 10_000


def recognition_rate(judge, images: np.ndarray, concept: str, labels: list[str]) -> float:
    """The share of `images` whose top-1 is `concept`, ranked over `labels`."""
    top1, _ = judge.recognised(images, concept, labels)
    return float(np.mean(top1))


def image_templates(concept: str, prompts: list[str]) -> list[str]:
    """The evaluation's prompts as templates ({} where the concept is), to draw the attack's images
    of the concept as the evaluation asks for it."""
    templates = [p.replace("{", "{{").replace("}", "}}").replace(concept, "{}") for p in prompts if concept in p]
    return list(dict.fromkeys(templates)) or ["{}"]


def concept_images_for(original, concept: str, prompts: list[str], cfg: AttackConfig):
    """A function that gives the concept's images (a folder, or drawn by the original model), drawn
    on the first call only: attacks that need no images draw none."""

    @functools.cache
    def images() -> ConceptImages:
        sampling = SamplingConfig(steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed + ATTACK_IMAGE_SEED)
        return concept_images(original, [concept], cfg.images, "", count=cfg.image_count, templates=image_templates(concept, prompts), sampling=sampling)

    return images


def find(name: str, cfg: AttackConfig, edited, original, concept: str, prompts: list[str], progress: Progress | None = None) -> Found:
    """What attack `name` finds against `edited`: one attacked prompt per evaluation prompt."""
    target = AttackTarget(edited, original, concept, prompts, concept_images_for(original, concept, prompts, cfg))
    found = get_attack(name)().find(target, cfg, progress)
    if len(found.prompts) != len(prompts):
        raise ValueError(f"attack {name} gave {len(found.prompts)} prompts for {len(prompts)}")
    return found


def attacked_rate(name: str, found: Found, edited, judge, concept: str, labels: list[str], sampling: SamplingConfig, progress=None) -> float:
    """The ASR of what was found: its prompts drawn by `edited` (prompt i from the evaluation's
    seed of prompt i) and judged."""
    with get_attack(name).installed(edited, found):
        images = generate(edited, found.prompts, sampling, progress)
    return recognition_rate(judge, images, concept, labels)
