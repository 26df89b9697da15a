"""Model families: what differs between SD1.x, SD2.x and SDXL lives here, and only here.

diffusers keeps one UNet class for all three and puts what differs in configs and pipelines; so
does fasterase. A method asks this module how prompts become what a UNet call reads
(`encode`, `encode_ids`, `unconditional`), calls the UNet through `denoise`, builds data targets
with `training_target`, and never asks which family it has:
- SD1.x (CLIP ViT-L, 768 wide) and SD2.x (OpenCLIP ViT-H, 1024 wide, epsilon or v-prediction):
  one text encoder, its last hidden state; nothing else conditions the UNet.
- SDXL base: two text encoders, each's penultimate hidden state, concatenated (768 + 1280 = 2048);
  the UNet also reads the second encoder's pooled, projected embedding and six time ids (original
  size, crop corner, target size), as "added conditioning". Its pipeline's classifier-free guidance
  reads zeros, not the empty prompt, as the unconditional input (`force_zeros_for_empty_prompt`).
Everything else (the SDXL refiner, inpainting UNets, SD3, Flux, ...) is refused at load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

SUPPORTED = "SD1.x, SD2.x and SDXL base"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2" or "sdxl"
    title: str  # how messages name it
    pipeline_class: str  # the diffusers pipeline that draws its images
    # text-encoder components and their tokenizers, in the order their states are concatenated
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    # which hidden state of each text encoder the UNet reads: -1 the last (after the final layer
    # norm, as `text_encoder(ids)[0]`), -2 the penultimate (before the last layer)
    hidden_state: int
    # whether the UNet also reads the last encoder's pooled embedding and the time ids
    added_conditioning: bool

    def components(self) -> tuple[str, ...]:
        """The components a method may change and an edit may bind to."""
        return ("unet", *self.text_encoders)


SD1 = Family("sd1", "SD1.x", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), -1, False)
SD2 = Family("sd2", "SD2.x", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), -1, False)
SDXL = Family(
    "sdxl", "SDXL", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), -2, True
)
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}
# SD2.x's text encoder (OpenCLIP ViT-H) uses GELU; SD1.x's (CLIP ViT-L) and the built-in world's quick GELU
_SD2_ACTIVATION = "gelu"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} as JSON: {getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _unsupported(what: str) -> UserError:
    return UserError(f"{what} is not supported: fasterase erases concepts from {SUPPORTED} models")


def folder_family(folder: Path) -> Family:
    """The family of a diffusers pipeline folder, read from its model_index.json and the UNet's and
    text encoder's configs, before anything is loaded. UserError for every other kind of model, and
    for a folder that is no pipeline folder."""
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = read_json(folder / "model_index.json")
    kind = index.get("_class_name")
    unet = read_json(folder / "unet" / "config.json") if (folder / "unet" / "config.json").is_file() else {}
    if unet.get("in_channels", 4) != 4:
        raise _unsupported(f"{folder}: a UNet with {unet['in_channels']} input channels (inpainting or instruction editing)")
    if kind == "StableDiffusionPipeline":
        text = read_json(folder / "text_encoder" / "config.json") if (folder / "text_encoder" / "config.json").is_file() else {}
        return SD2 if text.get("hidden_act") == _SD2_ACTIVATION else SD1
    if kind == "StableDiffusionXLPipeline" and index.get("text_encoder", [None])[0] is not None:
        if unet.get("addition_embed_type") == "text_time":
            return SDXL
    if kind in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline") and index.get("text_encoder", [None])[0] is None:
        raise _unsupported(f"{folder}: the SDXL refiner")
    raise _unsupported(f"{folder}: a {kind or 'pipeline of unknown class'}")


def family_of(pipe) -> Family:
    """The family of a loaded pipeline (see `folder_family` for how a folder is told apart)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    return SD2 if pipe.text_encoder.config.hidden_act == _SD2_ACTIVATION else SD1


@dataclass
class Conditioning:
    """What a UNet call reads besides x_t and t, for a batch of N prompts.

    states: (N, L, d) the text states cross-attention reads (d: the UNet's cross_attention_dim).
    added: the added conditioning, by the names diffusers' UNet takes in `added_cond_kwargs`
        (SDXL: "text_embeds" (N, p) and "time_ids" (N, 6)); empty for SD1.x and SD2.x.
    Indexing, `cat` and `expand` act on every tensor alike, so a method gathers and batches
    conditioning as it would a tensor of text states.
    """

    states: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning(self.states[index], {k: v[index] for k, v in self.added.items()})

    def tensors(self) -> list[torch.Tensor]:
        return [self.states, *self.added.values()]

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([p.states for p in parts]), {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added})

    def expand(self, n: int) -> "Conditioning":
        """One prompt's conditioning (a batch of 1) as a batch of n, without copying."""
        return Conditioning(self.states.expand(n, -1, -1), {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})


