"""Which token positions of an edited prompt are sent where, in the closed-form edits (UCE, MACE).

A closed form pairs positions of each edited prompt (the concept's) with positions of a target
prompt (the same template with the guide or mapping concept in its place): the projection of the
edited prompt's text state at a source position should become the projection of the target
prompt's state at its paired position. Each way of choosing the pairs is one function here, named
after what it does; the methods pick one by name (`UCE_PAIRINGS`, `MACE_PAIRINGS`, whose names
the configs list) and hand the pairs to the same solver. Every function takes (tokenizer, edited
prompts, their concepts, target prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .text import concept_tail, padded_ids


@dataclass
class TokenPairs:
    """Pair i sends position sources[i] of edited prompt rows[i] to position targets[i] of target
    prompt rows[i]."""

    rows: torch.Tensor  # (P,) long
    sources: torch.Tensor  # (P,) long
    targets: torch.Tensor  # (P,) long

    def states(self, edited: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paired text states, (P, d) each, from the edited and target prompts' states (N, L, d)."""
        return edited[self.rows, self.sources], target[self.rows, self.targets]

    @classmethod
    def same_positions(cls, mask: torch.Tensor) -> "TokenPairs":
        """Every marked position (N, L bool) paired with the same position of the target prompt."""
        rows, positions = mask.nonzero(as_tuple=True)
        return cls(rows, positions, positions)


def _last_words(tokenizer, prompts: list[str]) -> list[int]:
    """Each prompt's last position before its end-of-text token (the start token for an empty
    prompt): the official scripts' attention_mask.sum() - 2."""
    return [ids.index(tokenizer.eos_token_id) - 1 for ids in padded_ids(tokenizer, prompts).tolist()]


def from_last_sub_token(tokenizer, prompts: list[str], concepts: list[str], target_prompts: list[str]) -> TokenPairs:
    """From the concept's last sub-token to the end of the context, each position paired with the
    same position of the target prompt: the concept, the words after it, end of text and padding
    (where a CLIP text encoder spreads the caption). Earlier sub-tokens of a multi-token concept
    are left alone: the text encoder is causal, so they are as in prompts without the concept."""
    return TokenPairs.same_positions(concept_tail(tokenizer, prompts, concepts, from_last=True))


def all_same_positions(tokenizer, prompts: list[str], concepts: list[str], target_prompts: list[str]) -> TokenPairs:
    """Every position paired with the same position of the target prompt. Before the concept the
    two prompts' states are the same (the text encoder is causal): those positions stay where the
    weights send them."""
    return TokenPairs.same_positions(every_position(tokenizer, prompts))


def tails_from_last_words(tokenizer, prompts: list[str], concepts: list[str], target_prompts: list[str]) -> TokenPairs:
    """UCE's 2023 script (train-scripts/train_erase.py): the edited prompt's tail from its last word
    to the end of the context, paired in order with the target prompt's tail from its last word (for
    an empty target, its start token); both tails are cut to the shorter one's length."""
    length = padded_ids(tokenizer, prompts[:1]).shape[1]
    rows, sources, targets = [], [], []
    for row, (source, target) in enumerate(zip(_last_words(tokenizer, prompts), _last_words(tokenizer, target_prompts))):
        count = length - max(source, target)
        rows += [row] * count
        sources += range(source, source + count)
        targets += range(target, target + count)
    return TokenPairs(*(torch.tensor(v, dtype=torch.long) for v in (rows, sources, targets)))


def last_words(tokenizer, prompts: list[str], concepts: list[str], target_prompts: list[str]) -> TokenPairs:
    """UCE's 2025 script (trainscripts/uce_sd_erase.py): each prompt's last word alone, paired with
    the target prompt's last word (for an empty target, its start token)."""
    sources, targets = _last_words(tokenizer, prompts), _last_words(tokenizer, target_prompts)
    return TokenPairs(torch.arange(len(prompts)), torch.tensor(sources, dtype=torch.long), torch.tensor(targets, dtype=torch.long))


def _common_ends(edited: list[int], target: list[int]) -> tuple[list[int], list[int]]:
    """The positions of the common prefix and the common suffix of two token sequences, in each."""
    prefix = 0
    while prefix < min(len(edited), len(target)) and edited[prefix] == target[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(edited), len(target)) - prefix and edited[-1 - suffix] == target[-1 - suffix]:
        suffix += 1
    return (
        list(range(prefix)) + list(range(len(edited) - suffix, len(edited))),
        list(range(prefix)) + list(range(len(target) - suffix, len(target))),
    )


def aligned_ends(tokenizer, prompts: list[str], concepts: list[str], target_prompts: list[str]) -> TokenPairs:
    """MACE's reference (src/cfr_utils.py, find_matching_indices and prepare_k_v): the common prefix
    and common suffix of the two prompts' tokens (start and end of text included) paired in order,
    then the padding after each, paired in order and cut to the shorter one. The tokens in between,
    the concept's own sub-tokens, get no target at all."""
    edited_ids, target_ids = padded_ids(tokenizer, prompts).tolist(), padded_ids(tokenizer, target_prompts).tolist()
    length, eos = len(edited_ids[0]), tokenizer.eos_token_id
    rows, sources, targets = [], [], []
    for row, (edited, target) in enumerate(zip(edited_ids, target_ids)):
        source_ends, target_ends = _common_ends(edited[: edited.index(eos) + 1], target[: target.index(eos) + 1])
        after = length - 1 - max(source_ends[-1], target_ends[-1])
        source_ends += range(source_ends[-1] + 1, source_ends[-1] + 1 + after)
        target_ends += range(target_ends[-1] + 1, target_ends[-1] + 1 + after)
        rows += [row] * len(source_ends)
        sources += source_ends
        targets += target_ends
    return TokenPairs(*(torch.tensor(v, dtype=torch.long) for v in (rows, sources, targets)))


def every_position(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(N, L) bool: every position of each prompt (start, words, end of text, padding)."""
    return torch.ones(padded_ids(tokenizer, prompts).shape, dtype=torch.bool)


def last_word_only(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(N, L) bool: each prompt's last word (the start token for an empty prompt)."""
    mask = torch.zeros(padded_ids(tokenizer, prompts).shape, dtype=torch.bool)
    mask[torch.arange(len(prompts)), _last_words(tokenizer, prompts)] = True
    return mask


@dataclass(frozen=True)
class Pairing:
    """A closed form's token choices: the pairs of its edited prompts, and the positions of its
    preserved prompts that are kept."""

    edited: Callable[[object, list[str], list[str], list[str]], TokenPairs]
    preserved: Callable[[object, list[str]], torch.Tensor]


UCE_PAIRINGS = {
    "position": Pairing(from_last_sub_token, every_position),
    "tails": Pairing(tails_from_last_words, every_position),
    "last": Pairing(last_words, last_word_only),
}
MACE_PAIRINGS = {
    "position": Pairing(all_same_positions, every_position),
    "aligned": Pairing(aligned_ends, every_position),
}
