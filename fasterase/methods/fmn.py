"""Forget-Me-Not: attention re-steering (Zhang et al., 2023).

The model is fine-tuned so that image positions stop attending to the concept's tokens: on noisy
latents of the concept's images under the concept's prompts, every cross-attention layer captures
the squared attention probabilities on those tokens, and their sum is the loss. Only those
statistics are captured (`fasterase.attention.AttentionCapture`): no attention map is stored, and
self-attention is untouched.

Token selection: the concept's sub-tokens, and with `include_end` every position from the first
end-of-text token on. On SD1.x and the built-in world the padding is the end-of-text token, so
that is the reference's "pooler" option extended to the whole padding, where a CLIP text encoder
spreads the caption (the concept) too.

Optional first step, textual inversion: `inversion_tokens` new token vectors per concept are
learnt so that the frozen model denoises the concept's images from prompts that name the concept
with them; the re-steering loss then targets those tokens instead of the concept's own. The
reference's inversion (cloneofsimo's pivotal tuning) starts its extra tokens from random vectors
and, after every step, pulls each learnt vector's norm towards that of ordinary token vectors
(`inversion_init`, `inversion_norm_pull`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..attention import AttentionCapture, capture_processors
from ..concept_images import ConceptImages, concept_images, uniform_timesteps
from ..errors import UserError
from ..models.family import Conditioning, denoise, encode, encode_ids, family_of, noise_scheduler, prompt_ids, training_target
from ..models.text import token_columns
from . import ErasureResult, Method, Progress, register
from .configs import FMNConfig
from .parameters import select_parameters
from .training import Optimization, autocast, changed_tensors, run_steps, trainable


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

    def encode(self, pipe, prompts: list[str]) -> Conditioning:
        """The conditioning of prompts that may contain the new words."""
        hooks, ids = [], []
        for encoder_name, encoder_ids, first_id, vectors in zip(self.encoders, prompt_ids(pipe, prompts, self.tokenizers), self.first_ids, self.vectors):
            placeholder = encoder_ids >= first_id
            learnt = vectors[(encoder_ids - first_id).clamp(min=0)]

            def substitute(module, args, out, placeholder=placeholder, learnt=learnt):
                return torch.where(placeholder[..., None], learnt.to(out.dtype), out)

            hooks.append(getattr(pipe, encoder_name).get_input_embeddings().register_forward_hook(substitute))
            ids.append(torch.where(placeholder, 0, encoder_ids))
        try:
            return encode_ids(pipe, ids)
        finally:
            for hook in hooks:
                hook.remove()


@register
class ForgetMeNot(Method):
    name = "fmn"

    def erase(self, pipe, cfg: FMNConfig, progress: Progress | None = None) -> ErasureResult:
        unet, device = pipe.unet, pipe.device
        images = concept_images(
            pipe, cfg.concepts, cfg.images, cfg.masks, count=cfg.image_count, templates=cfg.templates,
            sampling=cfg.sampling(),
        )
        # Every (concept, template) prompt, concept-major; the names the loss targets in them.
        names = list(cfg.concepts)
        if cfg.inversion_steps:
            inverted = InvertedTokens(pipe, cfg.concepts, cfg.inversion_tokens, cfg.inversion_init, torch.Generator().manual_seed(cfg.seed)).to(device)
            self._invert(pipe, cfg, images, inverted, progress)
            names = [inverted.words[c] for c in cfg.concepts]
        prompts = [t.format(name) for name in names for t in cfg.templates]
        with torch.no_grad():
            context = inverted.encode(pipe, prompts) if cfg.inversion_steps else encode(pipe, prompts)
        # Token positions are the same for every text encoder (they share one vocabulary): the first tokenizer's.
        tokenizer = inverted.tokenizers[0] if cfg.inversion_steps else pipe.tokenizer
        columns = token_columns(tokenizer, prompts, [n for n in names for _ in cfg.templates], cfg.include_end).to(device)

        scheduler = noise_scheduler(pipe)
        timesteps = uniform_timesteps(scheduler.config.num_train_timesteps)
        plan = images.draw_items(len(cfg.concepts), len(cfg.templates), cfg.steps, cfg.batch_size, timesteps, torch.Generator().manual_seed(cfg.seed))
        capture = AttentionCapture(columns[:0])
        params = select_parameters(unet, cfg.trainable)
        optimization = Optimization(params.values(), device, cfg.dtype, torch.optim.AdamW, lr=cfg.lr)
        mixed_precision = autocast(device, cfg.dtype)

        def step(i: int) -> dict[str, torch.Tensor]:
            image, prompt, t, noise = plan.image[i], plan.prompt[i], plan.timestep[i], plan.noise[i]
            x = scheduler.add_noise(images.latents[image], noise, t)
            capture.columns = columns[prompt]
            capture.masks = None if images.masks is None else images.masks[image]
            capture.stats.clear()
            with mixed_precision:
                denoise(unet, x, t, context[prompt])
            loss = capture.watched_sq().mean()
            optimization.step(loss)
            return {"attention": loss.detach()}

        with trainable(params), capture_processors(unet, capture, cfg.op_backend("cross_attention")):
            run_steps(step, cfg.steps, cfg.log_every, progress)
        # The loss is made of attention probabilities: the last cross-attention layer's value
        # projection reaches none of them, and is left as it was (and not written).
        return ErasureResult(tensors=changed_tensors("unet", optimization.reached_by_loss(params)))

    @staticmethod
    def _invert(pipe, cfg: FMNConfig, images: ConceptImages, inverted: InvertedTokens, progress: Progress | None) -> None:
        """Learns the new tokens' vectors: the frozen model should denoise the concept's images
        from the prompts that name the concept with them."""
        prompts = [t.format(inverted.words[c]) for c in cfg.concepts for t in cfg.templates]
        scheduler = noise_scheduler(pipe)
        timesteps = uniform_timesteps(scheduler.config.num_train_timesteps)
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        plan = images.draw_items(len(cfg.concepts), len(cfg.templates), cfg.inversion_steps, cfg.batch_size, timesteps, generator)
        optimization = Optimization(inverted.vectors.parameters(), pipe.device, cfg.dtype, lr=cfg.inversion_lr)
        mixed_precision = autocast(pipe.device, cfg.dtype)

        def step(i: int) -> dict[str, torch.Tensor]:
            image, prompt, t, noise = plan.image[i], plan.prompt[i], plan.timestep[i], plan.noise[i]
            latents = images.latents[image]
            x = scheduler.add_noise(latents, noise, t)
            context = inverted.encode(pipe, prompts)[prompt]
            with mixed_precision:
                pred = denoise(pipe.unet, x, t, context).float()
            loss = nn.functional.mse_loss(pred, training_target(scheduler, latents, noise, t).float())
            optimization.step(loss)
            if cfg.inversion_norm_pull:
                inverted.pull_norms(cfg.inversion_norm_pull)
            return {"inversion": loss.detach()}

        report = None if progress is None else (lambda step, total, losses: progress(0, cfg.steps, losses))
        run_steps(step, cfg.inversion_steps, cfg.log_every, report)
        inverted.vectors.requires_grad_(False)

