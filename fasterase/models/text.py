"""Text-side helpers: checking that a concept can be written, and encoding prompts."""

from __future__ import annotations

import torch

from ..errors import UserError


def check_concept(tokenizer, concept: str) -> None:
    """Raises UserError when the tokenizer cannot represent `concept` faithfully."""
    if not concept or not concept.strip():
        raise UserError("a concept must not be empty")
    ids = tokenizer(concept, add_special_tokens=False).input_ids
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise UserError(f"the tokenizer cannot represent the concept {concept!r} (it has characters outside its vocabulary)")
    if len(ids) > tokenizer.model_max_length - 2:
        raise UserError(f"the concept {concept!r} is {len(ids)} tokens long; the text encoder reads at most {tokenizer.model_max_length - 2}")


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Text-encoder states (N, 77, d) for prompts, padded as the pipeline pads them."""
    states = []
    for start in range(0, len(prompts), batch_size):
        ids = pipe.tokenizer(
            prompts[start : start + batch_size], padding="max_length", max_length=pipe.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(pipe.text_encoder.device)
        states.append(pipe.text_encoder(ids)[0])
    return torch.cat(states)
