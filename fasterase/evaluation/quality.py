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


def clip_score(scorer: CLIPJudge, images: np.ndarray, prompts: list[str]) -> float:
    """The mean CLIP score of images (N, H, W, 3) in [0, 1] with their prompts (N)."""
    import torch

    with torch.no_grad():
        texts = torch.cat([scorer.text_embeddings(prompts[i : i + scorer.cfg.batch_size]) for i in range(0, len(prompts), scorer.cfg.batch_size)])
        cosine = (scorer.image_embeddings(images) * texts).sum(-1)
    return float((100 * cosine.clamp(min=0)).mean())


# the report's clip_score when no CLIP model is at hand
NO_CLIP = {"unavailable": "no CLIP model: give one with --clip DIR (or judge with --judge clip:DIR)"}


def clip_scores(scorer: CLIPJudge, roles: dict[str, list[str]], prompts: dict[str, list[str]], images: dict[str, np.ndarray]) -> dict[str, float]:
    """{role: mean CLIP score of its concepts' images} for the roles ("erased", "preserved") that have concepts."""
    return {
        role: float(np.mean([clip_score(scorer, images[c], prompts[c]) for c in concepts]))
        for role, concepts in roles.items()
        if concepts
    }


def scorer_for(judge: Judge, clip: str | None) -> CLIPJudge | None:
    """The CLIP model that scores quality: `clip` (a local CLIP folder), else the judge's own."""
    if clip is not None:
        from .judges import load_judge

        return load_judge(f"clip:{clip}")
    return judge if isinstance(judge, CLIPJudge) else None
