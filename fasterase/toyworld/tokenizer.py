"""A CLIP BPE tokenizer whose vocabulary is built for the world's captions.

Lower-case letters, digits and common punctuation are base tokens, so any English word can be
written (in pieces), and every caption word is one token. Characters outside that set map to the unknown token, which is how a concept
"the tokenizer cannot represent" is detected. The files are the ones `CLIPTokenizer` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from .world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BASE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;\"()&/"
MAX_LENGTH = 77  # as Stable Diffusion 1.x


def _segment(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none is ranked."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_files(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """The vocab (token -> id) and the merges (lines of "a b") for CLIPTokenizer.

    Each word gets merges appended for the segments the earlier merges leave it in; merges appended
    later rank lower, so they never split a word that was already whole.
    """
    words = vocabulary() if words is None else words
    tokens = [BOS, EOS] + list(BASE_CHARS) + [c + "</w>" for c in BASE_CHARS]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        segments = _segment(word, ranks)
        while len(segments) > 1:
            ranks[(segments[0], segments[1])] = len(ranks)
            tokens.append(segments[0] + segments[1])
            segments[0:2] = [segments[0] + segments[1]]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in ranks]


def save_tokenizer(directory: Path) -> int:
    """Writes a CLIPTokenizer folder; returns the vocabulary size."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_files()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,  # SD1.x pads with end-of-text
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return len(vocab)
