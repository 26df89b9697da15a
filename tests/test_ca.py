"""Concept Ablation on the built-in world: the erased shape's prompt draws what the anchor's does,
the other shapes stay. The bars fail if the method does nothing (the base model draws every shape)."""

from __future__ import annotations

import pytest
import torch

from fasterase import api
from fasterase.config import make_config
from fasterase.errors import UserError
from fasterase.methods.ca import CA  # importing registers the method
from fasterase.methods.configs import CAConfig

TINY = {"concepts": ["circle", "ring"], "steps": 2, "trajectories": 2, "sample_steps": 2, "batch_size": 2, "log_every": 1}


@pytest.mark.parametrize("options", [
    {},
    {"preserve": ["square"]},
    {"anchor": "shape", "trainable": "cross_attention"},
])
def test_ca_changes_only_its_trainable_set(tiny_pipeline_dir, options):
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    cfg = make_config(CAConfig, {**TINY, **options})
    reports = []
    result = CA().erase(pipe, cfg, progress=lambda step, total, losses: reports.append((step, total, losses)))
    changed = {f"unet.{n}" for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(result.tensors)
    if cfg.trainable == "cross_attention_kv":
        assert all(".attn2.to_k." in name or ".attn2.to_v." in name for name in result.tensors)
    else:
        assert all(".attn2." in name for name in result.tensors) and any(".attn2.to_q." in name for name in result.tensors)
    expected = {"erase", "keep"} if cfg.preserve else {"erase"}
    assert [r[:2] for r in reports] == [(0, 2), (1, 2), (2, 2)] and set(reports[-1][2]) == expected
    assert not any(p.requires_grad or p.grad is not None for p in pipe.unet.parameters())


def test_the_anchor_is_checked_against_the_tokenizer(tmp_path):
    assert make_config(CAConfig, {"concepts": ["circle"], "anchor": "ring"}).prompt_concepts() == ["circle", "ring"]
    assert make_config(CAConfig, {"concepts": ["circle"]}).prompt_concepts() == ["circle"]
    with pytest.raises(UserError, match="cannot represent"):
        api.erase("ca", ["circle"], anchor="circle\u2603", out=tmp_path / "x.safetensors")


@pytest.mark.parametrize("options, words", [
    ({"anchor": "circle"}, "anchor"),
    ({"trainable": "x"}, "trainable"),
    ({"batch_size": 0}, "batch_size"),
])
def test_ca_refuses_bad_options(options, words):
    with pytest.raises(UserError, match=words):
        make_config(CAConfig, {"concepts": ["circle"], **options})


@pytest.mark.slow
def test_erases_the_shape_and_keeps_the_others(tmp_path, assert_erased):
    summary = api.erase("ca", ["circle"], out=tmp_path / "x.safetensors")
    assert_erased(api.evaluate(summary.edit, n=16))


def test_sd14_preset_loads():
    from fasterase.config import preset

    cfg = make_config(CAConfig, preset("ca", "sd14"), {"concepts": ["circle"]})
    assert cfg.trainable == "cross_attention_kv" and cfg.steps == 100 and cfg.batch_size == 8
