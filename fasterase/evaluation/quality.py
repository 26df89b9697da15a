"""What an erasure keeps, with a local CLIP model (the clip judge's, or `--clip DIR`):
- the CLIP score of the erased and the preserved concepts' images, before and after, as
  torchmetrics defines it: 100 x max(cos(image embedding, prompt embedding), 0), averaged;
- how far the preserved concepts' images moved: FID and KID between the base model's and the
  edited model's images, in CLIP's image-embedding space (not Inception's, whose weights exist
  only as a pickle; CLIP features also rank generators more as people do, Kynkaanniemi et al. 2023).
A measure that cannot be computed is reported with its reason instead of failing the report.
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


def image_features(scorer: CLIPJudge, shares: dict[str, Share]) -> np.ndarray:
    """(N, d) float64 CLIP image embeddings of every image of the shares' concepts; each process
    embeds the images it drew."""
    features = per_image(shares, lambda c, share: scorer.image_embeddings(share.images).tolist())
    return np.array([f for c in shares for f in features[c]], dtype=np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula between two sets of features (N, d): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    shift = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Tr((S_a S_b)^(1/2)) sums the square roots of S_a S_b's eigenvalues, real and >= 0 for PSD S_a, S_b
    root = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)).sum()
    return float(shift @ shift + np.trace(sa) + np.trace(sb) - 2 * root)


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID: the unbiased squared MMD between two sets of features with the kernel (x.y / d + 1)^3."""
    d = a.shape[1]
    kaa, kbb, kab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    m, n = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1)) - 2 * kab.mean())


def drift(original: np.ndarray | None, edited: np.ndarray | None) -> dict:
    """{"fid_clip", "kid_clip"} between the base model's and the edited model's preserved images, or why not."""
    if original is None or edited is None:
        return {"unavailable": "no preserved concepts"}
    if min(len(original), len(edited)) < 2:
        return {"unavailable": "fewer than 2 images of the preserved concepts"}
    return {"fid_clip": frechet_distance(original, edited), "kid_clip": kernel_distance(original, edited)}


def scorer_for(judge: Judge, clip: str | None) -> CLIPJudge | None:
    """The CLIP model that scores quality: `clip` (a local CLIP folder), else the judge's own."""
    if clip is not None:
        from .judges import load_judge

        return load_judge(f"clip:{clip}")
    return judge if isinstance(judge, CLIPJudge) else None
