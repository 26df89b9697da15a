"""Forget-Me-Not: attention re-steering through captured statistics, with optional textual inversion."""

from __future__ import annotations

import pytest
import torch

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
    from fasterase.methods.fmn import InvertedTokens

    pipe = load_pipeline(tiny_pipeline_dir)
    inverted = InvertedTokens(pipe, ["circle"], 2)
    states = inverted.encode(pipe, ["a photo of a " + inverted.words["circle"]]).states
    (grad,) = torch.autograd.grad(states.square().sum(), list(inverted.vectors))
    assert grad.shape == (2, pipe.text_encoder.config.hidden_size) and grad.abs().sum() > 0


def test_bad_options():
    for options in ({"trainable": "text_encoder"}, {"batch_size": 0}, {"inversion_steps": -1}, {"masks": "somewhere"}):
        with pytest.raises(UserError):
            make_config(FMNConfig, {"concepts": ["circle"], **options})


@pytest.mark.slow
def test_fmn_erases_a_shape(tmp_path, assert_erased):
    summary = api.erase("fmn", ["circle"], out=tmp_path / "fmn.safetensors")
    assert_erased(api.evaluate(summary.edit, n=16))
