"""The sd14 presets of the closed-form methods do what the official code does.

Each oracle below is written from the papers' equations and the official scripts' token choices,
in plain float64 linear algebra over one projection at a time, without any of fasterase's solver
code: W* = (lambda W + sum v c^T) (lambda I + sum c c^T)^-1 over the official (c, v) pairs. The
presets' edited weights must equal the oracles' to 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch

from fasterase.closed_form import preservation_gram, save_gram
from fasterase.methods import erase_config
from fasterase.methods.mace import MACE
from fasterase.methods.parameters import select_parameters
from fasterase.methods.uce import UCE
from fasterase.models.loading import builtin_model_dir, load_pipeline

F64 = torch.float64


def projections(pipe) -> dict[str, torch.Tensor]:
    """Every cross-attention key and value weight, float64."""
    return {n: p.detach().to(F64).clone() for n, p in select_parameters(pipe.unet, "cross_attention_kv").items()}


def embeddings(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states (N, 77, d) float64 and the attention mask, as the official scripts tokenize."""
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tokens.input_ids)[0].to(F64), tokens.attention_mask


def solve(lam: float, w: torch.Tensor, targets: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """(lambda W + targets) (lambda I + grams)^-1, targets = sum v c^T, grams = sum c c^T."""
    eye = torch.eye(w.shape[1], dtype=F64)
    return (lam * w + targets) @ torch.linalg.inv(lam * eye + grams)


def relative_error(ours: torch.Tensor, oracle: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """The difference relative to the weight, and relative to the edit's change of it."""
    difference = (ours.to(F64) - oracle).norm()
    return float(difference / oracle.norm()), float(difference / (oracle - base).norm())


@pytest.fixture(scope="module")
def builtin():
    return load_pipeline(builtin_model_dir())


def uce_2023(pipe, concepts: list[str], preserve: list[str], lam: float = 0.5, erase_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """train-scripts/train_erase.py: each concept's tail from its last word paired with the ' '
    guide's tail from its start token, both cut to the shorter; every position of '' and of each
    preserved concept kept, at max(0.1, 1 / their number)."""
    sources, targets = [], []
    for concept in concepts:
        states, mask = embeddings(pipe, [concept, " "])
        last, last_guide = (int(m.sum()) - 2 for m in mask)
        farthest = max(last, last_guide)
        sources.append(states[0, last : 77 - (farthest - last)])
        targets.append(states[1, last_guide : 77 - (farthest - last_guide)])
    retained = [""] + preserve
    kept = embeddings(pipe, retained)[0].reshape(-1, states.shape[-1])
    scale = max(0.1, 1 / len(retained))
    c, t = torch.cat(sources), torch.cat(targets)
    edited = {}
    for name, w in projections(pipe).items():
        value_sum = erase_scale * (w @ t.T) @ c + scale * (w @ kept.T) @ kept
        edited[name] = solve(lam, w, value_sum, erase_scale * c.T @ c + scale * kept.T @ kept)
    return edited


def test_uce_sd14_equals_the_2023_script(builtin):
    base = projections(builtin)
    oracle = uce_2023(builtin, ["circle", "red square"], ["star"])
    cfg = erase_config("uce", ["circle", "red square"], preset="sd14", preserve=["star"])
    result = UCE().erase(load_pipeline(builtin_model_dir()), cfg).tensors
    for name, expected in oracle.items():
        to_weight, to_change = relative_error(result[f"unet.{name}"], expected, base[name])
        assert to_weight < 1e-6 and to_change < 1e-4, (name, to_weight, to_change)


def test_uce_last_pairing_equals_the_2025_script(builtin):
    """trainscripts/uce_sd_erase.py: each prompt's last word alone, preserved concepts too, scale 1."""
    base = projections(builtin)
    states, mask = embeddings(builtin, ["blue circle", "", "star"])
    c, g, p = (row[int(m.sum()) - 2] for row, m in zip(states, mask))
    options = {"pairing": "last", "preserve_empty": False, "preserve_scale_by_count": False, "preserve_scale": 1.0, "preserve": ["star"]}
    result = UCE().erase(load_pipeline(builtin_model_dir()), erase_config("uce", ["blue circle"], preset="sd14", **options)).tensors
    for name, w in base.items():
        expected = solve(0.5, w, torch.outer(w @ g, c) + torch.outer(w @ p, p), torch.outer(c, c) + torch.outer(p, p))
        to_weight, to_change = relative_error(result[f"unet.{name}"], expected, w)
        assert to_weight < 1e-6 and to_change < 1e-4, (name, to_weight, to_change)


def aligned_indices(old: list[int], new: list[int], length: int = 77) -> tuple[list[int], list[int]]:
    """MACE's find_matching_indices and its extension over the padding (src/cfr_utils.py)."""
    start = 0
    for i, j in zip(old, new):
        if i != j:
            break
        start += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start and end_new >= start and old[end_old] == new[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    old_idx = list(range(start)) + list(range(end_old + 1, len(old)))
    new_idx = list(range(start)) + list(range(end_new + 1, len(new)))
    if old_idx[-1] >= new_idx[-1]:
        return old_idx + list(range(old_idx[-1] + 1, length)), new_idx + list(range(new_idx[-1] + 1, length - (old_idx[-1] - new_idx[-1])))
    return old_idx + list(range(old_idx[-1] + 1, length - (new_idx[-1] - old_idx[-1]))), new_idx + list(range(new_idx[-1] + 1, length))


@pytest.mark.parametrize("setting", ["sd14", "sd14-celebrity"])
def test_mace_sd14_equals_the_reference(builtin, tmp_path, monkeypatch, setting):
    """configs/object: lambda 1e3, no preservation. configs/celebrity: lambda 0, two caches (domain
    weight 8e4, general 1) at scale 1e-4, applied twice in the refinement (train_preserve_scale
    squared) and once in the fusion, whose targets are the original model's. Both: the refinement
    on the aligned tokens, the fusion on every position of the concept's prompts, sent where
    W_refined + B A sends them."""
    concepts, mapping = ["circle", "red square"], "star"
    domain_prompts = [f"a photo of a {c}" for c in ("ring", "triangle", "heart", "cross", "square")] + ["ring", "triangle"]
    general_prompts = [f"a {colour} {shape}" for colour in ("green", "blue", "yellow") for shape in ("star", "ring", "heart")]
    caches = ((8e4, domain_prompts), (1.0, general_prompts)) if setting == "sd14-celebrity" else ()
    paths = []
    for i, (weight, prompts) in enumerate(caches):
        save_gram(tmp_path / f"{i}.safetensors", preservation_gram(builtin, prompts, "built-in"))
        paths.append(f"{tmp_path / f'{i}.safetensors'}:{weight:g}")
    options = {"mapping": [mapping], "preserve_gram": ",".join(paths), "steps": 2, "lr": 1e-2, "image_count": 1, "sample_steps": 2, "masks": "none"}
    cfg = erase_config("mace", concepts, preset=setting, **options)
    lam, scale = cfg.lam, cfg.preserve_scale

    seen = {}
    train = MACE._train

    def spy(pipe, cfg, *args):
        seen["refined"] = projections(pipe)
        seen["loras"] = train(pipe, cfg, *args)
        return seen["loras"]

    monkeypatch.setattr(MACE, "_train", staticmethod(spy))
    result = MACE().erase(load_pipeline(builtin_model_dir()), cfg).tensors

    base = projections(builtin)
    width = builtin.unet.config.cross_attention_dim
    cache = torch.zeros(width, width, dtype=F64)
    for weight, prompts in caches:
        states = embeddings(builtin, prompts)[0].reshape(-1, width)
        cache += weight * states.T @ states
    # stage 1: the reference's pairs, with the caches at train_preserve_scale squared
    sources, targets = [], []
    for concept in concepts:
        for template in cfg.templates:
            old, new = template.format(concept), template.format(mapping)
            old_idx, new_idx = aligned_indices(builtin.tokenizer(old).input_ids, builtin.tokenizer(new).input_ids)
            states = embeddings(builtin, [old, new])[0]
            sources.append(states[0, old_idx])
            targets.append(states[1, new_idx])
    c, t = torch.cat(sources), torch.cat(targets)
    refined = {name: solve(lam, w, (w @ t.T) @ c + scale**2 * w @ cache, c.T @ c + scale**2 * cache) for name, w in base.items()}
    for name, expected in refined.items():
        to_weight, to_change = relative_error(seen["refined"][name], expected, base[name])
        assert to_weight < 1e-6 and to_change < 1e-4, ("refinement", name, to_weight, to_change)
    # stage 3: every position of each concept's prompts, to W_refined + B_k A_k; caches to the original W
    fused_positions = [embeddings(builtin, [t.format(concept) for t in cfg.templates])[0].reshape(-1, width) for concept in concepts]
    for name, w_refined in refined.items():
        value_sum, grams = scale * base[name] @ cache, scale * cache
        for k, own in enumerate(fused_positions):
            up, down = (f.to(F64) for f in seen["loras"][k][name])
            value_sum += ((w_refined + up @ down) @ own.T) @ own
            grams += own.T @ own
        expected = solve(lam, w_refined, value_sum, grams)
        to_weight, to_change = relative_error(result[f"unet.{name}"], expected, base[name])
        assert to_weight < 1e-6 and to_change < 1e-4, ("fusion", name, to_weight, to_change)
