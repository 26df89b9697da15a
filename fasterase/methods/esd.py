"""ESD: erasing a concept by negative guidance (Gandikota et al., 2023, "Erasing Concepts from
Diffusion Models").

The model is fine-tuned so that, on the concept's prompt, it predicts what the frozen model would
with the concept guided away:
  ||eps'(x_t, c) - (eps(x_t, "") - eta (eps(x_t, c) - eps(x_t, "")))||^2,
with x_t from the frozen model's own sampling under the concept's prompt (the paper's code samples
one partial trajectory per iteration; here a bank of trajectories is sampled once, so that a step
is a fixed-shape gather that carries several samples of every concept). With concepts to
preserve, the same step also keeps the frozen model's predictions on them,
+ preserve_weight ||eps'(x_t, c_p) - eps(x_t, c_p)||^2: an addition to the paper's objective,
off when none are given.
"""

from __future__ import annotations

from ..models.family import encode
from . import ErasureResult, Method, Progress, register
from .configs import ESD_TRAINABLE_SETS, ESDConfig
from .parameters import select_parameters
from .training import (
    PredictionTargets, changed_tensors, guided_away, match_predictions, sample_banks, trajectory_prompts,
)

@register
class ESD(Method):
    name = "esd"

    def erase(self, pipe, cfg: ESDConfig, progress: Progress | None = None) -> ErasureResult:
        unet = pipe.unet
        prompts = trajectory_prompts(cfg.templates, cfg.concepts, cfg.trajectories)
        bank, keep = sample_banks(pipe, cfg, prompts)
        context = encode(pipe, prompts)
        # The frozen model's predictions, from sampling, before anything changed.
        target = guided_away(bank.eps_empty, bank.eps_prompt, cfg.negative_guidance)
        params = select_parameters(unet, ESD_TRAINABLE_SETS[cfg.trainable])
        match_predictions(unet, params, PredictionTargets(bank, context, target), keep, cfg, progress)
        return ErasureResult(tensors=changed_tensors("unet", params))
