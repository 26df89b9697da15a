"""Sampling images from a pipeline in fixed-size, seeded chunks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 25
    guidance: float = 5.0
    batch_size: int = 64
    seed: int = 0


@torch.no_grad()
def generate(pipe, prompts: list[str], cfg: SamplingConfig = SamplingConfig(), progress=None) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1], one per prompt.

    Chunk i draws its noise from seed + i, so a prompt list gives the same images whatever else
    runs, and an edited model is compared with its base on the same noise.
    """
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        chunk = prompts[start : start + cfg.batch_size]
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
        images.append(np.asarray(out.images, dtype=np.float32))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(images)
