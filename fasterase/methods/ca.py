"""Concept Ablation, the model-based variant (Kumari et al., 2023, "Ablating Concepts in
Text-to-Image Diffusion Models").

The model is fine-tuned so that the concept's prompt produces what an anchor concept's prompt
produces:
  ||eps'(x_t, c_concept) - eps(x_t, c_anchor)||^2,
with x_t from the frozen model's own sampling under the anchor's prompts (the paper generates
anchor images with the model and noises them) and c_concept the same prompt with the concept in
the anchor's place. The target is the frozen model's prediction, computed once; the paper takes
the model being trained, without gradient, which starts at the same value. With concepts to
preserve, the same step also keeps the frozen model's predictions on them,
+ preserve_weight ||eps'(x_t, c_p) - eps(x_t, c_p)||^2: an addition to the paper's objective
(whose optional prior term is on anchor images), off when none are given.
"""

from __future__ import annotations

from ..models.family import encode
from . import ErasureResult, Method, Progress, register
from .configs import CAConfig
from .parameters import select_parameters
from .training import PredictionTargets, changed_tensors, match_predictions, sample_banks, trajectory_prompts

@register
class CA(Method):
    name = "ca"

    def erase(self, pipe, cfg: CAConfig, progress: Progress | None = None) -> ErasureResult:
        unet = pipe.unet
        # Trajectory i of concept k is sampled from the anchor's prompt with the template of
        # concept k's prompt i, so the two prompt lists pair up by index.
        anchor_prompts = trajectory_prompts(cfg.templates, [cfg.anchor] * len(cfg.concepts), cfg.trajectories)
        concept_prompts = trajectory_prompts(cfg.templates, cfg.concepts, cfg.trajectories)
        bank, keep = sample_banks(pipe, cfg, anchor_prompts)
        # The target: the frozen model's predictions for the anchor, from sampling.
        params = select_parameters(unet, cfg.trainable)
        match_predictions(unet, params, PredictionTargets(bank, encode(pipe, concept_prompts), bank.eps_prompt), keep, cfg, progress)
        return ErasureResult(tensors=changed_tensors("unet", params))
