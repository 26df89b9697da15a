"""Sampling images from a pipeline in fixed-size, seeded chunks."""

from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch

from ..config import SamplingConfig
from ..errors import UserError, first_line


# Latent pixels drawn at a time by default: 64 images on the built-in world (8x8 latents) and at
# 256 px, 16 at 512 px, 4 at SDXL's 1024 px, so that the UNet's and the VAE's activations stay
# bounded whatever the number of prompts.
LATENT_PIXELS_PER_CHUNK = 2**16
MAX_CHUNK = 64


def chunk_size(pipe, requested: int = 0) -> int:
    """How many prompts to sample at a time: `requested`, or by default as many as keep a chunk
    within LATENT_PIXELS_PER_CHUNK."""
    return requested or max(1, min(MAX_CHUNK, LATENT_PIXELS_PER_CHUNK // pipe.unet.config.sample_size**2))


def check_steps(scheduler, steps: int) -> None:
    """UserError unless `scheduler` can draw an image in `steps` steps, which only the scheduler
    knows (PNDM's Runge-Kutta warm-up needs at least 4, none more than its training timesteps):
    a dry run, on a copy, over one zero latent pixel."""
    dry = copy.deepcopy(scheduler)
    try:
        dry.set_timesteps(steps)
        x = torch.zeros(1, 1, 1, 1)
        for t in dry.timesteps:
            x = dry.step(torch.zeros_like(x), t, dry.scale_model_input(x, t)).prev_sample
    except Exception as exc:  # each scheduler raises its own types; the user needs one line
        steps_text = f"{steps} step" + ("s" if steps > 1 else "")
        raise UserError(f"the model's {type(scheduler).__name__} cannot draw images in {steps_text} ({first_line(exc)})") from None


def generate(pipe, prompts: list[str], cfg: SamplingConfig = SamplingConfig(), progress=None) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1], one per prompt (see `generate_chunks`)."""
    return np.concatenate(list(generate_chunks(pipe, prompts, cfg, progress)))


@torch.no_grad()
def generate_chunks(pipe, prompts: list[str], cfg: SamplingConfig = SamplingConfig(), progress=None) -> Iterator[np.ndarray]:
    """The images of the prompts, (n, H, W, 3) float32 in [0, 1], a chunk at a time, so that a
    caller that keeps less than the pixels (latents, judgements) never holds them all.

    Chunk i (of `chunk_size(pipe, cfg.batch_size)` prompts) draws its noise from seed + i, so a
    prompt list gives the same images whatever else runs, and an edited model is compared with its
    base on the same noise.
    """
    pipe.set_progress_bar_config(disable=True)
    check_steps(pipe.scheduler, cfg.steps)
    size = chunk_size(pipe, cfg.batch_size)
    for i, start in enumerate(range(0, len(prompts), size)):
        chunk = prompts[start : start + size]
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
        latents = torch.randn(
            (len(chunk), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size),
            generator=generator,
        ).to(device=pipe.device, dtype=pipe.unet.dtype)
        out = pipe(
            prompt=chunk,
            latents=latents,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            output_type="np",
        )
        images = np.asarray(out.images, dtype=np.float32)
        if not np.isfinite(images).all():  # would be written as black or noise, and judged
            raise UserError("sampling produced nan or inf pixels: the model's weights or the guidance overflow in this dtype")
        if progress is not None:
            progress(len(chunk))
        yield images
