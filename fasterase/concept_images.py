"""Images of the concepts a method learns from (Forget-Me-Not, MACE, few-shot unlearning).

Either folders the user gives, or, when none is given, images the base model itself draws from
the concepts' prompts. Images are centre-cropped and resized to the pipeline's image size and
encoded to latents with its VAE; masks (optional, white where the concept is) stay in image space,
(N, 1, H, W) in [0, 1], for the attention code to resize to each layer's grid. Images are read with
PIL; nothing is ever unpickled.

Folder layout: for one concept, a folder of its images (or a folder holding a subfolder named
after the concept); for several, one subfolder per concept, named after it. A mask folder mirrors
the image folder, one mask per image with the same file stem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .evaluation.sampling import SamplingConfig, generate_chunks
from .models.family import image_size
from .names import MASK_SOURCES


@dataclass
class ConceptImages:
    latents: torch.Tensor  # (N, C, h, w): VAE latents, scaled as the UNet sees them
    concept_index: torch.Tensor  # (N,) long: which concept each image shows
    masks: torch.Tensor | None = None  # (N, 1, H, W) float in [0, 1], image space

    def __len__(self) -> int:
        return self.latents.shape[0]

    def schedule(self, concepts: int, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(steps, concepts * batch_size) image positions, concept-major: each step draws
        `batch_size` images of every concept (with replacement; concepts may have different
        numbers of images), so that every step carries all of them."""
        by_concept = [torch.nonzero(self.concept_index.cpu() == k).flatten() for k in range(concepts)]
        picks = [own[torch.randint(len(own), (steps, batch_size), generator=generator)] for own in by_concept]
        return torch.cat(picks, dim=1).to(self.latents.device)

    def draw_items(
        self, concepts: int, templates: int, steps: int, batch_size: int,
        timesteps: Callable[[tuple[int, int], torch.Generator], torch.Tensor], generator: torch.Generator,
    ) -> "TrainingItems":
        """Every step's training items, drawn before training (no sampling inside a step):
        `batch_size` items of every concept, concept-major, each one of its concept's images under
        one of its prompts (concept-major (concept, template) prompts), at a timestep drawn by
        `timesteps(shape, generator)`, with noise of its own."""
        image = self.schedule(concepts, steps, batch_size, generator)
        concept = torch.arange(concepts).repeat_interleave(batch_size)
        prompt = concept * templates + torch.randint(templates, (steps, concept.numel()), generator=generator)
        timestep = timesteps((steps, concept.numel()), generator)
        noise = torch.randn((steps, concept.numel(), *self.latents.shape[1:]), generator=generator)
        device = self.latents.device
        return TrainingItems(concept.to(device), image, prompt.to(device), timestep.to(device), noise.to(device, self.latents.dtype))


@dataclass
class TrainingItems:
    """Per step, which image, prompt, timestep and noise each item uses."""

    concept: torch.Tensor  # (C * B,): each item's concept, the same every step
    image: torch.Tensor  # (steps, C * B), into the images
    prompt: torch.Tensor  # (steps, C * B), into the concept-major (concept, template) prompts
    timestep: torch.Tensor  # (steps, C * B)
    noise: torch.Tensor  # (steps, C * B, c, h, w)


def uniform_timesteps(num_train_timesteps: int) -> Callable[[tuple[int, int], torch.Generator], torch.Tensor]:
    """Timesteps drawn uniformly from 0 .. num_train_timesteps - 1, for `ConceptImages.draw_items`."""
    return lambda shape, generator: torch.randint(num_train_timesteps, shape, generator=generator)


