"""Sampling images from a pipeline in fixed-size, seeded chunks."""

from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch

from ..config import SamplingConfig
from ..distributed import all_gather, ranks
from ..errors import UserError, first_line
from ..models.loading import default_sample_steps
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


def sample_steps(pipe, cfg: SamplingConfig) -> int:
    """The denoising steps `cfg` draws `pipe`'s images in: its own, or the model's default."""
    return cfg.steps or default_sample_steps(pipe)


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
    """Images (N, H, W, 3) float32 in [0, 1], one per prompt (see `generate_chunks`); under
    torchrun each process draws its share of the chunks and every process gets them all."""
    return gather_images(draw_share(pipe, prompts, cfg, progress))


def generate_chunks(pipe, prompts: list[str], cfg: SamplingConfig = SamplingConfig(), progress=None) -> Iterator[np.ndarray]:
    """The images of the prompts, (n, H, W, 3) float32 in [0, 1], a chunk at a time, so that a
    caller that keeps less than the pixels (latents, judgements) never holds them all.

    Chunk i (of `chunk_size(pipe, cfg.batch_size)` prompts) draws its noise from seed + i, so a
    prompt list gives the same images whatever else runs, and an edited model is compared with its
    base on the same noise.
    """
    return (images for _, images in _prompt_chunks(pipe, prompts, cfg, progress))


def draw_share(pipe, prompts: list[str] | list[PromptRow], cfg: SamplingConfig = SamplingConfig(), progress=None, share: tuple[int, int] | None = None) -> list[tuple[int, np.ndarray]]:
    """This process's chunks of a prompt list, or of a prompt set's rows, as (position of the
    chunk's first image, its images): chunk i goes to process i mod N (`share`: (rank, N), by
    default torchrun's), drawn exactly as one process would draw it. A prompt set's rows each draw
    their noise from their own seed (else cfg.seed + their index) with their own guidance (else
    cfg.guidance), so their images do not depend on the batch size or on which rows are drawn
    together; a chunk holds consecutive rows of one guidance."""
    rank, size = share or ranks()
    chunks = _row_chunks if prompts and isinstance(prompts[0], PromptRow) else _prompt_chunks
    return list(chunks(pipe, prompts, cfg, progress, lambda i: i % size == rank))


def gather_images(share: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Every process's `draw_share` put together in order: all the images, in every process."""
    chunks = sorted((chunk for part in all_gather(share) for chunk in part), key=lambda chunk: chunk[0])
    return np.concatenate([images for _, images in chunks])


@torch.no_grad()
def _prompt_chunks(pipe, prompts: list[str], cfg: SamplingConfig, progress, drawn=lambda i: True) -> Iterator[tuple[int, np.ndarray]]:
    steps = sample_steps(pipe, cfg)
    check_steps(pipe.scheduler, steps)
    size = chunk_size(pipe, cfg.batch_size)
    for i, start in enumerate(range(0, len(prompts), size)):
        if drawn(i):
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed + i)
            latents = torch.randn((len(prompts[start : start + size]), *_latent_shape(pipe)), generator=generator)
            yield start, _draw(pipe, prompts[start : start + size], latents, cfg.guidance, steps, progress)


@torch.no_grad()
def _row_chunks(pipe, rows: list[PromptRow], cfg: SamplingConfig, progress, drawn=lambda i: True) -> Iterator[tuple[int, np.ndarray]]:
    steps = sample_steps(pipe, cfg)
    check_steps(pipe.scheduler, steps)
    size = chunk_size(pipe, cfg.batch_size)
    guidance = [row.guidance if row.guidance is not None else cfg.guidance for row in rows]
    start, i = 0, 0
    while start < len(rows):
        end = start + 1
        while end < min(len(rows), start + size) and guidance[end] == guidance[start]:
            end += 1
        if drawn(i):
            seeds = [row.seed if row.seed is not None else cfg.seed + start + j for j, row in enumerate(rows[start:end])]
            latents = torch.cat([torch.randn((1, *_latent_shape(pipe)), generator=torch.Generator(device="cpu").manual_seed(s)) for s in seeds])
            yield start, _draw(pipe, [row.prompt for row in rows[start:end]], latents, guidance[start], steps, progress)
        start, i = end, i + 1


def _latent_shape(pipe) -> tuple[int, int, int]:
    return (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)


def _draw(pipe, prompts: list[str], latents: torch.Tensor, guidance: float, steps: int, progress) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=prompts,
        latents=latents.to(device=pipe.device, dtype=pipe.unet.dtype),
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
    )
    images = np.asarray(out.images, dtype=np.float32)
    if not np.isfinite(images).all():  # would be written as black or noise, and judged
        raise UserError("sampling produced nan or inf pixels: the model's weights or the guidance overflow in this dtype")
    if progress is not None:
        progress(len(prompts))
    return images
