"""Sampling images from a pipeline in fixed-size, seeded chunks."""

from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch

from ..config import SamplingConfig
from ..errors import UserError, first_line
from .prompts import PromptRow


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
    check_steps(pipe.scheduler, cfg.steps)
    size = chunk_size(pipe, cfg.batch_size)
    for i, start in enumerate(range(0, len(prompts), size)):
        chunk = prompts[start : start + size]
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
        latents = torch.randn((len(chunk), *_latent_shape(pipe)), generator=generator)
        yield _draw(pipe, chunk, latents, cfg.guidance, cfg, progress)


@torch.no_grad()
def generate_rows(pipe, rows: list[PromptRow], cfg: SamplingConfig = SamplingConfig(), progress=None) -> Iterator[np.ndarray]:
    """The images of a prompt set's rows (`fasterase.evaluation.prompts`), as `generate_chunks`
    gives them, each row's noise drawn from its own seed (else cfg.seed + its index) and with its
    own guidance (else cfg.guidance): the images do not depend on the batch size or on which rows
    are drawn together. A chunk holds consecutive rows of one guidance."""
    check_steps(pipe.scheduler, cfg.steps)
    size = chunk_size(pipe, cfg.batch_size)
    start = 0
    while start < len(rows):
        guidance = rows[start].guidance if rows[start].guidance is not None else cfg.guidance
        end = start + 1
        while end < min(len(rows), start + size) and (rows[end].guidance if rows[end].guidance is not None else cfg.guidance) == guidance:
            end += 1
        seeds = [row.seed if row.seed is not None else cfg.seed + start + i for i, row in enumerate(rows[start:end])]
        latents = torch.cat([torch.randn((1, *_latent_shape(pipe)), generator=torch.Generator(device="cpu").manual_seed(s)) for s in seeds])
        yield _draw(pipe, [row.prompt for row in rows[start:end]], latents, guidance, cfg, progress)
        start = end


def _latent_shape(pipe) -> tuple[int, int, int]:
    return (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)


def _draw(pipe, prompts: list[str], latents: torch.Tensor, guidance: float, cfg: SamplingConfig, progress) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=prompts,
        latents=latents.to(device=pipe.device, dtype=pipe.unet.dtype),
        num_inference_steps=cfg.steps,
        guidance_scale=guidance,
        output_type="np",
    )
    images = np.asarray(out.images, dtype=np.float32)
    if not np.isfinite(images).all():  # would be written as black or noise, and judged
        raise UserError("sampling produced nan or inf pixels: the model's weights or the guidance overflow in this dtype")
    if progress is not None:
        progress(len(prompts))
    return images
