"""prompt: adversarial prompt search against the edited model, after UnlearnDiffAtk (Zhang et al.,
"To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate Unsafe
Images ... For Now", 2024; reference: OPTML-Group/Diffusion-MU-Attack, `src/attackers/text_grad_.py`
and `src/tasks/classifier_.py`).

Each evaluation prompt gets a prefix of `prefix_tokens` discrete tokens, chosen so that the edited
model, reading "<prefix> <prompt>", denoises an image of the concept well: the diffusion model is
its own classifier, and a prompt under which the concept's image is likely is one that draws it.

The search variable of a prefix position is a probability distribution over the vocabulary (a
point of the simplex, uniform at the start). Every step samples one token per position from its
distribution, embeds the one-hot choice through the text encoders' token tables and takes the
edited model's denoising loss (MSE to the noise, or the scheduler's target) on the prompt's image
of the concept, noised at the step's timestep. The gradient with respect to the one-hot choice
goes straight through to the distribution (clipped to [-1, 1]); Adam with weight decay updates it
and a Euclidean projection puts it back on the simplex. (The reference relaxes the choice of a
token, not its vector: no continuous embedding is projected onto its nearest token, as in PEZ.)
The timesteps are `timesteps` evenly spaced
ones, visited in ascending order, `steps_per_timestep` steps each. At the end each position takes
its most probable token. The reference stops a prompt's search at the first timestep whose prefix
makes the judge recognise the concept; an attack here has no judge, so every prompt runs the
whole schedule.

Batched: every prompt's distributions are optimised together, one forward and backward a step
(prompt i learns from image i mod the number of images, with noise of its own), and the loss is
the sum of the prompts' losses, so that each prefix gets the gradient it would get alone.

Tokens: the candidates are the tokens that, written as text alone, tokenize back to themselves
(whole words; no special tokens, no word pieces that would merge with their neighbours), so the
found prompts are plain text that replays exactly, on any model with the same tokenizer. On SDXL
one discrete token sequence is embedded in both text encoders (they share one vocabulary) and
their gradients meet in the same distribution.

Precision: the distributions, the one-hot choices and the loss are float32 and the loss is not
scaled, so a pipeline loaded in float16 may lose the smallest gradients in its backward pass.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import UserError
from ..methods.training import Optimization, run_steps
from ..models.family import denoise, encode_ids, family_of, noise_scheduler, training_target
from . import Attack, AttackTarget, Found, Progress, register
from .configs import PromptAttackConfig


def replayable_tokens(tokenizer) -> torch.Tensor:
    """(A,) the ids of the tokens whose text, tokenized alone, is that token again; a prefix of
    such tokens, joined by spaces, tokenizes back to itself."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(tokenizer.vocab_size) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    again = tokenizer(texts, add_special_tokens=False).input_ids
    return torch.tensor([i for i, back in zip(ids, again) if back == [i]])


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row of v (..., A) onto the probability simplex (Duchi et al.,
    2008): max(v - theta, 0) with theta such that the row sums to 1. The reference finds theta by
    bisection, one row at a time; sorting finds it exactly, for every row at once, on the device."""
    sorted_v = v.sort(dim=-1, descending=True).values
    excess = sorted_v.cumsum(dim=-1) - 1
    rank = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (sorted_v - excess / rank > 0).sum(dim=-1, keepdim=True)  # at least 1
    theta = excess.gather(-1, support - 1) / support.to(v.dtype)
    return (v - theta).clamp_min(0)


class SampledOneHot(torch.autograd.Function):
    """One token drawn from each distribution (..., A), as a one-hot (..., A); backward passes the
    gradient with respect to the one-hot straight through to the distribution, clipped to [-1, 1]
    (the reference's STERandSelect)."""

    @staticmethod
    def forward(ctx, distributions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flat = distributions.reshape(-1, distributions.shape[-1])
        drawn = torch.multinomial(flat, 1, generator=generator).reshape(distributions.shape[:-1])
        return nn.functional.one_hot(drawn, distributions.shape[-1]).to(distributions.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return nn.functional.hardtanh(grad), None


@contextlib.contextmanager
def prefix_embeddings(encoders: list) -> Iterator[list]:
    """A block in which each text encoder's input embeddings put a prefix's vectors at positions
    1 .. k, right after the start token. It yields one slot per encoder, which the caller fills
    with each step's (N, k, d_e) vectors: the embeddings of the tokens already at those positions,
    so only the gradient path is new."""
    slots: list = [None] * len(encoders)
    hooks = []
    for e, encoder in enumerate(encoders):

        def substitute(module, args, out, e=e):
            vectors = slots[e].to(out.dtype)
            return torch.cat([out[:, :1], vectors, out[:, 1 + vectors.shape[1] :]], dim=1)

        hooks.append(encoder.get_input_embeddings().register_forward_hook(substitute))
    try:
        yield slots
    finally:
        for hook in hooks:
            hook.remove()


def evenly_spaced_timesteps(count: int, num_train_timesteps: int) -> torch.Tensor:
    """(count,) the reference's timesteps: the middles of `count` equal intervals of the training
    timesteps, ascending (50 of 1000: 10, 30, ..., 990)."""
    if not 1 <= count <= num_train_timesteps:
        raise UserError(f"timesteps must be between 1 and the model's {num_train_timesteps} training timesteps, not {count}")
    stride = num_train_timesteps // count
    return torch.arange(count) * stride + stride // 2


@register
class PromptAttack(Attack):
    name = "prompt"

    def find(self, target: AttackTarget, cfg: PromptAttackConfig, progress: Progress | None = None) -> Found:
        pipe, k, n = target.edited, cfg.prefix_tokens, len(target.prompts)
        device, family = pipe.device, family_of(pipe)
        tokenizers = [getattr(pipe, name) for name in family.tokenizers]
        encoders = [getattr(pipe, name) for name in family.text_encoders]
        room = tokenizers[0].model_max_length - 2  # between the start and end tokens
        if k >= room:
            raise UserError(f"prefix_tokens must leave room for the prompt in the model's {room} prompt tokens, not {k}")
        candidates = replayable_tokens(tokenizers[0]).to(device)
        tables = [encoder.get_input_embeddings().weight.detach()[candidates] for encoder in encoders]  # (A, d_e)
        # Each prompt's ids as the pipeline pads them, k shorter; the prefix goes after the start token.
        bodies = [
            t(target.prompts, padding="max_length", max_length=t.model_max_length - k, truncation=True, return_tensors="pt").input_ids.to(device)
            for t in tokenizers
        ]
        images = target.images()
        latents = images.latents[torch.arange(n, device=images.latents.device) % len(images)]
        scheduler = noise_scheduler(pipe)
        timesteps = evenly_spaced_timesteps(cfg.timesteps, scheduler.config.num_train_timesteps).to(device)
        generator = torch.Generator(device).manual_seed(cfg.seed)

        distributions = nn.Parameter(torch.full((n, k, len(candidates)), 1 / len(candidates), device=device))
        optimization = Optimization([distributions], device, "float32", torch.optim.Adam, lr=cfg.lr, weight_decay=cfg.weight_decay)

        def step(i: int) -> dict[str, torch.Tensor]:
            t = timesteps[i // cfg.steps_per_timestep].expand(n)
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            choice = SampledOneHot.apply(distributions, generator)  # (n, k, A)
            chosen_ids = candidates[choice.argmax(dim=-1)]
            prefix_vectors[:] = [choice.to(table.dtype) @ table for table in tables]
            context = encode_ids(pipe, [torch.cat([body[:, :1], chosen_ids, body[:, 1:]], dim=1) for body in bodies])
            pred = denoise(pipe.unet, scheduler.add_noise(latents, noise, t), t, context).float()
            per_prompt = (pred - training_target(scheduler, latents, noise, t).float()).pow(2).mean(dim=(1, 2, 3))
            optimization.step(per_prompt.sum())
            with torch.no_grad():
                distributions.copy_(project_to_simplex(distributions))
            return {"loss": per_prompt.mean().detach()}

        with prefix_embeddings(encoders) as prefix_vectors:
            run_steps(step, cfg.timesteps * cfg.steps_per_timestep, cfg.log_every, progress)
        prefix_ids = candidates[distributions.detach().argmax(dim=-1)].tolist()
        words = [" ".join(tokenizers[0].decode([i]) for i in ids) for ids in prefix_ids]
        record = {"prefix_ids": prefix_ids, "prefixes": words}
        return Found([f"{prefix} {prompt}" for prefix, prompt in zip(words, target.prompts)], record=record)
