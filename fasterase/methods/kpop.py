"""KPOP: hiding a concept behind a learnable prompt in cross-attention (Bui et al., 2024).

A prompt p is injected into chosen cross-attention layers. Each iteration makes two one-step
updates, both from the same forward:
- knowledge transfer (p only): the current model with p reproduces the original model on the
  erased concept, ||eps'(x_t, c_e, p) - eps(x_t, c_e)||^2;
- knowledge removal (model only): without p the concept maps to a neutral one, with p it is kept,
  ||eps'(x_t, c_e) - eps(x_t, c_n)||^2 + lambda ||eps'(x_t, c_e, p) - eps(x_t, c_e)||^2.
The removal target goes past the neutral prompt, away from the concept:
eps(c_n) - eta (eps(c_e) - eps(c_n)) (ESD's negative guidance; eta = 0 is the paper's target).
Measured on the built-in world (150 steps, prompt_lr 1e-2): with the paper's target, erasing two
shapes at once left half of them drawn (ESR-1 0.50), because the empty prompt (guidance's
unconditional branch) drifts with the edit and guidance, which scales the difference between the
conditional and the unconditional prediction, draws the shapes back; eta 0.5 gives ESR-1 0.98 for
the pair (PSR-1 0.91) and keeps one shape's numbers (ESR-1 1.0, PSR-1 0.99, key 0.91). Training
only the key/value projections (trainable cross_attention_kv) moves the empty prompt less: the
pair then reaches ESR-1 1.0 with PSR-1 1.0 and look-alikes kept, but the key recovers less (0.78).
The defaults since, 100 steps with prompt_lr 3e-2, give the same (pair: ESR-1 0.98, PSR-1 0.93).
Optionally (neutral_weight > 0) the removal step also keeps the neutral prompt where it was,
+ neutral_weight ||eps'(x_t, c_n) - eps(x_t, c_n)||^2.
With concepts to preserve, the removal step also keeps the original model on them,
+ preserve_weight ||eps'(x_t, c_p) - eps(x_t, c_p)||^2, an addition to the paper's objective that
is off when none are given. The released edit holds the model's changed tensors; p is the key that
recovers the concept and is written to its own file.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import LearnedPrompt, prompt_processors
from ..errors import UserError
from ..evaluation.sampling import chunk_size
from ..models.family import context_width, denoise, encode
from ..names import INJECTION_SITES
from . import ErasureResult, Method, Progress, register
from .configs import KPOPConfig
from .parameters import select_parameters
from .trajectories import predict_noise
from .training import (
    Optimization, autocast, changed_tensors, concept_schedule, guided_away, join_inputs, run_steps, sample_banks, trainable,
    trajectory_prompts, uniform_schedule,
)

# torch's Adam default, which the prompt's group scales by lambda (see `erase`)
ADAM_EPS = 1e-8


@register
class KPOP(Method):
    name = "kpop"

    def erase(self, pipe, cfg: KPOPConfig, progress: Progress | None = None) -> ErasureResult:
        unet, device = pipe.unet, pipe.device
        # Trajectory i uses concept i // trajectories and template i % len(templates).
        concept_prompts = trajectory_prompts(cfg.templates, cfg.concepts, cfg.trajectories)
        neutral_prompts = trajectory_prompts(cfg.templates, [cfg.neutral] * len(cfg.concepts), cfg.trajectories)
        # keep: the preserved concepts' trajectories and the original model's predictions on them.
        bank_e, keep = sample_banks(pipe, cfg, concept_prompts)
        context = encode(pipe, concept_prompts)  # one row per trajectory
        context_n = encode(pipe, neutral_prompts)
        # The original model's predictions, before anything changes (under the concept's prompts,
        # from sampling).
        target_e = bank_e.eps_prompt
        target_n = predict_noise(unet, bank_e.latents, bank_e.timesteps, context_n[bank_e.prompt_index], 2 * chunk_size(pipe, cfg.sample_batch))
        target_r = guided_away(target_n, target_e, cfg.negative_guidance)  # the removal target

        # The prompt lives in the text-state space that cross-attention reads (2048 wide on SDXL).
        prompt = LearnedPrompt(cfg.prompt_mode, *self._prompt_shape(cfg, context.states), init=self._prompt_init(cfg, context.states)).to(device)
        params = select_parameters(unet, cfg.trainable)
        # One forward and one backward make both updates: the transfer loss is the removal loss's
        # prompted term, and the prompt enters the removal loss through lambda * transfer alone, so
        # its gradient there is lambda times the transfer's. Adam with eps scaled by lambda takes
        # from it exactly the step that the transfer's own gradient would give.
        groups = [{"params": list(params.values())}, {"params": list(prompt.parameters()), "lr": cfg.prompt_lr, "eps": ADAM_EPS * cfg.prompt_weight}]
        optimization = Optimization(groups, device, cfg.dtype, lr=cfg.lr, eps=ADAM_EPS)
        # Which bank entries each step uses, drawn up front (no sampling inside the step):
        # batch_size entries of every erased concept, so that a step carries all of them.
        generator = torch.Generator().manual_seed(cfg.seed)
        schedule = concept_schedule(bank_e.prompt_index // cfg.trajectories, len(cfg.concepts), cfg.steps, cfg.batch_size, generator)
        keep_size = cfg.batch_size if keep is not None else 0
        keep_schedule = uniform_schedule(len(keep.bank) if keep else 0, cfg.steps, keep_size, generator, device)
        mixed_precision = autocast(device, cfg.dtype)
        mse = nn.functional.mse_loss
        lam = cfg.prompt_weight
        size = schedule.shape[1]
        neutral_size = size if cfg.neutral_weight else 0

        def step(i: int) -> dict[str, torch.Tensor]:
            idx, k = schedule[i], keep_schedule[i]
            x, t, c = bank_e.latents[idx], bank_e.timesteps[idx], context[bank_e.prompt_index[idx]]
            # One forward carries every term: erased, neutral (when kept) and preserved items
            # without the prompt, then the erased items again with it.
            neutral = [(x, t, context_n[bank_e.prompt_index[idx]])] if neutral_size else []
            parts = [(x, t, c)] + neutral + ([keep.inputs(k)] if keep else []) + [(x, t, c)]
            xs, ts, cs = join_inputs(parts)
            with mixed_precision, prompt.active(size + neutral_size + keep_size):
                pred = denoise(unet, xs, ts, cs).float()
            erased_pred, neutral_pred, kept_pred, prompted_pred = pred.split([size, neutral_size, keep_size, size])
            transfer = mse(prompted_pred, target_e[idx])
            removal = mse(erased_pred, target_r[idx]) + lam * transfer
            if cfg.neutral_weight:
                removal = removal + cfg.neutral_weight * mse(neutral_pred, target_n[idx])
            if keep is not None:
                removal = removal + cfg.preserve_weight * mse(kept_pred, keep.target[k])
            optimization.step(removal)
            return {"transfer": transfer.detach(), "removal": removal.detach()}

        with trainable(params), prompt_processors(unet, prompt, cfg.inject, cfg.op_backend("cross_attention")):
            run_steps(step, cfg.steps, cfg.log_every, progress)

        return ErasureResult(
            tensors=changed_tensors("unet", params),
            key={"prompt": prompt.tokens.detach().cpu().clone()},
            key_metadata={"method": self.name, "prompt_mode": cfg.prompt_mode, "inject": cfg.inject},
        )

    @staticmethod
    def _prompt_shape(cfg: KPOPConfig, states: torch.Tensor) -> tuple[int, int]:
        tokens, dim = states.shape[1:]
        return (cfg.prompt_length * tokens if cfg.prompt_mode == "concat" else tokens), dim

    @staticmethod
    def _prompt_init(cfg: KPOPConfig, states: torch.Tensor) -> torch.Tensor:
        """Concat: copies of the concepts' own prompt embeddings. Keys and values repeated in
        attention leave its output unchanged, so for one concept the model with p starts exactly
        at the original model, and the transfer step starts from there. Additive: zeros, the same
        identity."""
        if cfg.prompt_mode == "additive":
            return torch.zeros_like(states[0])
        # the first prompt of each erased concept, (C, 77, d)
        firsts = states[: len(cfg.concepts) * cfg.trajectories : cfg.trajectories]
        return torch.cat([firsts[i % firsts.shape[0]] for i in range(cfg.prompt_length)])

    @staticmethod
    def key_processors(pipe, key: dict[str, torch.Tensor], metadata: dict, backend: str = "auto"):
        """A block in which the pipeline runs with the key's prompt in place (the concept returns).
        UserError if the key's prompt or its metadata do not fit this model."""
        tokens, mode, inject = key.get("prompt"), metadata.get("prompt_mode"), metadata.get("inject")
        # concat: any number of tokens; additive: one per text position
        lengths = {"concat": None, "additive": pipe.tokenizer.model_max_length}
        if not (
            isinstance(mode, str) and mode in lengths and isinstance(inject, str) and inject in INJECTION_SITES
            and tokens is not None and tokens.is_floating_point() and tokens.dim() == 2 and tokens.shape[0] > 0
            and tokens.shape[1] == context_width(pipe) and lengths[mode] in (None, tokens.shape[0])
            and torch.isfinite(tokens).all()
        ):
            raise UserError(
                f"this key is malformed: it needs a finite float 'prompt' (tokens x {context_width(pipe)}),"
                f" a prompt_mode ({' or '.join(lengths)}) and an inject site ({', '.join(INJECTION_SITES)})"
            )
        prompt = LearnedPrompt(mode, tokens.shape[0], tokens.shape[1], init=tokens)
        prompt = prompt.to(device=pipe.device, dtype=pipe.unet.dtype)
        prompt.active_from = 0
        return prompt_processors(pipe.unet, prompt, inject, backend)
