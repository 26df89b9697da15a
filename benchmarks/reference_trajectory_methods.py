"""Reference loops of the methods that train on x_t (ESD, KPOP, CA), as their authors' code runs
them, on our model: every UNet call at batch 1 (2 where guidance concatenates the empty prompt),
one concept at a time, a fresh x_t for every item, and the frozen model's targets recomputed for
every item by a frozen copy. The benchmarks run each against ours (`fasterase.methods`) in the
same run.

Each function takes the very config our method gets and returns the changed tensors named as ours
name them (`ErasureResult.tensors`). It trains a copy of the UNet (made with copy.deepcopy, which
copies the hooks registered on pipe.unet with it); `pipe.unet` is the frozen model, so `pipe` is
left as it was.

The amount of learning is ours: cfg.steps Adam updates at cfg.lr, each on the mean loss of
batch_size items of every concept. A reference gathers each update's gradient from that many
batch-1 items, one concept after another (each item's loss divided by the number of items and
its gradient added up, as the official concept-ablation code does with gradient accumulation).
Measured on the built-in world (ESD, circle, defaults, 16 images per concept), other ways to
count gave other edits: one batch-1 update per step at our learning rate, ESR-1 1.00 but PSR-1
0.74 (ours 1.00, 0.98); batch_size batch-1 updates per step at lr / batch_size (the linear
scaling rule) suited ESD (1.00, 1.00) but left a third of the circles to CA (ESR-1 0.69; ours 1.00).

What every reference takes from our plumbing, so that both runs compute alike: the model family's
text encoding and UNet call, the trainable parameter sets, and the precision (`trainable`,
`autocast`: float32 masters and mixed precision where cfg.dtype asks for it). The preserve terms
of our methods have no counterpart in the official code; a config with preserved concepts is
refused.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fasterase.attention import LearnedPrompt, cross_attention_processors
from fasterase.concept_images import encode_images
from fasterase.config import SamplingConfig
from fasterase.evaluation.sampling import generate_chunks
from fasterase.methods.ca import ablation_prompts
from fasterase.methods.configs import ESD_TRAINABLE_SETS, CAConfig, ESDConfig, KPOPConfig
from fasterase.methods.parameters import select_parameters
from fasterase.methods.training import autocast, changed_tensors, guided_away, trainable
from fasterase.models.family import Conditioning, denoise, encode, noise_scheduler, unconditional
from fasterase.names import INJECTION_SITES

mse = nn.functional.mse_loss


def reference_esd(pipe, cfg: ESDConfig) -> dict[str, torch.Tensor]:
    """ESD as train-esd.py (rohitgandikota/erasing) runs it: for every item, a stopping step of the
    DDIM schedule drawn at random, x_t sampled from fresh noise up to it by the model being trained
    (guidance by concatenating the empty prompt), the frozen model's eps(x_t, "") and eps(x_t, c),
    and the loss ||eps'(x_t, c) - (eps(x_t, "") - eta (eps(x_t, c) - eps(x_t, "")))||^2; Adam.
    From our config: the prompt (one of the templates at random, where the official code uses the
    concept's name), the trainable set, the amount of learning (see above), guidance, eta
    (negative_guidance), sample_steps, and the timestep: the one x_t was sampled to (train-esd.py
    draws a DDPM step within that DDIM step's interval; esd_sd.py, its successor, feeds the DDIM
    step itself)."""
    refuse_preserve(cfg)
    frozen, unet = pipe.unet, copy.deepcopy(pipe.unet)
    params = select_parameters(unet, ESD_TRAINABLE_SETS[cfg.trainable])
    adam = AccumulatedAdam(params.values(), pipe.device, cfg.dtype, cfg.lr)
    sampler = ddim_sampler(pipe, cfg.sample_steps)
    mixed_precision = autocast(pipe.device, cfg.dtype)
    generator = torch.Generator().manual_seed(cfg.seed)
    with trainable(params):
        for batch in concepts_per_update(cfg):
            for name in batch:
                # encoded for every item, as the official loop does
                concept, empty = encode(pipe, [random_template(cfg.templates, generator).format(name)]), unconditional(pipe)
                with mixed_precision:
                    x, t = partial_trajectory(unet, sampler, concept, empty, cfg.guidance, generator)
                    with torch.no_grad():
                        eps_empty, eps_concept = denoise(frozen, x, t, empty).float(), denoise(frozen, x, t, concept).float()
                    pred = denoise(unet, x, t, concept).float()
                adam.accumulate(mse(pred, guided_away(eps_empty, eps_concept, cfg.negative_guidance)), len(batch))
            adam.step()
    return changed_tensors("unet", params)


def reference_kpop(pipe, cfg: KPOPConfig) -> dict[str, torch.Tensor]:
    """KPOP on ESD's loop (Bui et al., 2024): for every item, a fresh partial trajectory sampled by
    the model being trained (as `reference_esd`, without the prompt) and the frozen model's
    eps(x_t, c_e) and eps(x_t, c_n); then the two updates of `fasterase.methods.kpop` over the
    update's items: transfer (the prompt alone) on ||eps'(x_t, c_e, p) - eps(x_t, c_e)||^2, then
    removal (the model alone) on ||eps'(x_t, c_e) - (eps(x_t, c_n) - eta (eps(x_t, c_e) - eps(x_t, c_n)))||^2
    + lambda ||eps'(x_t, c_e, p) - eps(x_t, c_e)||^2 (+ neutral_weight ||eps'(x_t, c_n) - eps(x_t, c_n)||^2).
    The prompt enters cross-attention through `PromptAttention`, which materialises attention.
    From our config: the objective (eta, lambda, neutral_weight), the prompt's mode, length,
    injection sites and start, the trainable set, both learning rates, the amount of learning (see
    above), the templates, guidance and sample_steps. Only the model's tensors are returned (the
    key is not compared), but the prompt is trained: it is part of the cost."""
    refuse_preserve(cfg)
    frozen, unet = pipe.unet, copy.deepcopy(pipe.unet)
    params = select_parameters(unet, cfg.trainable)
    start = initial_prompt(pipe, cfg)
    prompt = LearnedPrompt(cfg.prompt_mode, *start.shape, init=start).to(pipe.device)
    model_adam = AccumulatedAdam(params.values(), pipe.device, cfg.dtype, cfg.lr)
    prompt_adam = AccumulatedAdam(prompt.parameters(), pipe.device, cfg.dtype, cfg.prompt_lr)
    sampler = ddim_sampler(pipe, cfg.sample_steps)
    mixed_precision = autocast(pipe.device, cfg.dtype)
    generator = torch.Generator().manual_seed(cfg.seed)
    sites = INJECTION_SITES[cfg.inject]
    with trainable(params), cross_attention_processors(unet, lambda name: PromptAttention(prompt) if name.startswith(sites) else None):
        for batch in concepts_per_update(cfg):
            # (x_t, t, c_e, c_n, eps(x_t, c_e), eps(x_t, c_n)) of each item, for both updates
            items = []
            for name in batch:
                template = random_template(cfg.templates, generator)
                concept = encode(pipe, [template.format(name)])
                neutral = encode(pipe, [template.format(cfg.neutral) if cfg.neutral else ""])
                with mixed_precision:
                    x, t = partial_trajectory(unet, sampler, concept, unconditional(pipe), cfg.guidance, generator)
                    with torch.no_grad():
                        items.append((x, t, concept, neutral, denoise(frozen, x, t, concept).float(), denoise(frozen, x, t, neutral).float()))
                    with prompt.active(0):
                        transfer = mse(denoise(unet, x, t, concept).float(), items[-1][4])
                prompt_adam.accumulate(transfer, len(batch))
            prompt_adam.step()
            for x, t, concept, neutral, eps_concept, eps_neutral in items:
                with mixed_precision:
                    removal = mse(denoise(unet, x, t, concept).float(), guided_away(eps_neutral, eps_concept, cfg.negative_guidance))
                    with prompt.active(0):
                        removal = removal + cfg.prompt_weight * mse(denoise(unet, x, t, concept).float(), eps_concept)
                    if cfg.neutral_weight:
                        removal = removal + cfg.neutral_weight * mse(denoise(unet, x, t, neutral).float(), eps_neutral)
                model_adam.accumulate(removal, len(batch))
            model_adam.step()
    return changed_tensors("unet", params)


def reference_ca(pipe, cfg: CAConfig) -> dict[str, torch.Tensor]:
    """Concept Ablation, model-based, as train.py (nupurkmr9/concept-ablation, diffusers/) runs
    it: anchor images drawn up front by the frozen model from the anchor's prompts; then every item
    is one image, encoded with the VAE, noised at a timestep drawn from all the training timesteps,
    with the loss ||eps'(x_t, c_concept) - eps(x_t, c_anchor)||^2; Adam.
    From our config: the prompt pairs (`ablation_prompts`: `trajectories` per concept, one image
    each), the drawing (sample_steps, guidance; the official: 25 steps, guidance 6, DDIM eta 1),
    the trainable set, the amount of learning (see above), and the target: the frozen model's
    prediction, recomputed for every item by the frozen copy (the official code takes the model
    being trained, without gradient, and keeps no copy; both start at the same value). Left out:
    the official data augmentation (random crops and their loss masks) and the VAE posterior's
    sampling (the mean here, as ours)."""
    refuse_preserve(cfg)
    frozen, unet = pipe.unet, copy.deepcopy(pipe.unet)
    anchor_prompts, concept_prompts = ablation_prompts(cfg)
    drawing = SamplingConfig(steps=cfg.sample_steps, guidance=cfg.guidance, batch_size=cfg.sample_batch, seed=cfg.seed)
    images = torch.from_numpy(np.concatenate(list(generate_chunks(pipe, anchor_prompts, drawing)))).permute(0, 3, 1, 2)
    scheduler = noise_scheduler(pipe)
    params = select_parameters(unet, cfg.trainable)
    adam = AccumulatedAdam(params.values(), pipe.device, cfg.dtype, cfg.lr)
    mixed_precision = autocast(pipe.device, cfg.dtype)
    generator = torch.Generator().manual_seed(cfg.seed)
    with trainable(params):
        for batch in concepts_per_update(cfg):
            for name in batch:
                # image `item` of the concept was drawn from anchor prompt `item` and trains with concept prompt `item`
                item = cfg.concepts.index(name) * cfg.trajectories + int(torch.randint(cfg.trajectories, (), generator=generator))
                latents = encode_images(pipe, images[item : item + 1])
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                t = torch.randint(scheduler.config.num_train_timesteps, (1,), generator=generator).to(pipe.device)
                x = scheduler.add_noise(latents, noise, t)
                anchor, concept = encode(pipe, [anchor_prompts[item]]), encode(pipe, [concept_prompts[item]])
                with mixed_precision:
                    with torch.no_grad():
                        target = denoise(frozen, x, t, anchor).float()
                    pred = denoise(unet, x, t, concept).float()
                adam.accumulate(mse(pred, target), len(batch))
            adam.step()
    return changed_tensors("unet", params)


class AccumulatedAdam:
    """Adam (the official loops' optimizer) on a gradient gathered from several batch-1 backward
    passes: each item's loss divided by the number of items, so that an update follows the mean
    loss over them, as one batched loss would. Only this optimizer's tensors get gradients (KPOP's
    two updates each move their own). Under float16 on a GPU the loss is scaled, as ours does."""

    def __init__(self, params, device: torch.device, dtype: str, lr: float):
        self.params = list(params)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == "float16")

    def accumulate(self, loss: torch.Tensor, items: int) -> None:
        self.scaler.scale(loss / items).backward(inputs=self.params)

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class PromptAttention:
    """Cross-attention with KPOP's learned prompt, as the official code computes it: while the
    prompt is active, its tokens are appended to the text's (concat) or added to them (additive)
    before the key and value projections, and attention is softmax(Q K^T / sqrt(d)) V with the
    probabilities materialised. Follows diffusers' processor contract (for attn2 layers)."""

    def __init__(self, prompt: LearnedPrompt):
        self.prompt = prompt

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        text = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        if self.prompt.active_from is not None:
            tokens = self.prompt.tokens.to(text.dtype).expand(text.shape[0], -1, -1)
            text = torch.cat([text, tokens], dim=1) if self.prompt.mode == "concat" else text + tokens
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*H, Mq, D)
        k, v = attn.head_to_batch_dim(attn.to_k(text)), attn.head_to_batch_dim(attn.to_v(text))  # (B*H, Mk, D)
        probs = (q @ k.transpose(1, 2) * attn.scale).softmax(dim=-1)  # (B*H, Mq, Mk)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(probs @ v)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def initial_prompt(pipe, cfg: KPOPConfig) -> torch.Tensor:
    """KPOP's prompt as ours starts it: concat, prompt_length copies of the concepts' first prompts'
    embeddings in turn (the model with the prompt starts at the original model); additive, zeros."""
    firsts = encode(pipe, [cfg.templates[0].format(c) for c in cfg.concepts]).states  # (C, 77, d)
    if cfg.prompt_mode == "additive":
        return torch.zeros_like(firsts[0])
    return torch.cat([firsts[i % len(firsts)] for i in range(cfg.prompt_length)])


