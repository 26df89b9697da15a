"""Text-side helpers: checking that a concept can be written, token positions of a concept in a prompt,
and the text states of prompts."""

from __future__ import annotations

import torch

from ..errors import UserError, shown
from .family import encode


def check_concept(tokenizer, concept: str) -> None:
    """Raises UserError when the tokenizer cannot represent `concept` faithfully."""
    if not concept or not concept.strip():
        raise UserError("a concept must not be empty")
    ids = tokenizer(concept, add_special_tokens=False).input_ids
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise UserError(f"the tokenizer cannot represent the concept {shown(concept)} (it has characters outside its vocabulary)")
    if len(ids) > tokenizer.model_max_length - 2:
        raise UserError(f"the concept {shown(concept)} is {len(ids)} tokens long; the text encoder reads at most {tokenizer.model_max_length - 2}")


def padded_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (N, 77) of prompts, padded to the tokenizer's context as SD pipelines pad them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def encode_prompts(pipe, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """The text states (N, 77, d) that cross-attention reads for prompts (d: the UNet's
    cross_attention_dim), what the closed forms solve over; `family.encode` gives the whole
    conditioning of a UNet call."""
    return encode(pipe, prompts, batch_size).states


def token_columns(tokenizer, prompts: list[str], concepts: list[str], include_end: bool = False) -> torch.Tensor:
    """(N, 77) bool: the text-key columns of each prompt that hold its concept's sub-tokens.

    prompts[i] must contain concepts[i]. With include_end, every position from the first
    end-of-text token on is marked too: on SD1.x and the built-in world the padding is the
    end-of-text token, and the text encoder spreads the caption into those positions, so the
    concept lives there as well (the reference Forget-Me-Not's "pooler" option, extended to the
    padding).
    """
    length = tokenizer.model_max_length
    ids = padded_ids(tokenizer, prompts)
    columns = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, (prompt_ids, concept) in enumerate(zip(ids.tolist(), concepts)):
        word = tokenizer(concept, add_special_tokens=False).input_ids
        starts = [i for i in range(length - len(word) + 1) if prompt_ids[i : i + len(word)] == word]
        if not starts:
            raise UserError(f"the prompt {prompts[row]!r} does not contain the concept {concept!r} as the tokenizer splits it")
        for start in starts:
            columns[row, start : start + len(word)] = True
        if include_end:
            columns[row, prompt_ids.index(tokenizer.eos_token_id) :] = True
    return columns


def concept_tail(tokenizer, prompts: list[str], concepts: list[str], from_last: bool = False) -> torch.Tensor:
    """(N, 77) bool: in each prompt, every position from its concept's first sub-token (or, with
    from_last, its last) on: the concept, the words after it, end of text and padding."""
    columns = token_columns(tokenizer, prompts, concepts)
    positions = torch.arange(columns.shape[1])
    if from_last:
        start = torch.where(columns, positions, -1).amax(1)
    else:
        start = torch.where(columns, positions, columns.shape[1]).amin(1)
    return positions >= start[:, None]
