"""Few-shot unlearning of the text encoder (Fuchi & Takagi, 2024).

Only the text encoders change (every one the model has unless `text_encoders` names some: both on
SDXL; by default their MLPs and their last attention layer): gradient ASCENT
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

import torch
from torch import nn

from ..concept_images import concept_images, uniform_timesteps
from ..errors import UserError
from ..models.family import denoise, encode, encode_ids, family_of, noise_scheduler, prompt_ids, training_target
from ..names import TEXT_ENCODER_SETS, layer_index
from . import ErasureResult, Method, Progress, register
from .configs import FewShotConfig
from .training import Optimization, autocast, changed_tensors, run_steps, trainable

def select_text_encoder_parameters(text_encoder: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """The parameters of the text encoder in the named set, by name."""
    if which not in TEXT_ENCODER_SETS:
        raise UserError(f"unknown text-encoder parameter set {which!r}; known: {', '.join(TEXT_ENCODER_SETS)}")
    named = dict(text_encoder.named_parameters())
    last = max((i for i in map(layer_index, named) if i is not None), default=None)
    return {name: p for name, p in named.items() if TEXT_ENCODER_SETS[which](name, last)}


@register
class FewShot(Method):
    name = "fewshot"

    def erase(self, pipe, cfg: FewShotConfig, progress: Progress | None = None) -> ErasureResult:
        unet = pipe.unet
        encoders = self._encoders(pipe, cfg)
        shots = concept_images(pipe, cfg.concepts, cfg.images, cfg.masks, count=cfg.image_count, templates=cfg.templates, sampling=cfg.sampling())
        templates = len(cfg.templates)
        ids = prompt_ids(pipe, [t.format(concept) for concept in cfg.concepts for t in cfg.templates])  # per encoder (C * templates, 77)
        # The preserved prompts, every one in every step: the text encoders alone are cheap.
        keep_prompts = [t.format(concept) for concept in cfg.preserve for t in cfg.templates]
        keep_ids = prompt_ids(pipe, keep_prompts) if keep_prompts else [i[:0] for i in ids]
        keep_target = encode(pipe, keep_prompts) if keep_prompts else None

        # Everything a step reads, drawn up front: per step, batch_size items of every concept,
        # each an image of that concept with a template, a timestep and noise of its own.
        scheduler = noise_scheduler(pipe)
        generator = torch.Generator().manual_seed(cfg.seed)
        items = shots.draw_items(len(cfg.concepts), templates, cfg.steps, cfg.batch_size, uniform_timesteps(scheduler.config.num_train_timesteps), generator)
        picks, prompt_index, timesteps, noise = items.image, items.prompt, items.timestep, items.noise
        batch = picks.shape[1]
        latents = shots.latents[picks]  # (steps, C * B, c, h, w)
        flat = lambda x: x.flatten(0, 1)  # noqa: E731
        noisy = scheduler.add_noise(flat(latents), flat(noise), flat(timesteps)).view_as(latents)
        target = training_target(scheduler, flat(latents), flat(noise), flat(timesteps)).view_as(latents)
        weight = self._pixel_weights(shots.masks, picks, latents.shape[-2:])

        params = {
            (name, parameter_name): p
            for name in encoders for parameter_name, p in select_text_encoder_parameters(getattr(pipe, name), cfg.trainable).items()
        }
        # betas and eps of the reference implementation (those of diffusers' textual inversion)
        optimization = Optimization(params.values(), pipe.device, cfg.dtype, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        mixed_precision = autocast(pipe.device, cfg.dtype)

        def step(i: int) -> dict[str, torch.Tensor]:
            with mixed_precision:
                context = encode_ids(pipe, [torch.cat([own[prompt_index[i]], keep]) for own, keep in zip(ids, keep_ids)])
                pred = denoise(unet, noisy[i], timesteps[i], context[:batch]).float()
            error = (pred - target[i].float()).pow(2).mean(dim=1, keepdim=True)  # (C * B, 1, h, w)
            losses = {"denoising": (error * weight[i]).sum() / weight[i].sum().clamp_min(1e-6)}
            # ascent on the denoising loss: descend on its negation
            objective = -losses["denoising"]
            if keep_target is not None:
                kept = context[batch:].tensors()
                losses["preserve"] = sum(nn.functional.mse_loss(a.float(), b.float()) for a, b in zip(kept, keep_target.tensors()))
                objective = objective + cfg.preserve_weight * losses["preserve"]
            optimization.step(objective)
            return {name: value.detach() for name, value in losses.items()}

        with trainable(params):
            run_steps(step, cfg.steps, cfg.log_every, progress)
        # Tensors no loss depends on are left as they were, and not written (a text encoder's last
        # layer where the UNet reads the penultimate one's states, as SDXL's does of its first).
        params = optimization.reached_by_loss(params)
        tensors = {}
        for name in encoders:
            tensors |= changed_tensors(name, {n: p for (encoder, n), p in params.items() if encoder == name})
        return ErasureResult(tensors=tensors)

    @staticmethod
    def _encoders(pipe, cfg: FewShotConfig) -> tuple[str, ...]:
        """The text encoders to update: those named, or every one the model has."""
        present = family_of(pipe).text_encoders
        if unknown := [name for name in cfg.text_encoders if name not in present]:
            raise UserError(f"this model has no {', '.join(unknown)}; its text encoders: {', '.join(present)}")
        return tuple(cfg.text_encoders) or present

    @staticmethod
    def _pixel_weights(masks: torch.Tensor | None, picks: torch.Tensor, grid: torch.Size) -> torch.Tensor:
        """(steps, C * B, 1, h, w): each item's mask on the latent grid, or ones without masks."""
        if masks is None:
            return torch.ones((*picks.shape, 1, *grid), device=picks.device)
        return nn.functional.interpolate(masks.float(), size=tuple(grid), mode="area")[picks]