def concepts_per_update(cfg):
    """For each of the cfg.steps updates, the concept of each of its batch-1 items: batch_size of
    every concept, one concept after another."""
    return ([name for name in cfg.concepts for _ in range(cfg.batch_size)] for _ in range(cfg.steps))


def ddim_sampler(pipe, steps: int):
    """The DDIM schedule of `steps` steps on the pipeline's noise schedule (the trajectories' sampler)."""
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(pipe.scheduler.config)
    sampler.set_timesteps(steps, device=pipe.device)
    return sampler


@torch.no_grad()
def partial_trajectory(unet, sampler, concept: Conditioning, empty: Conditioning, guidance: float, generator: torch.Generator):
    """(x_t, t): fresh noise taken a random number of DDIM steps (0 to all but one) towards `concept`
    by `unet`, with guidance; batch 1, the two halves of guidance in one call of 2."""
    size, channels = unet.config.sample_size, unet.config.in_channels
    stop = int(torch.randint(len(sampler.timesteps), (), generator=generator))
    # in the model's dtype, which the text states have (the trained tensors are float32 masters)
    x = torch.randn((1, channels, size, size), generator=generator).to(concept.states) * sampler.init_noise_sigma
    context = Conditioning.cat([empty, concept])
    for t in sampler.timesteps[:stop]:
        eps_empty, eps_concept = denoise(unet, sampler.scale_model_input(torch.cat([x, x]), t), t, context).chunk(2)
        x = sampler.step(eps_empty + guidance * (eps_concept - eps_empty), t, x).prev_sample
    return x, sampler.timesteps[stop]


def random_template(templates: list[str], generator: torch.Generator) -> str:
    return templates[int(torch.randint(len(templates), (), generator=generator))]


def refuse_preserve(cfg) -> None:
    if cfg.preserve:
        raise ValueError("the official loop has no preservation term: run the reference without preserved concepts")
