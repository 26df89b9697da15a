"""inversion: concept inversion against the edited model (Pham et al., "Circumventing Concept
Erasure Methods for Text-to-Image Generative Models", ICLR 2024).

Textual inversion (`fasterase.inversion`) learns a new word of `tokens` token vectors so that the
*edited* model, frozen, denoises images of the concept from prompts that name it with the word:
the denoising loss at uniform timesteps, batched over images, templates and timesteps, a few
hundred Adam steps on the vectors alone. The images are the concept's, drawn by the original model
(or given with `images`). The attacked prompts are the evaluation's with the concept's name
replaced by the word. An erasure that leaves the concept in the weights, reachable from some
input embedding, draws it again; one that only changes how the concept's own words are read (a
text-encoder edit) falls at once, since the word never goes through them.

The word's vectors start at the concept's own sub-token vectors, so an edit that already keeps
the concept away from its name starts the search where the erasure left it.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError
from ..inversion import InvertedTokens, learn_words
from . import Attack, AttackTarget, Found, Progress, register
from .configs import MAX_INVERSION_TOKENS, InversionConfig


def attacked_prompt(prompt: str, concept: str, word: str) -> str:
    """`prompt` with the concept's name replaced by `word` (or the word before it, when the
    prompt does not spell the concept out)."""
    return prompt.replace(concept, word) if concept in prompt else f"{word}, {prompt}"


@register
class ConceptInversion(Attack):
    name = "inversion"

    def find(self, target: AttackTarget, cfg: InversionConfig, progress: Progress | None = None) -> Found:
        pipe = target.edited
        inverted = InvertedTokens(pipe, [target.concept], cfg.tokens).to(pipe.device)
        word = inverted.words[target.concept]
        learn_words(
            pipe, target.images(), inverted, [t.format(word) for t in cfg.templates],
            steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, log_every=cfg.log_every, progress=progress,
        )
        tensors = {encoder: vectors.detach().cpu() for encoder, vectors in zip(inverted.encoders, inverted.vectors)}
        record = {"concept": target.concept, "word": word, "tokens": cfg.tokens}
        return Found([attacked_prompt(p, target.concept, word) for p in target.prompts], tensors, record)

    @classmethod
    @contextlib.contextmanager
    def installed(cls, pipe, found: Found):
        """`pipe` with the found word: its vectors in place of the placeholders. A one-line
        UserError for a word that does not fit `pipe`'s text encoders (another model's)."""
        concept, tokens = found.record.get("concept"), found.record.get("tokens")
        if not isinstance(concept, str) or not concept or isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_INVERSION_TOKENS:
            raise UserError("what this inversion found names no concept or no number of tokens")
        inverted = InvertedTokens(pipe, [concept], tokens).to(pipe.device)
        with torch.no_grad():
            for encoder, vectors in zip(inverted.encoders, inverted.vectors):
                saved = found.tensors.get(encoder)
                if saved is None or saved.shape != vectors.shape or not saved.is_floating_point() or not torch.isfinite(saved).all():
                    raise UserError(f"the inverted word does not fit this model's {encoder}: it was found on another model")
                vectors.copy_(saved)
        with inverted.installed(pipe):
            yield
