"""What an erasure keeps: the CLIP score of the erased and the preserved concepts' images, before
and after, with a local CLIP model (the clip judge's, or `--clip DIR`).

CLIP score, as torchmetrics defines it: 100 x max(cos(image embedding, prompt embedding), 0),
averaged over images. A measure that cannot be computed is reported with its reason instead of
failing the report.
"""

from __future__ import annotations

import numpy as np

from .judges import Judge
from .judges.clip import CLIPJudge
from .report import Share, per_image


def image_clip_scores(scorer: CLIPJudge, images: np.ndarray, prompts: list[str]) -> list[float]:
    """The CLIP score of each image (N, H, W, 3) in [0, 1] with its prompt (N)."""
    import torch

    with torch.no_grad():
        texts = torch.cat([scorer.text_embeddings(prompts[i : i + scorer.cfg.batch_size]) for i in range(0, len(prompts), scorer.cfg.batch_size)])
        cosine = (scorer.image_embeddings(images) * texts).sum(-1)
    return (100 * cosine.clamp(min=0)).tolist()


def clip_score(scorer: CLIPJudge, images: np.ndarray, prompts: list[str]) -> float:
    """The mean CLIP score of images with their prompts."""
    return float(np.mean(image_clip_scores(scorer, images, prompts)))


# the report's clip_score when no CLIP model is at hand
NO_CLIP = {"unavailable": "no CLIP model: give one with --clip DIR (or judge with --judge clip:DIR)"}


def clip_scores(scorer: CLIPJudge, roles: dict[str, list[str]], prompts: dict[str, list[str]], shares: dict[str, Share]) -> dict[str, float]:
    """{role: mean over its concepts of their images' mean CLIP score} for the roles ("erased",
    "preserved") that have concepts; each process scores the images it drew."""
    scores = per_image(shares, lambda c, share: image_clip_scores(scorer, share.images, [prompts[c][p] for p in share.positions]))
    return {role: float(np.mean([np.mean(scores[c]) for c in concepts])) for role, concepts in roles.items() if concepts}


def scorer_for(judge: Judge, clip: str | None) -> CLIPJudge | None:
    """The CLIP model that scores quality: `clip` (a local CLIP folder), else the judge's own."""
    if clip is not None:
        from .judges import load_judge

        return load_judge(f"clip:{clip}")
    return judge if isinstance(judge, CLIPJudge) else None
