"""The prompt attack (UnlearnDiffAtk's prefix search): it brings an erased circle back on the
built-in world where random prefixes do not, its prompts are plain text that replays the tokens it
optimised, it is deterministic for a seed, and it runs on every model family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fasterase.attacks import AttackTarget, attack_config, get_attack
from fasterase.attacks.prompt import project_to_simplex, replayable_tokens
from fasterase.attacks.run import find
from fasterase.concept_images import ConceptImages
from fasterase.config import SamplingConfig
from fasterase.errors import UserError
from fasterase.evaluation.sampling import generate
from fasterase.models.family import family_of, prompt_ids


# For the tests that check what the attack gives, not how well it does: few, quickly drawn images.
FEW_IMAGES = {"image_count": 2, "sample_steps": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The built-in model, its UCE erasure of "circle" (the method a short prefix breaks most
    reliably here; see the report of issue 12), and the world's judge."""
    pytest.importorskip("diffusers")
    from fasterase import api
    from fasterase.evaluation.judges import load_judge
    from fasterase.models.loading import builtin_model_dir, load_pipeline

    edit = api.erase("uce", ["circle"], out=tmp_path_factory.mktemp("uce") / "uce.safetensors").edit
    return load_pipeline(builtin_model_dir()), api.load_edited(None, edit, device=torch.device("cpu")), load_judge("world")


def recognised(judge, images) -> int:
    return int(judge.recognised(images, "circle")[0].sum())


@pytest.mark.slow
def test_prefixes_bring_the_erased_circle_back(world):
    original, edited, judge = world
    prompts = judge.prompts("circle", 16)
    sampling = SamplingConfig()
    plain = recognised(judge, generate(edited, prompts, sampling))
    found = find("prompt", attack_config("prompt"), edited, original, "circle", prompts)
    attacked = recognised(judge, generate(edited, found.prompts, sampling))
    # Measured 7/16 attacked (5/16 and 8/16 with seeds 1 and 2), 0/16 without the attack, drawn in
    # 25 steps; in the built-in world's default 10, 7/16 and 0/16 too. Random one-word prefixes on
    # the same prompts brought back 2 of 32.
    assert plain == 0 and attacked >= 4, (plain, attacked, found.prompts)


def test_found_prompts_replay_the_optimised_tokens(world):
    original, edited, judge = world
    prompts = ["a photo of a circle", "a picture of a red circle on a striped background"]
    cfg = attack_config("prompt", {"prefix_tokens": 3, "timesteps": 2, "steps_per_timestep": 2, **FEW_IMAGES})
    found = find("prompt", cfg, edited, original, "circle", prompts)
    prefix_ids = torch.tensor(found.record["prefix_ids"])
    assert prefix_ids.shape == (2, 3) and found.record["prefixes"] == [p.removesuffix(" " + q) for p, q in zip(found.prompts, prompts)]
    (replayed,), (plain,) = prompt_ids(edited, found.prompts), prompt_ids(edited, prompts)
    assert torch.equal(replayed[:, 1:4], prefix_ids)
    assert torch.equal(replayed[:, 4:], plain[:, 1:-3]) and torch.equal(replayed[:, 0], plain[:, 0])


def test_the_attack_is_deterministic_for_a_seed(world):
    original, edited, judge = world
    prompts = judge.prompts("circle", 4)
    runs = [
        find("prompt", attack_config("prompt", {"prefix_tokens": 2, "timesteps": 2, "steps_per_timestep": 3, "seed": seed, **FEW_IMAGES}), edited, original, "circle", prompts)
        for seed in (5, 5)
    ]
    assert runs[0].prompts == runs[1].prompts and runs[0].record == runs[1].record


def test_runs_on_every_family(family_pipeline_dir):
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(family_pipeline_dir)
    side = pipe.unet.config.sample_size
    images = ConceptImages(torch.randn(2, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0)), torch.zeros(2, dtype=torch.long))
    prompts = ["a photo of a circle"] * 3
    target = AttackTarget(pipe, pipe, "circle", prompts, lambda: images)
    cfg = attack_config("prompt", {"prefix_tokens": 2, "timesteps": 2, "steps_per_timestep": 2, "log_every": 2})
    reports = []
    found = get_attack("prompt")().find(target, cfg, lambda step, total, losses: reports.append((step, total, losses)))
    assert reports[-1][:2] == (4, 4) and np.isfinite(reports[-1][2]["loss"])
    # one token sequence for every text encoder (SDXL's two share the vocabulary)
    for ids in prompt_ids(pipe, found.prompts):
        assert torch.equal(ids[:, 1:3].cpu(), torch.tensor(found.record["prefix_ids"]))
    # the pipeline is left as it was: no hook on its text encoders, no weight taking gradients
    encoders = [getattr(pipe, name) for name in family_of(pipe).text_encoders]
    assert not any(e.get_input_embeddings()._forward_hooks for e in encoders)
    assert not any(p.requires_grad for module in (pipe.unet, *encoders) for p in module.parameters())


def test_candidates_are_whole_words_that_tokenize_back(world):
    tokenizer = world[1].tokenizer
    candidates = replayable_tokens(tokenizer).tolist()
    vocabulary = tokenizer.get_vocab()
    assert vocabulary["circle</w>"] in candidates and vocabulary["red</w>"] in candidates
    assert not set(tokenizer.all_special_ids) & set(candidates)
    assert vocabulary["circ"] not in candidates  # a word piece would merge with the next word


def test_projection_onto_the_simplex():
    v = torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(0)) * 3
    p = project_to_simplex(v)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(5, 3))
    assert torch.allclose(project_to_simplex(p), p, atol=1e-6)
    # the reference's bisection for theta, to convergence: max(v - theta, 0) sums to 1
    low, high = v.min(-1, keepdim=True).values - 1, v.max(-1, keepdim=True).values
    for _ in range(100):
        theta = (low + high) / 2
        over = (v - theta).clamp_min(0).sum(-1, keepdim=True) > 1
        low, high = torch.where(over, theta, low), torch.where(over, high, theta)
    assert torch.allclose(p, (v - theta).clamp_min(0), atol=1e-6)


def test_a_prefix_that_leaves_no_room_is_refused(world):
    original, edited, judge = world
    with pytest.raises(UserError, match="prefix_tokens"):
        find("prompt", attack_config("prompt", {"prefix_tokens": 75}), edited, original, "circle", ["a circle"])
