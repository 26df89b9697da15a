"""Training data drawn from the frozen model itself: noisy latents along its own sampling paths.

ESD and KPOP train on x_t from the frozen model's trajectories under the concept's prompt. The bank
samples those once, in batches, and stores every x_t with the frozen model's predictions that the
losses need, so that a training step is a fixed-shape gather from it: no sampling inside the step,
no host synchronisation, and any number of concepts, timesteps and samples per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..evaluation.sampling import check_steps
from ..models.family import Conditioning, denoise, encode, unconditional


@dataclass
class TrajectoryBank:
    latents: torch.Tensor  # (N, C, h, w): x_t
    timesteps: torch.Tensor  # (N,) long
    prompt_index: torch.Tensor  # (N,) long, into the prompt lists the bank was built from
    # The frozen model's predictions at x_t, which sampling computed anyway (the two halves of
    # classifier-free guidance): under the entry's own prompt, and under the empty prompt.
    eps_prompt: torch.Tensor  # (N, C, h, w)
    eps_empty: torch.Tensor  # (N, C, h, w)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def take(self, index: torch.Tensor) -> "TrajectoryBank":
        """The entries at `index` (a boolean mask or positions)."""
        return TrajectoryBank(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


@torch.no_grad()
def sample_trajectories(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch_size: int) -> TrajectoryBank:
    """DDIM trajectories of the frozen model, one per prompt, `batch_size` prompts at a time, with
    every x_t and the model's predictions there kept (under the prompt, and under what guidance's
    unconditional branch reads)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    check_steps(scheduler, steps)
    scheduler.set_timesteps(steps, device=pipe.device)
    unet = pipe.unet
    channels, size = unet.config.in_channels, unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    cond = encode(pipe, prompts)
    uncond = unconditional(pipe)
    latents, timesteps, index, eps_prompt, eps_empty = [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        c = cond[start : start + batch_size]
        n = len(c)
        x = torch.randn((n, channels, size, size), generator=generator).to(pipe.device, unet.dtype) * scheduler.init_noise_sigma
        context = Conditioning.cat([uncond.expand(n), c])
        for t in scheduler.timesteps:
            latents.append(x)
            timesteps.append(t.expand(n))
            index.append(torch.arange(start, start + n, device=pipe.device))
            eps_uncond, eps_cond = denoise(unet, scheduler.scale_model_input(torch.cat([x, x]), t), t, context).chunk(2)
            eps_prompt.append(eps_cond)
            eps_empty.append(eps_uncond)
            x = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, x).prev_sample
    return TrajectoryBank(torch.cat(latents), torch.cat(timesteps).long(), torch.cat(index), torch.cat(eps_prompt), torch.cat(eps_empty))


@torch.no_grad()
def predict_noise(unet, latents: torch.Tensor, timesteps: torch.Tensor, context: Conditioning, batch_size: int) -> torch.Tensor:
    """The UNet's predictions for many (x_t, t, conditioning) triples, `batch_size` at a time."""
    if latents.shape[0] == 0:
        return torch.empty_like(latents)
    return torch.cat([
        denoise(unet, latents[i : i + batch_size], timesteps[i : i + batch_size], context[i : i + batch_size])
        for i in range(0, latents.shape[0], batch_size)
    ])
