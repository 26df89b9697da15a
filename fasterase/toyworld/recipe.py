"""The recipe that trains the built-in world: classifier, VAE, then text encoder and UNet together.

The model has Stable Diffusion's architecture at a small size: 32x32 RGB images, a VAE that
downsamples 4x to 8x8x4 latents, a UNet2DConditionModel with cross-attention in its down, mid and
up blocks, a CLIP text encoder with a 77-token context padded with end-of-text (as SD1.x).

Prompt-following is the hard part for a text encoder trained from scratch: about 70 of the 77 keys
are end-of-text pads, and unless they carry the caption the content tokens drown in the softmax.
Two things address it: an auxiliary loss that asks every end-of-text position to predict the
caption's labels (so the pads carry the caption from the first steps), and caption dropout, so
that sampling can use classifier-free guidance.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from . import world
from .classifier import WorldClassifier, augment, predict, to_model_input
from .tokenizer import MAX_LENGTH, save_tokenizer


@dataclass
class BuildConfig:
    seed: int = 0
    train_images: int = 48000
    heldout_images: int = 4000
    classifier_steps: int = 1200
    classifier_batch: int = 128
    vae_steps: int = 600
    vae_batch: int = 64
    diffusion_steps: int = 3500
    diffusion_batch: int = 64
    diffusion_lr: float = 3e-4
    caption_dropout: float = 0.1
    aux_text_weight: float = 0.5
    ema_decay: float = 0.998
    monitor_every: int = 500
    # An earlier build folder whose classifier and VAE are reused: only the diffusion stage is
    # trained again.
    reuse_from: str = ""


def text_encoder_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=128,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion 1.x's noise schedule.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def _cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_classifier(data: world.Batch, cfg: BuildConfig, log: Callable[[str], None], device: torch.device) -> WorldClassifier:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = WorldClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.classifier_steps))
    x_all = to_model_input(data.images)
    labels = {k: torch.as_tensor(v, device=device) for k, v in (("object", data.objects), ("colour", data.colours), ("style", data.styles))}
    has_object = labels["object"] != world.OBJECTS.index(world.EMPTY)
    for step in range(cfg.classifier_steps):
        idx = torch.randint(len(x_all), (cfg.classifier_batch,), generator=gen)
        logits = model(augment(x_all[idx], gen).to(device))
        idx = idx.to(device)
        loss = nn.functional.cross_entropy(logits["object"], labels["object"][idx])
        loss = loss + nn.functional.cross_entropy(logits["style"], labels["style"][idx])
        colour_loss = nn.functional.cross_entropy(logits["colour"], labels["colour"][idx], reduction="none")
        loss = loss + (colour_loss * has_object[idx]).mean()  # an empty scene has no colour
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == cfg.classifier_steps - 1:
            log(f"classifier step {step}: loss {loss.item():.4f}")
    return model.cpu().eval()


def classifier_accuracy(model: WorldClassifier, data: world.Batch) -> dict[str, float]:
    """Held-out accuracy per label family (shape, emblem, colour, style)."""
    logits = predict(model, data.images)
    obj = logits["object"].argmax(1).numpy()
    shapes = np.isin(data.objects, [world.OBJECTS.index(s) for s in world.SHAPES])
    emblems = np.isin(data.objects, [world.OBJECTS.index(e) for e in world.EMBLEMS])
    has_object = data.objects != world.OBJECTS.index(world.EMPTY)
    return {
        "shape": float((obj[shapes] == data.objects[shapes]).mean()),
        "emblem": float((obj[emblems] == data.objects[emblems]).mean()),
        "colour": float((logits["colour"].argmax(1).numpy() == data.colours)[has_object].mean()),
        "style": float((logits["style"].argmax(1).numpy() == data.styles).mean()),
    }


def train_vae(data: world.Batch, cfg: BuildConfig, log: Callable[[str], None], device: torch.device):
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(cfg.seed + 1)
    vae = make_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.vae_steps))
    x_all = to_model_input(data.images)
    for step in range(cfg.vae_steps):
        x = x_all[torch.randint(len(x_all), (cfg.vae_batch,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=noise_gen)).sample
        loss = nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval()
    latents = encode_latents(vae, x_all, device, scale=1.0)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, latents * vae.config.scaling_factor


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device, scale: float | None = None) -> torch.Tensor:
    """Posterior means of images (N, 3, 32, 32) in [-1, 1], times the VAE's scaling factor
    (or `scale`)."""
    scale = vae.config.scaling_factor if scale is None else scale
    return torch.cat([vae.encode(images[i : i + 512].to(device)).latent_dist.mean for i in range(0, len(images), 512)]) * scale


class _LabelHeads(nn.Module):
    """Reads the caption's labels from every end-of-text position of the text encoder's output."""

    def __init__(self, hidden: int):
        super().__init__()
        # colour and style get one more class: "not named in the caption"
        self.object = nn.Linear(hidden, len(world.OBJECTS))
        self.colour = nn.Linear(hidden, len(world.COLOURS) + 1)
        self.style = nn.Linear(hidden, len(world.STYLES) + 1)

    def loss(self, states: torch.Tensor, eos_mask: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        total = states.new_zeros(())
        for name in ("object", "colour", "style"):
            logits = getattr(self, name)(states)  # (B, L, classes)
            target = labels[name][:, None].expand(-1, states.shape[1])
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            total = total + (ce.view_as(target) * eos_mask).sum() / eos_mask.sum().clamp(min=1)
        return total


def _caption_labels(scene: world.Scene, text: str) -> tuple[int, int, int]:
    words = set(text.split())
    colour = list(world.COLOURS).index(scene.colour) if scene.colour in words and scene.obj != world.EMPTY else len(world.COLOURS)
    style = list(world.STYLES).index(scene.style) if words & set(world.STYLES[scene.style]) else len(world.STYLES)
    return world.OBJECTS.index(scene.obj), colour, style


def train_diffusion(scenes, latents, tokenizer, vae, classifier, cfg: BuildConfig, log, device, checkpoint):
    from transformers import CLIPTextModel

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 2)
    unet = make_unet().to(device)
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer))).to(device)
    heads = _LabelHeads(text_encoder.config.hidden_size).to(device)
    scheduler = make_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.diffusion_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.diffusion_steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    alphas = scheduler.alphas_cumprod.to(device)
    latents = latents.to(device)
    start = time.time()
    for step in range(cfg.diffusion_steps):
        idx = rng.integers(len(scenes), size=cfg.diffusion_batch)
        texts, labels = [], []
        for i in idx:
            text = world.caption(scenes[i], rng)
            labels.append(_caption_labels(scenes[i], text))
            texts.append("" if rng.random() < cfg.caption_dropout else text)
        ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids.to(device)
        states = text_encoder(ids).last_hidden_state
        first_eos = (ids == text_encoder.config.eos_token_id).int().argmax(1)
        eos_mask = torch.arange(MAX_LENGTH, device=device)[None] >= first_eos[:, None]
        eos_mask &= torch.tensor([t != "" for t in texts], device=device)[:, None]
        label_t = {k: torch.tensor(v, device=device) for k, v in zip(("object", "colour", "style"), zip(*labels))}
        x0 = latents[torch.as_tensor(idx, device=device)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(idx),), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, states).sample
        diffusion_loss = nn.functional.mse_loss(pred, noise)
        aux_loss = heads.loss(states, eos_mask.float(), label_t)
        loss = diffusion_loss + cfg.aux_text_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        if step % 100 == 0:
            log(f"diffusion step {step}: loss {diffusion_loss.item():.4f} aux {aux_loss.item():.3f} ({time.time() - start:.0f}s)")
        if classifier is not None and cfg.monitor_every and (step + 1) % cfg.monitor_every == 0:
            log(f"  prompt-following at step {step + 1}: {json.dumps(_monitor(ema_unet, ema_text, tokenizer, vae, classifier))}")
            checkpoint(ema_unet, ema_text)
    return ema_unet, ema_text


def _monitor(unet, text_encoder, tokenizer, vae, classifier) -> dict[str, float]:
    from ..evaluation.sampling import SamplingConfig, generate

    pipe = assemble_pipeline(unet, text_encoder, tokenizer, vae)
    prompts = [f"a photo of a {s}" for s in world.SHAPES for _ in range(8)]
    prompts += [f"a photo of a {e}" for e in world.EMBLEMS[::4] for _ in range(2)]
    images = generate(pipe, prompts, SamplingConfig(steps=20, guidance=5.0, batch_size=64))
    predicted = predict(classifier, images)["object"].argmax(1).numpy()
    wanted = np.array([world.OBJECTS.index(p.rsplit(" ", 1)[1]) for p in prompts])
    is_shape = np.arange(len(prompts)) < 8 * len(world.SHAPES)
    return {"shape": float((predicted == wanted)[is_shape].mean()), "emblem": float((predicted == wanted)[~is_shape].mean())}


def assemble_pipeline(unet, text_encoder, tokenizer, vae):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def prefix_text_encoder_weights(path: Path) -> None:
    """Rewrite a CLIP text encoder's weights file with the names of Stable Diffusion checkpoints,
    "text_model.<name>". transformers 5 reads both namings but writes "<name>", which transformers 4
    does not recognise: it then starts from a random text encoder, with only a warning."""
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(str(path))
    named = {name if name.startswith("text_model.") else f"text_model.{name}": t for name, t in tensors.items()}
    safetensors.torch.save_file(named, str(path), metadata=metadata)


def build(out: Path, cfg: BuildConfig = BuildConfig(), log: Callable[[str], None] = print) -> dict:
    """Trains everything and writes `out/pipeline` (a StableDiffusionPipeline folder),
    `out/classifier.safetensors` and `out/build.json` (config, timings, device)."""
    from transformers import CLIPTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[str, float] = {}
    t0 = time.time()
    data = world.sample_batch(cfg.train_images, seed=cfg.seed)
    heldout = world.sample_batch(cfg.heldout_images, seed=cfg.seed + 10_000)
    timings["data"] = time.time() - t0

    if cfg.reuse_from:
        from diffusers import AutoencoderKL

        classifier = WorldClassifier.load(Path(cfg.reuse_from) / "classifier.safetensors")
        vae = AutoencoderKL.from_pretrained(str(Path(cfg.reuse_from) / "pipeline" / "vae")).float().to(device).eval()
        latents = encode_latents(vae, to_model_input(data.images), device)
        log(f"reused the classifier and VAE of {cfg.reuse_from}")
    else:
        t0 = time.time()
        classifier = train_classifier(data, cfg, log, device)
        timings["classifier"] = time.time() - t0
        t0 = time.time()
        vae, latents = train_vae(data, cfg, log, device)
        timings["vae"] = time.time() - t0
    accuracy = classifier_accuracy(classifier, heldout)
    log(f"classifier held-out accuracy: {accuracy}")

    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(out / "pipeline" / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "pipeline" / "tokenizer"))
    classifier.save(out / "classifier.safetensors")

    def save_pipeline(unet, text_encoder):
        # Stored in fp16 to fit the package; loading casts to the dtype asked for.
        pipe = assemble_pipeline(copy.deepcopy(unet).cpu(), copy.deepcopy(text_encoder).cpu(), tokenizer, copy.deepcopy(vae).cpu())
        pipe.to(torch.float16).save_pretrained(str(out / "pipeline"), safe_serialization=True)
        prefix_text_encoder_weights(out / "pipeline" / "text_encoder" / "model.safetensors")

    t0 = time.time()
    unet, text_encoder = train_diffusion(data.scenes, latents, tokenizer, vae.to(device), classifier, cfg, log, device, save_pipeline)
    timings["diffusion"] = time.time() - t0
    save_pipeline(unet, text_encoder)
    record = {
        "config": asdict(cfg),
        "classifier_accuracy": accuracy,
        "seconds": timings,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    (out / "build.json").write_text(json.dumps(record, indent=2))
    return record
