"""KPOP: hiding a concept behind a learnable prompt in cross-attention (Bui et al., 2024).

A prompt p is injected into chosen cross-attention layers. Each iteration makes two one-step
updates:
- knowledge transfer (p only): the current model with p reproduces the original model on the
  erased concept, ||eps'(x_t, c_e, p) - eps(x_t, c_e)||^2;
- knowledge removal (model only): without p the concept maps to a neutral one, with p it is kept,
  ||eps'(x_t, c_e) - eps(x_t, c_n)||^2 + lambda ||eps'(x_t, c_e, p) - eps(x_t, c_e)||^2.
With concepts to preserve, the removal step also keeps the original model on them,
+ preserve_weight ||eps'(x_t, c_p) - eps(x_t, c_p)||^2, an addition to the paper's objective that
is off when none are given. The released edit holds the model's changed tensors; p is the key that
recovers the concept and is written to its own file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import INJECTION_SITES, LearnedPrompt, is_cross_attention, prompt_processors
from ..config import MethodConfig, option
from ..errors import UserError
from ..models.text import encode_prompts
from . import ErasureResult, Method, Progress, register
from .trajectories import predict_noise, sample_trajectories

TRAINABLE_SETS = ("cross_attention", "non_cross_attention")


@dataclass
class KPOPConfig(MethodConfig):
    steps: int = option(150, "iterations (one transfer and one removal update each)")
    neutral: str = option("", "the concept the erased one is mapped to; '' is the empty prompt")
    prompt_mode: str = option("concat", "'concat' (prompt tokens appended to the text keys) or 'additive'")
    prompt_length: int = option(10, "concat prompt length in multiples of the text context (k: k x 77 tokens)")
    # The paper injects in SD's mid block (8x8x1280; preset sd14). The built-in world's mid block is
    # 2x2x128: a prompt there recovered only 25-69% of the erased shape, against 88% from all layers.
    inject: str = option("all", "cross-attention layers that see the prompt: mid, mid_up or all")
    trainable: str = option("cross_attention", "cross_attention, or non_cross_attention (for concepts like nudity)")
    prompt_weight: float = option(0.1, "lambda: weight of keeping the concept with the prompt, in the removal step")
    preserve_weight: float = option(1.0, "weight of keeping the preserved concepts (if any) in the removal step")
    lr: float = option(2e-3, "Adam learning rate of the model (the paper's 1e-5 is for SD; preset sd14)")
    prompt_lr: float = option(1e-2, "Adam learning rate of the prompt")
    batch_size: int = option(8, "samples (x_t at any timestep) of each concept per update: a step carries every concept")
    trajectories: int = option(16, "sampled trajectories per concept that training draws x_t from")
    sample_steps: int = option(20, "DDIM steps of those trajectories")
    guidance: float = option(5.0, "classifier-free guidance of those trajectories")
    templates: list[str] = option(
        ["{}", "a photo of a {}", "a picture of a {}", "an image of a {}"],
        "prompts of a concept; {} stands for the concept (and for the neutral one)",
    )
    log_every: int = option(10, "steps between progress reports (each reads the losses off the device)")

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_mode not in ("concat", "additive"):
            raise UserError(f"prompt_mode must be concat or additive, not {self.prompt_mode!r}")
        if self.inject not in INJECTION_SITES:
            raise UserError(f"inject must be one of {', '.join(INJECTION_SITES)}, not {self.inject!r}")
        if self.trainable not in TRAINABLE_SETS:
            raise UserError(f"trainable must be one of {', '.join(TRAINABLE_SETS)}, not {self.trainable!r}")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise UserError("every template must contain {} where the concept goes")
        for name in ("prompt_length", "batch_size", "trajectories", "sample_steps", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1")


def trainable_parameters(unet, which: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if is_cross_attention(n) == (which == "cross_attention")}


def _trajectory_prompts(cfg: KPOPConfig, concepts: list[str]) -> list[str]:
    """One prompt per trajectory: `trajectories` per concept, cycling through the templates."""
    return [cfg.templates[i % len(cfg.templates)].format(concept) for concept in concepts for i in range(cfg.trajectories)]


def _neutral_prompt(template: str, neutral: str) -> str:
    return template.format(neutral) if neutral else ""


@register
class KPOP(Method):
    name = "kpop"
    config_class = KPOPConfig

    def erase(self, pipe, cfg: KPOPConfig, progress: Progress | None = None) -> ErasureResult:
        unet, device = pipe.unet, pipe.device
        # Trajectory i uses concept i // trajectories and template i % len(templates).
        concept_prompts = _trajectory_prompts(cfg, cfg.concepts)
        neutral_prompts = [
            _neutral_prompt(cfg.templates[i % len(cfg.templates)], cfg.neutral)
            for _ in cfg.concepts
            for i in range(cfg.trajectories)
        ]
        preserve_prompts = _trajectory_prompts(cfg, cfg.preserve)
        prompts = concept_prompts + preserve_prompts
        bank = sample_trajectories(pipe, prompts, cfg.sample_steps, cfg.guidance, cfg.seed)
        context = encode_prompts(pipe, prompts)  # (T, 77, d)
        context_n = encode_prompts(pipe, neutral_prompts)
        erased = bank.prompt_index < len(concept_prompts)
        bank_e, bank_p = bank.take(erased), bank.take(~erased)
        # The original model's predictions, once, before anything changes.
        target_e = predict_noise(unet, bank_e.latents, bank_e.timesteps, context[bank_e.prompt_index])
        target_n = predict_noise(unet, bank_e.latents, bank_e.timesteps, context_n[bank_e.prompt_index])
        target_p = predict_noise(unet, bank_p.latents, bank_p.timesteps, context[bank_p.prompt_index])

        prompt = LearnedPrompt(cfg.prompt_mode, *self._prompt_shape(cfg, context), init=self._prompt_init(cfg, context)).to(device)
        params = trainable_parameters(unet, cfg.trainable)
        for p in params.values():
            p.requires_grad_(True)
        model_opt = torch.optim.Adam(params.values(), lr=cfg.lr)
        prompt_opt = torch.optim.Adam(prompt.parameters(), lr=cfg.prompt_lr)
        # Which bank entries each step uses, drawn up front (no sampling inside the step):
        # batch_size entries of every erased concept, so that a step carries all of them.
        generator = torch.Generator().manual_seed(cfg.seed)
        by_concept = torch.stack([
            torch.nonzero(bank_e.prompt_index // cfg.trajectories == k).flatten() for k in range(len(cfg.concepts))
        ])  # (C, entries per concept)
        picks = torch.randint(by_concept.shape[1], (cfg.steps, len(cfg.concepts), cfg.batch_size), generator=generator)
        schedule = torch.gather(by_concept.cpu().expand(cfg.steps, -1, -1), 2, picks).flatten(1).to(device)
        keep_size = cfg.batch_size if cfg.preserve else 0
        keep_schedule = torch.randint(max(1, len(bank_p)), (cfg.steps, keep_size), generator=generator).to(device)
        autocast = (
            torch.autocast(device.type, dtype=getattr(torch, cfg.dtype))
            if cfg.dtype != "float32" and device.type == "cuda" else contextlib.nullcontext()
        )
        mse = nn.functional.mse_loss
        lam = cfg.prompt_weight
        size = schedule.shape[1]

        def step(idx: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, t, c = bank_e.latents[idx], bank_e.timesteps[idx], context[bank_e.prompt_index[idx]]
            with autocast, prompt.active(0):
                transfer = mse(unet(x, t, c).sample.float(), target_e[idx])
            (prompt.tokens.grad,) = torch.autograd.grad(transfer, [prompt.tokens])
            prompt_opt.step()
            # One forward carries every removal term: erased and preserved items without the
            # prompt, then the erased items again with it.
            xs = torch.cat([x, bank_p.latents[keep], x])
            ts = torch.cat([t, bank_p.timesteps[keep], t])
            cs = torch.cat([c, context[bank_p.prompt_index[keep]], c])
            with autocast, prompt.active(size + keep_size):
                pred = unet(xs, ts, cs).sample.float()
            removal = mse(pred[:size], target_n[idx]) + lam * mse(pred[size + keep_size :], target_e[idx])
            if keep_size:
                removal = removal + cfg.preserve_weight * mse(pred[size : size + keep_size], target_p[keep])
            for p, g in zip(params.values(), torch.autograd.grad(removal, list(params.values()))):
                p.grad = g
            model_opt.step()
            return transfer.detach(), removal.detach()

        try:
            with prompt_processors(unet, prompt, cfg.inject, cfg.backend):
                if progress is not None:
                    progress(0, cfg.steps, {})
                for i in range(cfg.steps):
                    transfer, removal = step(schedule[i], keep_schedule[i])
                    if progress is not None and ((i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps):
                        progress(i + 1, cfg.steps, {"transfer": transfer.item(), "removal": removal.item()})
        finally:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None

        return ErasureResult(
            tensors={f"unet.{n}": p.detach().cpu().clone() for n, p in params.items()},
            key={"prompt": prompt.tokens.detach().cpu().clone()},
            key_metadata={"method": self.name, "prompt_mode": cfg.prompt_mode, "inject": cfg.inject},
        )

    @staticmethod
    def _prompt_shape(cfg: KPOPConfig, context: torch.Tensor) -> tuple[int, int]:
        tokens, dim = context.shape[1:]
        return (cfg.prompt_length * tokens if cfg.prompt_mode == "concat" else tokens), dim

    @staticmethod
    def _prompt_init(cfg: KPOPConfig, context: torch.Tensor) -> torch.Tensor:
        """Concat: copies of the concepts' own prompt embeddings. Keys and values repeated in
        attention leave its output unchanged, so for one concept the model with p starts exactly
        at the original model, and the transfer step starts from there. Additive: zeros, the same
        identity."""
        if cfg.prompt_mode == "additive":
            return torch.zeros_like(context[0])
        # the first prompt of each erased concept, (C, 77, d)
        firsts = context[: len(cfg.concepts) * cfg.trajectories : cfg.trajectories]
        return torch.cat([firsts[i % firsts.shape[0]] for i in range(cfg.prompt_length)])

    @staticmethod
    def key_processors(pipe, key: dict[str, torch.Tensor], metadata: dict, backend: str = "auto"):
        """A block in which the pipeline runs with the key's prompt in place (the concept returns)."""
        tokens = key["prompt"]
        prompt = LearnedPrompt(metadata["prompt_mode"], tokens.shape[0], tokens.shape[1], init=tokens)
        prompt = prompt.to(device=pipe.device, dtype=pipe.unet.dtype)
        prompt.active_from = 0
        return prompt_processors(pipe.unet, prompt, metadata["inject"], backend)
