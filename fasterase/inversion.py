"""Textual inversion: new words for a concept, learnt so that a frozen model draws the concept's
images from prompts that name it with them (Gal et al., 2023). Forget-Me-Not learns them before it
re-steers attention away from them; the inversion attack learns them against an edited model, to
show what its weights still draw."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from .concept_images import ConceptImages, uniform_timesteps
from .errors import UserError
from .methods import Progress
from .methods.training import Optimization, autocast, run_steps
from .models.family import Conditioning, denoise, encode_ids, family_of, noise_scheduler, prompt_ids, training_target


class InvertedTokens(nn.Module):
    """Textual inversion's new words: placeholder tokens added to copies of the pipeline's
    tokenizers, with one vector per placeholder and text encoder, learnt while the encoders stay as
    they are (their embedding tables are not resized; hooks put the vectors in place of the
    placeholders' embeddings).

    The vectors start from the concept's own sub-token vectors: in turn for all of them (init
    "concept"), or one per sub-token and random normal ones (std 1) for the rest (init
    "concept_then_random", the reference's initializer tokens "elon|musk|<rand-1>|<rand-1>")."""

    def __init__(self, pipe, concepts: list[str], count: int, init: str = "concept", generator: torch.Generator | None = None):
        super().__init__()
        family = family_of(pipe)
        self.encoders = family.text_encoders
        self.words = {c: " ".join(f"<{c.replace(' ', '_')}-{i}>" for i in range(count)) for c in concepts}
        self.tokenizers, self.first_ids, self.mean_norms, vectors = [], [], [], []
        for tokenizer_name, encoder_name in zip(family.tokenizers, family.text_encoders):
            tokenizer = copy.deepcopy(getattr(pipe, tokenizer_name))
            embedding = getattr(pipe, encoder_name).get_input_embeddings()
            added = tokenizer.add_tokens(" ".join(self.words.values()).split())
            if added != count * len(concepts) or len(tokenizer) != embedding.num_embeddings + added:
                raise UserError("the tokenizer's vocabulary does not match the text encoder's embeddings; textual inversion needs them equal")
            table = embedding.weight.detach().float()
            starts = []
            for concept in concepts:
                ids = tokenizer(concept, add_special_tokens=False).input_ids
                if init == "concept":
                    starts += [table[ids[i % len(ids)]] for i in range(count)]
                else:
                    starts += [table[i] for i in ids[:count]]
                    starts += [torch.randn(table.shape[1], generator=generator).to(table.device) for _ in range(count - len(ids))]
            self.tokenizers.append(tokenizer)
            self.first_ids.append(embedding.num_embeddings)
            self.mean_norms.append(table.norm(dim=-1).mean().item())
            vectors.append(nn.Parameter(torch.stack(starts)))
        self.vectors = nn.ParameterList(vectors)

    @torch.no_grad()
    def pull_norms(self, fraction: float) -> None:
        """Moves every vector's norm `fraction` of the way to the mean norm of its text encoder's
        token vectors, keeping its direction: the reference's clip_ti_decay, with the mean of the
        model at hand (0.23 in the built-in world's) for its constant 0.4. Vectors that start random,
        far longer than any token's, shrink to an ordinary length within some tens of steps."""
        for vectors, target in zip(self.vectors, self.mean_norms):
            norms = vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            vectors.mul_((norms + fraction * (target - norms)) / norms)

    @contextlib.contextmanager
    def installed(self, pipe) -> Iterator[None]:
        """A block in which `pipe` reads prompts with the new words: its tokenizers are the copies
        that know them, and its text encoders' input embeddings put the learnt vectors in place
        of the placeholders (whose ids, past the embedding tables, are looked up as id 0 first).
        Pipeline calls and `family.encode` alike; gradients reach the vectors."""
        family = family_of(pipe)
        tokenizers = {name: getattr(pipe, name) for name in family.tokenizers}
        hooks = []
        for tokenizer_name, tokenizer, encoder_name, first_id, vectors in zip(family.tokenizers, self.tokenizers, self.encoders, self.first_ids, self.vectors):
            setattr(pipe, tokenizer_name, tokenizer)
            embedding = getattr(pipe, encoder_name).get_input_embeddings()
            looked_up = []

            def look_up(module, args, looked_up=looked_up, first_id=first_id):
                (ids,) = args
                looked_up.append(ids)
                return (ids.masked_fill(ids >= first_id, 0),)

            def substitute(module, args, out, looked_up=looked_up, first_id=first_id, vectors=vectors):
                ids = looked_up.pop()
                learnt = vectors[(ids - first_id).clamp(min=0)]
                return torch.where((ids >= first_id)[..., None], learnt.to(out.dtype), out)

            hooks += [embedding.register_forward_pre_hook(look_up), embedding.register_forward_hook(substitute)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for name, tokenizer in tokenizers.items():
                setattr(pipe, name, tokenizer)

    def encode(self, pipe, prompts: list[str]) -> Conditioning:
        """The conditioning of prompts that may contain the new words, with gradients to the vectors."""
        with self.installed(pipe):
            return encode_ids(pipe, prompt_ids(pipe, prompts))


def learn_words(
    pipe,
    images: ConceptImages,
    inverted: InvertedTokens,
    prompts: list[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    norm_pull: float = 0.0,
    seed: int = 0,
    dtype: str = "float32",
    log_every: int = 10,
    progress: Progress | None = None,
) -> None:
    """Textual inversion: learns `inverted`'s vectors so that the frozen pipeline denoises each
    concept's images from `prompts` (concept-major, the same number per concept, naming the concept
    with its new word), the denoising loss at uniform timesteps, `batch_size` items of every concept
    a step; with `norm_pull`, each vector's norm is pulled towards an ordinary token's after every
    step (`InvertedTokens.pull_norms`). The vectors end frozen."""
    concepts = len(inverted.words)
    scheduler = noise_scheduler(pipe)
    timesteps = uniform_timesteps(scheduler.config.num_train_timesteps)
    plan = images.draw_items(concepts, len(prompts) // concepts, steps, batch_size, timesteps, torch.Generator().manual_seed(seed))
    optimization = Optimization(inverted.vectors.parameters(), pipe.device, dtype, lr=lr)
    mixed_precision = autocast(pipe.device, dtype)

    def step(i: int) -> dict[str, torch.Tensor]:
        image, prompt, t, noise = plan.image[i], plan.prompt[i], plan.timestep[i], plan.noise[i]
        latents = images.latents[image]
        x = scheduler.add_noise(latents, noise, t)
        context = inverted.encode(pipe, prompts)[prompt]
        with mixed_precision:
            pred = denoise(pipe.unet, x, t, context).float()
        loss = nn.functional.mse_loss(pred, training_target(scheduler, latents, noise, t).float())
        optimization.step(loss)
        if norm_pull:
            inverted.pull_norms(norm_pull)
        return {"inversion": loss.detach()}

    run_steps(step, steps, log_every, progress)
    inverted.vectors.requires_grad_(False)
