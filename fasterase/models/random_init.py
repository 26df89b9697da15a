"""Pipelines of every supported family with random weights, built from configs: the tests' tiny
models and the benchmarks' real-size ones, with nothing downloaded.

The architectures follow the released models' configs (SD1.5, SD2.1, SDXL base 1.0); "tiny" keeps
their shape (blocks, attention layout, added conditioning) at a width that builds and runs in
seconds on a CPU. Every pipeline uses the built-in world's tokenizer: the real CLIP vocabulary is a
download, and only the size of the token-embedding table depends on it (49,408 rows in the real
models, a few hundred here).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

FAMILY_NAMES = ("sd1", "sd2", "sdxl")
SIZES = ("tiny", "real")

# name -> size -> the UNet's config (sample_size is set from the image size)
_UNETS = {
    "sd1": {
        "real": dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        "tiny": dict(
            block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
    },
    "sd2": {
        "real": dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
            use_linear_projection=True, upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        "tiny": dict(
            block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=48,
            use_linear_projection=True, upcast_attention=True,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
    },
    "sdxl": {
        "real": dict(
            block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "tiny": dict(
            block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=32 + 64,
            transformer_layers_per_block=(1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 64,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
    },
}

# (hidden, layers, heads, intermediate, activation, projection) of CLIP ViT-L, OpenCLIP ViT-H and ViT-bigG
_TEXT = {
    "real": {"clip_l": (768, 12, 12, 3072, "quick_gelu", 768), "open_clip_h": (1024, 23, 16, 4096, "gelu", 1024), "open_clip_g": (1280, 32, 20, 5120, "gelu", 1280)},
    # (the two SDXL encoders differ in width, as the real ones do: diffusers' single-file loader tells
    # them apart by it)
    "tiny": {"clip_l": (32, 2, 4, 64, "quick_gelu", 32), "open_clip_h": (48, 2, 4, 96, "gelu", 48), "open_clip_g": (64, 2, 4, 128, "gelu", 64)},
}
_ENCODERS = {"sd1": ("clip_l",), "sd2": ("open_clip_h",), "sdxl": ("clip_l", "open_clip_g")}
_VAE = {"real": ((128, 256, 512, 512), 2), "tiny": ((32, 64), 1)}
# The released models' latent scaling
_VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def _text_encoder(spec: tuple, vocab_size: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, layers, heads, intermediate, activation, projection = spec
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, hidden_act=activation, projection_dim=projection, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def random_pipeline(family: str, size: str = "tiny", *, image_size: int | None = None, prediction_type: str = "epsilon", seed: int = 0):
    """A pipeline of `family` ("sd1", "sd2" or "sdxl") at `size` ("tiny" or "real"), random
    weights drawn from `seed`, drawing images of `image_size` pixels (default: 32 tiny, the
    released model's real) with a DDIM scheduler of `prediction_type`."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from ..toyworld.tokenizer import save_tokenizer
    from .family import FAMILIES

    if family not in FAMILY_NAMES or size not in SIZES:
        raise ValueError(f"family must be one of {FAMILY_NAMES} and size one of {SIZES}")
    torch.manual_seed(seed)
    channels, vae_layers = _VAE[size]
    image_size = image_size or (32 if size == "tiny" else {"sd1": 512, "sd2": 768, "sdxl": 1024}[family])
    scale = 2 ** (len(channels) - 1)
    unet = UNet2DConditionModel(sample_size=image_size // scale, in_channels=4, out_channels=4, norm_num_groups=32, **_UNETS[family][size])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, block_out_channels=channels, layers_per_block=vae_layers,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        norm_num_groups=32, scaling_factor=_VAE_SCALING[family],
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    specs = _ENCODERS[family]
    encoders = [_text_encoder(_TEXT[size][spec], len(tokenizer), with_projection=i == 1) for i, spec in enumerate(specs)]
    parts = {"vae": vae, "unet": unet, "scheduler": scheduler, "text_encoder": encoders[0], "tokenizer": tokenizer}
    if len(encoders) == 2:
        parts |= {"text_encoder_2": encoders[1], "tokenizer_2": tokenizer}
    else:
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return getattr(diffusers, FAMILIES[family].pipeline_class)(**parts)


def save_random_pipeline(folder: str | Path, family: str, size: str = "tiny", **options) -> Path:
    """`random_pipeline(family, size, **options)` written as a diffusers folder (safetensors)."""
    random_pipeline(family, size, **options).save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
