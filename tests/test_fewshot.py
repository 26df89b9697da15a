"""Few-shot unlearning on the built-in world: the erased shape stops being drawn, the others stay.
Each bar fails if the method does nothing (the base model draws every shape)."""

from __future__ import annotations

import pytest
import torch

from fasterase import api
from fasterase.config import make_config
from fasterase.errors import UserError
from fasterase.methods.configs import FewShotConfig
from fasterase.methods.fewshot import FewShot, select_text_encoder_parameters
from fasterase.toyworld.folders import write_concept_folder


@pytest.fixture
def pipe(tiny_pipeline_dir):
    from fasterase.models.loading import load_pipeline

    return load_pipeline(tiny_pipeline_dir)


def _erase(pipe, **options):
    cfg = make_config(FewShotConfig, {"concepts": ["circle", "ring"], "steps": 2, "image_count": 2, "sample_steps": 2, "batch_size": 2, "log_every": 1, **options})
    before = {n: p.clone() for n, p in pipe.text_encoder.named_parameters()}
    unet_before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    reports = []
    result = FewShot().erase(pipe, cfg, progress=lambda step, total, losses: reports.append((step, total, losses)))
    changed = {f"text_encoder.{n}" for n, p in pipe.text_encoder.named_parameters() if not torch.equal(p, before[n])}
    assert all(torch.equal(p, unet_before[n]) for n, p in pipe.unet.named_parameters())
    assert not any(p.requires_grad for module in (pipe.unet, pipe.text_encoder, pipe.vae) for p in module.parameters())
    return result, changed, reports


@pytest.mark.parametrize("options", [{}, {"trainable": "mlp"}, {"trainable": "all", "preserve": ["square"]}])
def test_fewshot_changes_only_its_trainable_set_of_the_text_encoder(pipe, options):
    result, changed, reports = _erase(pipe, **options)
    trainable = {f"text_encoder.{n}" for n in select_text_encoder_parameters(pipe.text_encoder, options.get("trainable", "mlp_last_attention"))}
    assert changed and changed <= set(result.tensors) == trainable
    assert reports[0][:2] == (0, 2) and [r[0] for r in reports[1:]] == [1, 2]
    assert set(reports[-1][2]) == ({"denoising", "preserve"} if "preserve" in options else {"denoising"})
    assert result.key is None


def test_parameter_sets_name_the_papers_choices(pipe):
    default = set(select_text_encoder_parameters(pipe.text_encoder, "mlp_last_attention"))
    last = pipe.text_encoder.config.num_hidden_layers - 1
    assert any(f"layers.{last}.self_attn." in n for n in default) and all(".mlp." in n or f"layers.{last}." in n for n in default)
    assert set(select_text_encoder_parameters(pipe.text_encoder, "mlp")) < default
    assert not any("embeddings" in n for n in select_text_encoder_parameters(pipe.text_encoder, "attention"))
    with pytest.raises(UserError, match="trainable must be one of"):
        make_config(FewShotConfig, {"trainable": "unet"})


def test_masks_restrict_the_loss_to_the_concept(pipe, tmp_path):
    """With masks that mark nothing, no pixel has a loss: the ascent has no gradient and nothing moves."""
    write_concept_folder("circle", tmp_path / "images", tmp_path / "masks", count=2)
    for mask in (tmp_path / "masks").iterdir():
        from PIL import Image

        Image.new("L", Image.open(mask).size).save(mask)
    result, changed, _ = _erase(pipe, concepts=["circle"], images=str(tmp_path / "images"), masks=str(tmp_path / "masks"))
    assert not changed and result.tensors


def test_sd14_preset_has_the_papers_settings():
    from fasterase.config import preset

    cfg = make_config(FewShotConfig, preset("fewshot", "sd14"))
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.image_count, cfg.trainable) == (8, 1e-5, 2, 4, "mlp_last_attention")


@pytest.mark.slow
def test_erases_the_shape_and_keeps_the_others(tmp_path, assert_erased, world_sampling):
    summary = api.erase("fewshot", ["circle"], out=tmp_path / "x.safetensors")
    assert_erased(api.evaluate(summary.edit, n=16, sampling=world_sampling))
    from fasterase.edits import load_edit

    assert all(k.startswith("text_encoder.") for k in load_edit(summary.edit).tensors)


@pytest.mark.slow
def test_erases_from_a_folder_of_the_worlds_images(tmp_path, assert_erased, world_sampling):
    write_concept_folder("circle", tmp_path / "circle", count=4)
    summary = api.erase("fewshot", ["circle"], out=tmp_path / "x.safetensors", images=str(tmp_path / "circle"))
    # one preserved shape keeps this test short; the default run above checks all of them
    assert_erased(api.evaluate(summary.edit, n=16, preserve=["square"], sampling=world_sampling))
