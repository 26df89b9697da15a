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

import torch

from ..attention import AttentionCapture, capture_processors
from ..concept_images import concept_images, uniform_timesteps
from ..inversion import InvertedTokens, learn_words
from ..models.family import denoise, encode, noise_scheduler
from ..models.text import token_columns
from . import ErasureResult, Method, Progress, register
from .configs import FMNConfig
from .parameters import select_parameters
from .training import Optimization, autocast, changed_tensors, run_steps, trainable


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
            report = None if progress is None else (lambda step, total, losses: progress(0, cfg.steps, losses))
            learn_words(
                pipe, images, inverted, [t.format(inverted.words[c]) for c in cfg.concepts for t in cfg.templates],
                steps=cfg.inversion_steps, batch_size=cfg.batch_size, lr=cfg.inversion_lr, norm_pull=cfg.inversion_norm_pull,
                seed=cfg.seed + 1, dtype=cfg.dtype, log_every=cfg.log_every, progress=report,
            )
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
