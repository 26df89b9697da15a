"""Concept Ablation on the built-in world: the erased shape's prompt draws what the anchor's does,
the other shapes stay. The bars fail if the method does nothing (the base model draws every shape)."""

from __future__ import annotations

import pytest
import torch

from fasterase import api
from fasterase.config import make_config
from fasterase.errors import UserError
from fasterase.methods.ca import CA, ablation_prompts  # importing registers the method
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
def test_erases_the_shape_and_keeps_the_others(tmp_path, assert_erased, world_sampling):
    summary = api.erase("ca", ["circle"], out=tmp_path / "x.safetensors")
    assert_erased(api.evaluate(summary.edit, n=16, sampling=world_sampling))


def test_sd14_preset_loads():
    from fasterase.config import preset

    cfg = make_config(CAConfig, preset("ca", "sd14"), {"concepts": ["circle"]})
    assert cfg.trainable == "cross_attention_kv" and cfg.steps == 100 and cfg.batch_size == 8


CAPTIONS = "a red square on a dotted background\n\nthere is a star in the picture\nA drawing of a Square\n"


def test_the_anchor_prompts_file_gives_the_prompts_the_method_trains_on(tmp_path, monkeypatch):
    """Trajectories are sampled from the file's captions (blank lines and captions without the
    anchor skipped), and each concept is trained on the same captions with it in the anchor's place."""
    import fasterase.methods.ca as ca
    from fasterase.models.loading import load_pipeline

    captions = tmp_path / "squares.txt"
    captions.write_text(CAPTIONS)
    cfg = make_config(CAConfig, {**TINY, "trajectories": 3, "anchor": "square", "anchor_prompts": str(captions)})
    sampled, encoded = [], []

    def recording(function, prompts_seen):
        def record(*args):
            prompts_seen.append(args[-1])  # the prompts are the last argument of both
            return function(*args)
        return record

    monkeypatch.setattr(ca, "sample_banks", recording(ca.sample_banks, sampled))
    monkeypatch.setattr(ca, "encode", recording(ca.encode, encoded))
    CA().erase(load_pipeline(), cfg)
    anchor = ["a red square on a dotted background", "A drawing of a Square", "a red square on a dotted background"]
    assert sampled == [anchor * 2]
    assert encoded == [[c.replace("square", shape).replace("Square", shape) for shape in ("circle", "ring") for c in anchor]]


def test_style_prompts_use_the_references_phrasings(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text(CAPTIONS)
    style = {"concepts": ["striped"], "concept_type": "style", "trajectories": 3}
    anchor_prompts, concept_prompts = ablation_prompts(make_config(CAConfig, {**style, "anchor_prompts": str(captions)}))
    assert anchor_prompts == ["a red square on a dotted background", "there is a star in the picture", "A drawing of a Square"]
    assert concept_prompts == [
        "a red square on a dotted background, in the style of striped",
        "in striped's style, there is a star in the picture",
        "in striped's style, A drawing of a Square",
    ]
    anchor_prompts, concept_prompts = ablation_prompts(make_config(CAConfig, {**style, "anchor": "shape"}))
    assert anchor_prompts == ["shape", "a photo of a shape", "a picture of a shape"]
    assert concept_prompts == ["shape, in the style of striped", "in striped's style, a photo of a shape", "in striped's style, a picture of a shape"]
    assert ablation_prompts(make_config(CAConfig, style))[1][:2] == ["in the style of striped", "in striped's style"]


def test_without_a_file_the_prompts_are_the_templates():
    anchor_prompts, concept_prompts = ablation_prompts(make_config(CAConfig, {"concepts": ["circle"], "anchor": "shape", "trajectories": 2}))
    assert anchor_prompts == ["shape", "a photo of a shape"] and concept_prompts == ["circle", "a photo of a circle"]


@pytest.mark.parametrize("options, content, words", [
    ({"anchor": "square"}, "there is a star\n", "no caption in anchor_prompts .* contains the anchor 'square'"),
    ({}, CAPTIONS, "need the anchor"),
    ({"anchor": "square", "concept_type": "painting"}, CAPTIONS, "concept_type must be one of object, style"),
])
def test_anchor_prompts_that_cannot_be_used(tmp_path, options, content, words):
    captions = tmp_path / "captions.txt"
    captions.write_text(content)
    with pytest.raises(UserError, match=words):
        make_config(CAConfig, {"concepts": ["circle"], "anchor_prompts": str(captions), **options})
