"""UCE: unified concept editing, a closed-form edit of every cross-attention key/value projection
(Gandikota et al., 2024).

Each projection W of a cross-attention to_k/to_v is replaced by the ridge solution (see
`fasterase.closed_form`) that sends the erased concept's text embeddings c_i where W sends its
guide's, W t_i, keeps W on preserved prompts, and stays near W (lambda). The targets are W t_i for
every projection, so one d x d matrix M serves all of them: W* = W M.

Tokens: for every template, the concept's prompt and the guide's prompt (the same template with
the guide in place; the empty guide leaves the template's other words) are encoded, and their
positions paired by `pairing` (`fasterase.models.token_pairs.UCE_PAIRINGS`):
- position (the default): from the concept's last sub-token to the end (end-of-text and padding,
  where a CLIP text encoder spreads the caption), each with the guide prompt's token at the same
  position, so the projected sequence of the concept's prompt becomes that of the guide's;
- tails (the 2023 reference, train_erase.py; preset sd14): the tail from the prompt's last word
  with the guide prompt's tail from its last word (for the empty guide, its start token);
- last (the 2025 reference, uce_sd_erase.py): each prompt's last word alone, and of the preserved
  prompts only their last words.
On the built-in world pairing by position kept the other shapes better than tails (PSR-1 1.00
against 0.94, n=16), and the last token alone erased nothing there.

Preserved: the preserved concepts' prompts, the empty prompt (the unconditional branch of
classifier-free guidance; preserve_empty), and optionally cached Grams of many prompts
(`fasterase cache build`, each with its weight), each weighted preserve_scale (or, with
preserve_scale_by_count, the 2023 reference's max(0.1, 1 / number of preserved prompts)).

There is no training: `steps` is ignored, `dtype` does not matter, and `backend` picks the
implementation of the float64 solve (`fasterase.kernels.ridge_solve`; triton, which has none, runs
the torch reference); they agree to round-off.
"""

from __future__ import annotations

import torch

from ..closed_form import RidgeGrams, edit_weights, gram, mapping_fit, mapping_matrix, preserved_prompts, weighted_grams
from ..models.family import context_width
from ..models.text import encode_prompts
from ..models.token_pairs import UCE_PAIRINGS
from . import ErasureResult, Method, Progress, register
from .configs import UCEConfig
from .parameters import select_parameters


@register
class UCE(Method):
    name = "uce"

    @torch.no_grad()
    def erase(self, pipe, cfg: UCEConfig, progress: Progress | None = None) -> ErasureResult:
        if progress is not None:
            progress(0, 1, {})
        device, tokenizer, pairing = pipe.device, pipe.tokenizer, UCE_PAIRINGS[cfg.pairing]
        cached = weighted_grams(cfg.preservation_grams(), pipe)
        grams = RidgeGrams.zeros(context_width(pipe), device)
        # (concept, concept's prompt, guide's prompt) for every erased concept and template
        edits = [(c, t.format(c), t.format(g)) for c, g in zip(cfg.concepts, cfg.guides()) for t in cfg.templates]
        for start in range(0, len(edits), cfg.batch_size):
            concepts, prompts, guide_prompts = (list(part) for part in zip(*edits[start : start + cfg.batch_size]))
            pairs = pairing.edited(tokenizer, prompts, concepts, guide_prompts)
            sources, targets = pairs.states(encode_prompts(pipe, prompts), encode_prompts(pipe, guide_prompts))
            grams.add_edit(sources, targets, sources.new_full(sources.shape[:1], cfg.erase_scale))
        preserved = preserved_prompts(cfg)
        scale = max(0.1, 1 / len(preserved)) if cfg.preserve_scale_by_count and preserved else cfg.preserve_scale
        for start in range(0, len(preserved), cfg.batch_size):
            batch = preserved[start : start + cfg.batch_size]
            grams.preserved += scale * gram(encode_prompts(pipe, batch), pairing.preserved(tokenizer, batch).to(device))
        if cached is not None:
            grams.preserved += scale * cached

        mapping = mapping_matrix(grams, cfg.lam, cfg.op_backend("ridge_solve"))
        # weights only: a bias is added after the projection, so the edit leaves it as it is
        weights = {n: p for n, p in select_parameters(pipe.unet, "cross_attention_kv").items() if n.endswith(".weight")}
        edited = edit_weights({name: p.detach() for name, p in weights.items()}, mapping)
        for name, value in edited.items():
            weights[name].copy_(value)
        if progress is not None:
            progress(1, 1, mapping_fit(grams, mapping))
        return ErasureResult(tensors={f"unet.{name}": value.cpu() for name, value in edited.items()})