def concept_images(
    pipe,
    concepts: list[str],
    images: str = "",
    masks: str = "",
    *,
    count: int = 4,
    templates: tuple[str, ...] | list[str] = ("{}",),
    sampling: SamplingConfig = SamplingConfig(),
) -> ConceptImages:
    """The concepts' images as latents: read from `images` when given, else `count` images per
    concept drawn by the pipeline from its prompts (templates in turn), seeded by `sampling.seed`.
    `masks`: a folder of masks for the image folder, 'attention' for masks where the frozen
    model's cross-attention on the concept's tokens is (`fasterase.attention_masks`), or '' or
    'none' for none."""
    folder = "" if masks in ("", *MASK_SOURCES) else masks
    if images:
        found = _from_folders(pipe, concepts, Path(images).expanduser(), Path(folder).expanduser() if folder else None)
    else:
        prompts = drawing_prompts(concepts, templates, count)
        # Each chunk of drawn images is encoded before the next is drawn: only latents are kept.
        latents = [encode_images(pipe, torch.from_numpy(pixels).permute(0, 3, 1, 2)) for pixels in generate_chunks(pipe, prompts, sampling)]
        found = ConceptImages(torch.cat(latents), torch.arange(len(concepts)).repeat_interleave(count).to(pipe.device))
    if masks == "attention":
        from .attention_masks import attention_masks  # it imports this module

        found.masks = attention_masks(pipe, found, [t.format(c) for c in concepts for t in templates], concepts, seed=sampling.seed)
    return found


def drawing_prompts(concepts: list[str], templates: tuple[str, ...] | list[str], count: int) -> list[str]:
    """The prompts of the images drawn when no folder is given: `count` per concept, concept-major,
    templates in turn."""
    return [templates[i % len(templates)].format(concept) for concept in concepts for i in range(count)]


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """VAE latents (N, C, h, w) of images (N, 3, H, W) in [0, 1]: the posterior means, scaled."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # A float16 VAE whose config asks for it runs in float32 (SDXL's overflows in float16), as
    # the pipelines decode with it, and goes back to float16 after.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = [
            vae.encode(pixels[i : i + batch_size].to(pipe.device, vae.dtype) * 2 - 1).latent_dist.mean
            for i in range(0, pixels.shape[0], batch_size)
        ]
    finally:
        if upcast:
            vae.to(torch.float16)
    return ((torch.cat(latents) - shift) * vae.config.scaling_factor).to(pipe.unet.dtype)


def _from_folders(pipe, concepts: list[str], images: Path, masks: Path | None) -> ConceptImages:
    size = image_size(pipe)
    pixels, mask_list, index = [], [], []
    for k, folder in enumerate(_concept_folders(images, concepts)):
        found = _read_folder(folder, "RGB", size, Image.Resampling.BICUBIC)
        if not found:
            raise UserError(f"no readable image in {folder}")
        pixels += found.values()
        index += [k] * len(found)
        if masks is not None:
            mask_folder = masks / folder.relative_to(images)
            read = _read_folder(mask_folder, "L", size, Image.Resampling.BILINEAR) if mask_folder.is_dir() else {}
            missing, extra = sorted(set(found) - set(read)), sorted(set(read) - set(found))
            if missing or extra:
                parts = [f"no mask for {_names(missing)}"] * bool(missing) + [f"masks without an image: {_names(extra)}"] * bool(extra)
                raise UserError(f"masks in {mask_folder} do not match the images in {folder}: {'; '.join(parts)}")
            mask_list += [read[stem] for stem in found]
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    mask_tensor = torch.from_numpy(np.stack(mask_list))[:, None].to(pipe.device) if masks is not None else None
    return ConceptImages(encode_images(pipe, batch), torch.tensor(index, device=pipe.device), mask_tensor)


def _concept_folders(images: Path, concepts: list[str]) -> list[Path]:
    """One folder per concept: subfolders named after the concepts, or, for one concept, the folder itself."""
    subfolders = [images / concept for concept in concepts]
    present = [folder.is_dir() for folder in subfolders]
    if all(present):
        return subfolders
    if len(concepts) == 1:
        return [images]
    missing = [concept for concept, here in zip(concepts, present) if not here]
    raise UserError(f"with several concepts, {images} needs one subfolder per concept; missing: {_names(missing)}")


def _read_folder(folder: Path, mode: str, size: int, resample) -> dict[str, np.ndarray]:
    """stem -> image (size, size, 3) for RGB or (size, size) for L, float32 in [0, 1], centre-cropped
    and resized; files PIL cannot read are skipped."""
    read = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            with Image.open(path) as image:
                image = ImageOps.fit(image.convert(mode), (size, size), method=resample)
        except (UnidentifiedImageError, OSError):
            continue
        if path.stem in read:
            raise UserError(f"{folder} has two images named {path.stem} (e.g. {path.name}); stems must be unique")
        read[path.stem] = np.asarray(image, dtype=np.float32) / 255.0
    return read


def _names(items: list[str], shown: int = 5) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