def denoise(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's prediction at (x_t, t) under `cond`, in the scheduler's prediction type."""
    return unet(x, t, cond.states, added_cond_kwargs=cond.added or None).sample


def context_width(pipe) -> int:
    """d, the width of the text states that cross-attention reads (2048 on SDXL: both encoders')."""
    return pipe.unet.config.cross_attention_dim


def image_size(pipe) -> int:
    """The side of the square images the pipeline draws by default: VAE scale x UNet sample size."""
    return pipe.vae_scale_factor * pipe.unet.config.sample_size


def prompt_ids(pipe, prompts: list[str], tokenizers: list | None = None) -> list[torch.Tensor]:
    """Token ids (N, 77) of the prompts for each text encoder, padded as the pipeline pads them,
    on that encoder's device. `tokenizers` replaces the pipeline's (e.g. ones with new words)."""
    family = family_of(pipe)
    tokenizers = tokenizers or [getattr(pipe, name) for name in family.tokenizers]
    return [
        t(prompts, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt").input_ids.to(
            getattr(pipe, encoder).device
        )
        for t, encoder in zip(tokenizers, family.text_encoders)
    ]


def encode_ids(pipe, ids: list[torch.Tensor]) -> Conditioning:
    """The conditioning of prompts given as token ids (one (N, 77) tensor per text encoder, from
    `prompt_ids`), with gradients to whatever requires them (few-shot unlearning trains the
    encoders, textual inversion their input embeddings)."""
    family = family_of(pipe)
    states, pooled = [], None
    for encoder_name, encoder_ids in zip(family.text_encoders, ids):
        encoder = getattr(pipe, encoder_name)
        out = encoder(encoder_ids, output_hidden_states=family.hidden_state != -1)
        states.append(out[0] if family.hidden_state == -1 else out.hidden_states[family.hidden_state])
        pooled = out[0]  # CLIPTextModelWithProjection's first output is its projected, pooled embedding
    dtype = pipe.unet.dtype
    if not family.added_conditioning:
        return Conditioning(states[0].to(dtype))
    return Conditioning(torch.cat(states, dim=-1).to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": _time_ids(pipe, len(pooled))})


def _time_ids(pipe, n: int) -> torch.Tensor:
    """SDXL's added time ids for the pipeline's default image: (original size, crop corner (0, 0),
    target size), as its pipeline passes them when drawing at that size."""
    side = image_size(pipe)
    return torch.tensor([[side, side, 0, 0, side, side]], dtype=pipe.unet.dtype, device=pipe.unet.device).expand(n, -1)


@torch.no_grad()
def encode(pipe, prompts: list[str], batch_size: int = 256) -> Conditioning:
    """The conditioning of prompts, as the pipeline computes it when drawing them."""
    return Conditioning.cat([
        encode_ids(pipe, prompt_ids(pipe, prompts[start : start + batch_size])) for start in range(0, len(prompts), batch_size)
    ])


@torch.no_grad()
def unconditional(pipe) -> Conditioning:
    """(1 row) What classifier-free guidance's unconditional branch reads when the pipeline draws
    without a negative prompt: the empty prompt, or zeros where the pipeline forces them (SDXL)."""
    empty = encode(pipe, [""])
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return Conditioning(torch.zeros_like(empty.states), {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in empty.added.items()})
    return empty


def noise_scheduler(pipe):
    """The scheduler that noises training data, x_t = add_noise(x_0, noise, t) at any of the
    training timesteps: DDPM on the pipeline's noise schedule and prediction type (the pipeline's
    own may be a sampler, such as Euler, that adds noise only at its sampling steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_configs(pipe, where: str) -> None:
    """UserError if a loaded pipeline's configs hold values that diffusers reads only while drawing
    or training, where a bad one would fail deep inside: the UNet's sample size, the VAE's latent
    scaling, the scheduler's prediction type."""
    size = pipe.unet.config.sample_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"{where}: the UNet's sample_size is {size!r}, not a positive whole number")
    scale, shift = getattr(pipe.vae.config, "scaling_factor", None), getattr(pipe.vae.config, "shift_factor", None)
    if not (_finite_number(scale) and scale > 0 and (shift is None or _finite_number(shift))):
        raise UserError(f"{where}: the VAE's scaling_factor ({scale!r}) must be a positive number, its shift_factor ({shift!r}) a number or null")
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise UserError(f"{where}: the scheduler's prediction type {kind!r} is not supported ({', '.join(PREDICTION_TYPES)})")


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for x_t = add_noise(latents, noise, t), in the scheduler's
    prediction type: the noise (epsilon), the velocity (v_prediction) or the clean latents (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents  # "sample"; `check_configs` refused every other type at load
