"""Masks of a concept in its images, from the frozen model's own cross-attention (for MACE when no
mask folder is given, in place of a segmenter).

Each image is noised at a few timesteps and the frozen UNet denoises it under its concept's
prompt, with the attention that image positions pay to the concept's token columns captured in
every cross-attention layer (`fasterase.attention.AttentionCapture` with maps). Each layer's map
(mean over heads, sum over the watched columns) is resized from its query grid to the image; the
maps are summed over layers, so that layers paying the concept more attention count more, and
averaged over timesteps. Each image's map is rescaled to [0, 1] between its own minimum and maximum
and thresholded.

Measured on the built-in world (8 shapes, 8 images each, MACE's four default templates,
intersection over union with the exact masks; a mask of all ones scores 0.26):
- columns: the concept's sub-tokens alone score 0.02, far below all ones: in the built-in model
  they draw attention from the background. With the end-of-text and padding columns, where the
  causal text encoder spreads the caption and which MACE's loss also watches (`include_end`, on
  by default there), 0.71.
- timesteps: one alone scores 0.69 at t=50, 0.68 at 200, 0.67 at 400, 0.62 at 700, 0.55 at 900
  (the noise hides the layout); averaging 200/300/400 scores 0.71, above any one of them. Those
  are the middle of MACE's concept-focal density, the steps its LoRAs train at, so the masks show
  where attention goes at those steps.
- threshold, on the map rescaled between its minimum and maximum: 0.5 / 0.6 / 0.65 / 0.7 / 0.8
  score 0.62 / 0.71 / 0.73 / 0.73 / 0.59 (Otsu's threshold, tried too, 0.56-0.62). A fraction
  of the maximum without subtracting the minimum fails (0.26-0.63): the padding columns take a
  large share of the attention everywhere. 0.6 covers 94% of the concept's pixels (0.65: 90%);
  a pixel left out of the mask is one the loss never trains.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionCapture, capture_processors
from .concept_images import ConceptImages
from .models.family import denoise, encode, noise_scheduler
from .models.text import token_columns

FOCAL_TIMESTEPS = (200, 300, 400)  # the middle of MACE's concept-focal density (`methods.mace.focal_timesteps`)


@torch.no_grad()
def attention_masks(
    pipe,
    images: ConceptImages,
    prompts: list[str],
    concepts: list[str],
    *,
    include_end: bool = True,
    timesteps: tuple[int, ...] = FOCAL_TIMESTEPS,
    threshold: float = 0.6,
    batch_size: int = 8,
    seed: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """(N, 1, H, W) float masks in {0, 1}, image space, of the concept in each of `images`, like
    `ConceptImages.masks`: 1 where the frozen UNet's cross-attention on the concept's token
    columns is at least `threshold` of the way from the image's lowest to its highest value.

    prompts: concept-major, the same number for every concept (MACE's (concept, template)
        prompts); the j-th image of concept k (in the order of `images`) reads its concept's
        prompt j mod T, the prompt `concept_images` drew it from.
    include_end: also watch the end-of-text and padding columns (see `models.text.token_columns`).
    timesteps: training timesteps at which each image is noised and its maps averaged.
    batch_size: images per UNet call (each call carries them at every timestep).
    seed: of the noise. backend: of the cross-attention op.
    """
    if not concepts or len(prompts) % len(concepts):
        raise ValueError(f"{len(prompts)} prompts do not split evenly over {len(concepts)} concepts")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie strictly between 0 and 1, not {threshold}")
    scheduler = noise_scheduler(pipe)
    steps = scheduler.config.num_train_timesteps
    if not timesteps or any(not 0 <= t < steps for t in timesteps):
        raise ValueError(f"timesteps must be training timesteps, 0 .. {steps - 1}, not {list(timesteps)}")
    latents, device = images.latents, images.latents.device
    templates = len(prompts) // len(concepts)

    columns = token_columns(pipe.tokenizer, prompts, [c for c in concepts for _ in range(templates)], include_end)
    watched = _column_indices(columns).to(device)
    context = encode(pipe, prompts)
    # Image i is its concept's ordinal-th image; the same prompt order as concept_images draws in.
    is_concept = nn.functional.one_hot(images.concept_index, len(concepts))
    ordinal = (is_concept.cumsum(0) * is_concept).sum(1) - 1
    prompt = images.concept_index * templates + ordinal % templates

    count = len(timesteps)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((count, *latents.shape), generator=generator).to(device, latents.dtype)
    t = torch.tensor(timesteps, device=device)
    height, width = latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor
    capture = AttentionCapture(watched[:0], maps=True)
    maps = []
    with capture_processors(pipe.unet, capture, backend):
        for start in range(0, len(images), batch_size):
            part = slice(start, start + batch_size)
            batch = latents[part].shape[0]
            # Items are timestep-major: the chunk's images at timesteps[0], then at timesteps[1], ...
            item_t = t.repeat_interleave(batch)
            x = scheduler.add_noise(latents[part].repeat(count, 1, 1, 1), noise[:, part].flatten(0, 1), item_t)
            item_prompt = prompt[part].repeat(count)
            capture.columns = watched[item_prompt]
            capture.stats.clear()
            denoise(pipe.unet, x, item_t, context[item_prompt])
            summed = sum(_image_map(stats.maps, latents.shape[-2:], (height, width)) for stats in capture.stats)
            maps.append(summed.view(count, batch, 1, height, width).mean(0))
    return (_rescaled(torch.cat(maps)) >= threshold).float()


def _column_indices(columns: torch.Tensor) -> torch.Tensor:
    """(P, W) long: the watched columns of each row of `columns` (P, Mk) bool, in order, padded
    with -1; W is the most any row watches (the capture's maps take indices)."""
    length = columns.shape[1]
    positions = torch.where(columns, torch.arange(length), length).sort(1).values[:, : int(columns.sum(1).max())]
    return torch.where(positions < length, positions, -1)


def _image_map(maps: torch.Tensor, latent_shape: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W): one layer's maps (B, heads, Mq, W), mean over heads and summed over the
    watched columns, from the layer's query grid (the latents' aspect) to the image's size."""
    per_position = maps.mean(1).sum(-1)  # (B, Mq); unused slots hold zeros
    queries = per_position.shape[1]
    rows = round((queries * latent_shape[0] / latent_shape[1]) ** 0.5)
    grid = per_position.view(-1, 1, rows, queries // rows)
    return nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)


def _rescaled(maps: torch.Tensor) -> torch.Tensor:
    """Each map (N, 1, H, W) from its minimum (0) to its maximum (1); a flat map, which shows no
    place, becomes all ones, as if the image had no mask."""
    low = maps.amin((1, 2, 3), keepdim=True)
    span = maps.amax((1, 2, 3), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp(min=torch.finfo(maps.dtype).tiny), torch.ones_like(maps))
