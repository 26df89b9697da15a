"""Few-shot unlearning of the text encoder (Fuchi & Takagi, 2024).

Only the text encoder changes (by default its MLPs and its last attention layer): gradient ASCENT
on the denoising loss of a few images of the concept under the concept's prompts,
max ||eps(x_t, t, E(prompt)) - noise||^2, with the UNet and the VAE frozen. The concept's prompts
stop leading to its images; what they lead to instead is left to the model (a related concept),
no anchor is named.

Ascent has no optimum, so the other concepts are kept intact only by stopping early: the paper
stops on the step count (a few epochs over 4 images, about 10 Adam steps) and keeps a checkpoint
per epoch to choose from; it has no loss threshold and no preservation term. The step count is
therefore this method's main setting. Two additions to the paper, both off unless asked for:
concepts to preserve keep their prompts' text-encoder states, + preserve_weight ||E'(c_p) - E(c_p)||^2
(the only thing that changes is the text encoder, so this keeps their images as they were); and
masks, when given, restrict the loss to the concept's pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..concept_images import ImageMethodConfig, concept_images, uniform_timesteps
from ..config import check_choice, option
from ..errors import UserError
from ..evaluation.sampling import SamplingConfig
from ..models.text import encode_prompts, token_ids
from . import ErasureResult, Method, Progress, register
from .training import autocast, changed_tensors, run_steps, trainable

_LAYER = re.compile(r"layers\.(\d+)\.")

# name -> whether a text-encoder parameter belongs to the set, given the index of its last layer
TEXT_ENCODER_SETS = {
    "mlp_last_attention": lambda name, last: ".mlp." in name or (".self_attn." in name and _layer(name) == last),
    "mlp": lambda name, last: ".mlp." in name,
    "attention": lambda name, last: ".self_attn." in name,
    "mlp_attention": lambda name, last: ".mlp." in name or ".self_attn." in name,
    "all": lambda name, last: True,
}


def _layer(name: str) -> int | None:
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def select_text_encoder_parameters(text_encoder: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The parameters of the text encoder in the named set, by name."""
    if which not in TEXT_ENCODER_SETS:
        raise UserError(f"unknown text-encoder parameter set {which!r}; known: {', '.join(TEXT_ENCODER_SETS)}")
    named = dict(text_encoder.named_parameters())
    last = max((i for i in map(_layer, named) if i is not None), default=None)
    return {name: p for name, p in named.items() if TEXT_ENCODER_SETS[which](name, last)}


@dataclass
class FewShotConfig(ImageMethodConfig):
    steps: int = option(10, "Adam steps of gradient ascent: the stopping point, since ascent has no optimum")
    lr: float = option(1e-4, "Adam learning rate (the paper's 1e-5 is for SD; preset sd14)")
    trainable: str = option("mlp_last_attention", f"text-encoder parameters to update: {', '.join(TEXT_ENCODER_SETS)}")
    image_count: int = option(4, "images per concept the base model draws when no folder is given")
    batch_size: int = option(4, "images of every concept per step, each with its own prompt, noise and timestep")
    sample_steps: int = option(25, "DDIM steps of the drawn images")
    guidance: float = option(5.0, "classifier-free guidance of the drawn images")
    preserve_weight: float = option(1.0, "weight of keeping the preserved concepts' text-encoder states (if any)")
    log_every: int = option(5, "steps between progress reports (each reads the loss off the device)")

    def __post_init__(self):
        super().__post_init__()
        check_choice("trainable", self.trainable, TEXT_ENCODER_SETS)
        if self.lr <= 0:
            raise UserError(f"lr must be positive, not {self.lr}")
        for name in ("image_count", "batch_size", "sample_steps", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1")


@register
class FewShot(Method):
    name = "fewshot"
    config_class = FewShotConfig

    def erase(self, pipe, cfg: FewShotConfig, progress: Progress | None = None) -> ErasureResult:
        from diffusers import DDPMScheduler

        unet, text_encoder, device = pipe.unet, pipe.text_encoder, pipe.device
        sampling = SamplingConfig(steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed)
        shots = concept_images(pipe, cfg.concepts, cfg.images, cfg.masks, count=cfg.image_count, templates=cfg.templates, sampling=sampling)
        templates = len(cfg.templates)
        ids = token_ids(pipe, [t.format(concept) for concept in cfg.concepts for t in cfg.templates])  # (C * templates, 77)
        # The preserved prompts, every one in every step: the text encoder alone is cheap.
        keep_prompts = [t.format(concept) for concept in cfg.preserve for t in cfg.templates]
        keep_ids = token_ids(pipe, keep_prompts) if keep_prompts else ids[:0]
        keep_target = encode_prompts(pipe, keep_prompts) if keep_prompts else None

        # Everything a step reads, drawn up front: per step, batch_size items of every concept,
        # each an image of that concept with a template, a timestep and noise of its own.
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        generator = torch.Generator().manual_seed(cfg.seed)
        items = shots.draw_items(len(cfg.concepts), templates, cfg.steps, cfg.batch_size, uniform_timesteps(scheduler.config.num_train_timesteps), generator)
        picks, prompt_index, timesteps, noise = items.image, items.prompt, items.timestep, items.noise
        batch = picks.shape[1]
        latents = shots.latents[picks]  # (steps, C * B, c, h, w)
        flat = lambda x: x.flatten(0, 1)  # noqa: E731
        noisy = scheduler.add_noise(flat(latents), flat(noise), flat(timesteps)).view_as(latents)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(flat(latents), flat(noise), flat(timesteps)).view_as(latents)
        else:
            target = noise
        weight = self._pixel_weights(shots.masks, picks, latents.shape[-2:])

        params = select_text_encoder_parameters(text_encoder, cfg.trainable)
        # betas and eps of the reference implementation (those of diffusers' textual inversion)
        optimizer = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        mixed_precision = autocast(device, cfg.dtype)

        def step(i: int) -> dict[str, torch.Tensor]:
            with mixed_precision:
                states = text_encoder(torch.cat([ids[prompt_index[i]], keep_ids]))[0]
                pred = unet(noisy[i], timesteps[i], states[:batch]).sample.float()
            error = (pred - target[i].float()).pow(2).mean(dim=1, keepdim=True)  # (C * B, 1, h, w)
            losses = {"denoising": (error * weight[i]).sum() / weight[i].sum().clamp_min(1e-6)}
            # ascent on the denoising loss: descend on its negation
            objective = -losses["denoising"]
            if keep_target is not None:
                losses["preserve"] = nn.functional.mse_loss(states[batch:].float(), keep_target.float())
                objective = objective + cfg.preserve_weight * losses["preserve"]
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            return {name: value.detach() for name, value in losses.items()}

        with trainable(params):
            run_steps(step, cfg.steps, cfg.log_every, progress)
        return ErasureResult(tensors=changed_tensors("text_encoder", params))

    @staticmethod
    def _pixel_weights(masks: torch.Tensor | None, picks: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        """(steps, C * B, 1, h, w): each item's mask on the latent grid, or ones without masks."""
        if masks is None:
            return torch.ones((*picks.shape, 1, *grid), device=picks.device)
        return nn.functional.interpolate(masks.float(), size=tuple(grid), mode="area")[picks]
