"""Concept Ablation, the model-based variant (Kumari et al., 2023, "Ablating Concepts in
Text-to-Image Diffusion Models").

The model is fine-tuned so that the concept's prompt produces what an anchor concept's prompt
produces:
  ||eps'(x_t, c_concept) - eps(x_t, c_anchor)||^2,
with x_t from the frozen model's own sampling under the anchor's prompts (the paper generates
anchor images with the model and noises them) and c_concept the anchor's prompt made the concept's:
the concept in the anchor's place for an object, the anchor's prompt "in the style of" the concept
for a style. The anchor's prompts are the templates with the anchor, or the captions of a file
(the reference's ~200 captions per anchor). The target is the frozen model's prediction, computed
once; the paper takes the model being trained, without gradient, which starts at the same value.
With concepts to preserve, the same step also keeps the frozen model's predictions on them,
+ preserve_weight ||eps'(x_t, c_p) - eps(x_t, c_p)||^2: an addition to the paper's objective
(whose optional prior term is on anchor images), off when none are given.
"""

from __future__ import annotations

import re

from ..models.family import encode
from . import ErasureResult, Method, Progress, register
from .configs import CAConfig
from .parameters import select_parameters
from .training import PredictionTargets, changed_tensors, match_predictions, sample_banks, trajectory_prompts

# The reference's phrasings of a prompt in a style, in its proportions: it draws one of three per
# item, and its second and third are the same.
STYLE_PHRASINGS = ("{prompt}, in the style of {style}", "in {style}'s style, {prompt}", "in {style}'s style, {prompt}")


def in_style(prompt: str, style: str, item: int) -> str:
    """`prompt` in `style`, in the phrasing of the `item`-th training item; an empty prompt
    (the empty anchor) becomes the phrase alone."""
    return STYLE_PHRASINGS[item % len(STYLE_PHRASINGS)].format(prompt=prompt, style=style).strip(" ,")


def ablation_prompts(cfg: CAConfig) -> tuple[list[str], list[str]]:
    """(anchor prompts, concept prompts): one pair per trajectory, `trajectories` per concept,
    concept-major, so that trajectory i of concept k is sampled from the anchor's prompt i and
    trained with concept k's prompt i."""
    captions = cfg.anchor_captions()
    if captions:
        anchor_prompts = [captions[i % len(captions)] for _ in cfg.concepts for i in range(cfg.trajectories)]
    else:
        anchor_prompts = trajectory_prompts(cfg.templates, [cfg.anchor] * len(cfg.concepts), cfg.trajectories)
    concepts = [c for c in cfg.concepts for _ in range(cfg.trajectories)]
    if cfg.concept_type == "style":
        concept_prompts = [in_style(p, c, i) for i, (p, c) in enumerate(zip(anchor_prompts, concepts))]
    elif captions:
        # Every occurrence, as the reference's str.replace; case aside, as its captions were
        # lowercased. The replacement is a function, so that no backslash in a concept is an escape.
        anchor = re.compile(re.escape(cfg.anchor), re.IGNORECASE)
        concept_prompts = [anchor.sub(lambda _, c=c: c, p) for p, c in zip(anchor_prompts, concepts)]
    else:
        concept_prompts = trajectory_prompts(cfg.templates, cfg.concepts, cfg.trajectories)
    return anchor_prompts, concept_prompts


@register
class CA(Method):
    name = "ca"

    def erase(self, pipe, cfg: CAConfig, progress: Progress | None = None) -> ErasureResult:
        unet = pipe.unet
        anchor_prompts, concept_prompts = ablation_prompts(cfg)
        bank, keep = sample_banks(pipe, cfg, anchor_prompts)
        # The target: the frozen model's predictions for the anchor, from sampling.
        params = select_parameters(unet, cfg.trainable)
        match_predictions(unet, params, PredictionTargets(bank, encode(pipe, concept_prompts), bank.eps_prompt), keep, cfg, progress)
        return ErasureResult(tensors=changed_tensors("unet", params))
