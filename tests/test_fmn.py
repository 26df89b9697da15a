"""Forget-Me-Not: attention re-steering through captured statistics, with optional textual inversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasterase import api
from fasterase.config import make_config
from fasterase.errors import UserError
from fasterase.methods.configs import FMNConfig
from fasterase.methods.fmn import ForgetMeNot
from fasterase.models.loading import load_pipeline


KV = (".attn2.to_k.", ".attn2.to_v.")


@pytest.mark.parametrize("options, belongs", [
    ({}, lambda name: any(part in name for part in KV)),
    ({"trainable": "cross_attention", "include_end": False}, lambda name: ".attn2." in name),
    ({"trainable": "all", "inversion_steps": 2, "inversion_tokens": 2}, lambda name: True),
])
def test_fmn_changes_only_its_trainable_set(tiny_pipeline_dir, options, belongs):
    pipe = load_pipeline(tiny_pipeline_dir)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    text_before = {n: p.clone() for n, p in pipe.text_encoder.named_parameters()}
    cfg = make_config(FMNConfig, {"concepts": ["circle", "ring"], "steps": 2, "image_count": 2, "batch_size": 2, "log_every": 1, **options})
    reports = []
    result = ForgetMeNot().erase(pipe, cfg, progress=lambda step, total, losses: reports.append((step, total, losses)))
    changed = {f"unet.{n}" for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(result.tensors)
    assert all(belongs(n) for n in result.tensors)
    assert all(torch.equal(p, text_before[n]) for n, p in pipe.text_encoder.named_parameters()), "the text encoder stays"
    assert reports[-1][:2] == (2, 2) and "attention" in reports[-1][2]
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert len(pipe.tokenizer) == pipe.text_encoder.get_input_embeddings().num_embeddings, "inversion leaves the tokenizer alone"


def test_inversion_learns_vectors_that_reduce_the_denoising_loss(tiny_pipeline_dir):
    """The inverted words are used: re-steering then targets them, not the concept's own token."""
    from fasterase.inversion import InvertedTokens

    pipe = load_pipeline(tiny_pipeline_dir)
    inverted = InvertedTokens(pipe, ["circle"], 2)
    states = inverted.encode(pipe, ["a photo of a " + inverted.words["circle"]]).states
    (grad,) = torch.autograd.grad(states.square().sum(), list(inverted.vectors))
    assert grad.shape == (2, pipe.text_encoder.config.hidden_size) and grad.abs().sum() > 0


def test_inversion_starts_and_stays_where_the_reference_does(tiny_pipeline_dir):
    """concept_then_random: the concept's sub-token vector, then random ones (std 1, far longer than
    any token's); the norm pull keeps the direction and moves the norm towards an ordinary token's."""
    from fasterase.inversion import InvertedTokens

    pipe = load_pipeline(tiny_pipeline_dir)
    table = pipe.text_encoder.get_input_embeddings().weight
    (circle,) = pipe.tokenizer("circle", add_special_tokens=False).input_ids
    inverted = InvertedTokens(pipe, ["circle"], 3, "concept_then_random", torch.Generator().manual_seed(0))
    vectors = inverted.vectors[0]
    assert torch.equal(vectors[0], table[circle]) and not torch.equal(vectors[1], vectors[2])
    mean = table.norm(dim=-1).mean().item()
    assert inverted.mean_norms == [pytest.approx(mean)] and (vectors[1:].norm(dim=-1) > 5 * mean).all()
    before = vectors.detach().clone()
    inverted.pull_norms(0.5)
    norms = before.norm(dim=-1)
    assert torch.allclose(vectors.norm(dim=-1), norms + 0.5 * (mean - norms))
    assert torch.allclose(nn.functional.normalize(vectors, dim=-1), nn.functional.normalize(before, dim=-1))
    assert torch.equal(InvertedTokens(pipe, ["circle"], 2).vectors[0], table[[circle, circle]]), "init concept: the sub-tokens in turn"


def test_sd14_preset_runs_the_references_inversion():
    """configs/ti.yaml of SHI-Labs/Forget-Me-Not, then configs/attn.yaml (use_ti, use_pooler)."""
    from fasterase.config import preset

    cfg = make_config(FMNConfig, preset("fmn", "sd14"), {"concepts": ["circle"]})
    inversion = (cfg.inversion_steps, cfg.inversion_tokens, cfg.inversion_init, cfg.inversion_lr, cfg.inversion_norm_pull, cfg.batch_size)
    assert inversion == (500, 4, "concept_then_random", 1e-3, 0.1, 1)
    assert (cfg.steps, cfg.lr, cfg.trainable, cfg.include_end, cfg.templates) == (35, 2e-6, "all", True, ["a photo of {}"])


def test_the_sd14_preset_with_inversion_runs_end_to_end(tmp_path):
    """The built-in world, with the preset's inversion and re-steering cut to a few steps."""
    from fasterase.edits import load_edit

    tiny = {"steps": 2, "inversion_steps": 3, "image_count": 1, "sample_steps": 2, "log_every": 1}
    losses = []
    summary = api.erase("fmn", ["circle"], preset="sd14", out=tmp_path / "fmn.safetensors", progress=lambda step, total, loss: losses.append(loss), **tiny)
    assert sum("inversion" in loss for loss in losses) == 3 and sum("attention" in loss for loss in losses) == 2
    edit = load_edit(summary.edit)
    assert edit.metadata.config["inversion_tokens"] == 4 and edit.tensors
    assert all(name.startswith("unet.") for name in edit.tensors)


def test_bad_options():
    for options in (
        {"trainable": "text_encoder"}, {"batch_size": 0}, {"inversion_steps": -1}, {"masks": "somewhere"},
        {"inversion_init": "random"}, {"inversion_norm_pull": 1.5}, {"inversion_norm_pull": -0.1},
    ):
        with pytest.raises(UserError):
            make_config(FMNConfig, {"concepts": ["circle"], **options})


@pytest.mark.slow
def test_fmn_erases_a_shape(tmp_path, assert_erased, world_sampling):
    summary = api.erase("fmn", ["circle"], out=tmp_path / "fmn.safetensors")
    assert_erased(api.evaluate(summary.edit, n=16, sampling=world_sampling))
