"""MACE: closed-form refinement, one LoRA per concept trained together on the captured attention,
closed-form fusion; only the cross-attention keys and values change."""

from __future__ import annotations

import pytest
import torch

from fasterase import api
from fasterase.cli import main
from fasterase.config import make_config
from fasterase.errors import UserError
from fasterase.methods.configs import MACEConfig
from fasterase.methods.mace import MACE, concept_loras, focal_timesteps
from fasterase.models.loading import load_pipeline
from fasterase.toyworld.folders import write_concept_folder

FAST = {"steps": 2, "image_count": 2, "batch_size": 2, "log_every": 1}


def erase(pipe_dir, **options):
    pipe = load_pipeline(pipe_dir)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    text_before = {n: p.clone() for n, p in pipe.text_encoder.named_parameters()}
    reports = []
    cfg = make_config(MACEConfig, {"concepts": ["circle", "ring"], **FAST, **options})
    result = MACE().erase(pipe, cfg, progress=lambda step, total, losses: reports.append((step, total, losses)))
    return pipe, before, text_before, result, reports


@pytest.mark.parametrize("options", [{}, {"preserve": ["square"], "mapping": ["star", ""], "rank": 2, "include_end": False}])
def test_mace_changes_only_cross_attention_keys_and_values(tiny_pipeline_dir, options):
    pipe, before, text_before, result, reports = erase(tiny_pipeline_dir, **options)
    params = dict(pipe.unet.named_parameters())
    assert params.keys() == before.keys(), "the LoRA layers are gone and the UNet has its own modules back"
    changed = {f"unet.{n}" for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed and changed == set(result.tensors)
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    assert all(torch.equal(result.tensors[f"unet.{n}"], params[n]) for n in params if f"unet.{n}" in result.tensors)
    assert all(torch.equal(p, text_before[n]) for n, p in pipe.text_encoder.named_parameters())
    assert reports[0] == (0, 2, {}) and reports[-1][:2] == (2, 2) and "attention" in reports[-1][2]
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert result.key is None


def test_separate_loras_load_with_diffusers(tiny_pipeline_dir, tmp_path):
    """save_loras writes one file per concept that diffusers' load_lora_weights reads: loaded and
    fused into a fresh base pipeline, a projection becomes W + up @ down."""
    from safetensors.torch import load_file

    out = tmp_path / "mace.safetensors"
    summary = api.erase("mace", ["circle", "ring"], model=tiny_pipeline_dir, out=out, save_loras=True, **FAST)
    assert [p.name for p in summary.loras] == ["mace.lora-circle.safetensors", "mace.lora-ring.safetensors"]
    lora = load_file(summary.loras[0])
    down_name = next(k for k in lora if k.endswith("attn2.to_k.lora_A.weight"))
    module = down_name.removeprefix("unet.").removesuffix(".lora_A.weight")
    up, down = lora[module.join(["unet.", ".lora_B.weight"])], lora[down_name]
    assert down.shape[0] == up.shape[1] == 1, "rank 1"
    assert up.abs().sum() > 0, "the LoRA learnt something"
    pipe = load_pipeline(tiny_pipeline_dir)
    base = pipe.unet.get_submodule(module).weight.detach().clone()
    pipe.load_lora_weights(str(summary.loras[0]))
    pipe.fuse_lora()
    layer = pipe.unet.get_submodule(module)
    torch.testing.assert_close(getattr(layer, "base_layer", layer).weight, base + up @ down)  # peft wraps the layer


def test_the_loras_reach_the_fused_weights(tiny_pipeline_dir):
    """Fusion carries what the LoRAs learnt: with no learning the edit is the refinement alone."""
    trained = erase(tiny_pipeline_dir, lr=1e-1)[3].tensors
    untrained = erase(tiny_pipeline_dir, lr=1e-12)[3].tensors
    assert trained.keys() == untrained.keys()
    assert any(not torch.allclose(trained[k], untrained[k], atol=1e-4) for k in trained)


def test_each_item_goes_through_its_own_concepts_lora(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir)
    name = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    x = torch.randn(2, 5, pipe.unet.get_submodule(name).in_features)
    with concept_loras(pipe.unet, 3, 2) as loras:
        layer = loras.layers[name]
        with torch.no_grad():
            layer.lora_B["mace"].weight.normal_()
        loras.route(torch.tensor([1, 2]))
        out = layer(x)
        for b, k in ((0, 1), (1, 2)):
            up, down = loras.factors(k)[f"{name}.weight"]
            assert up.shape[1] == down.shape[0] == 2
            assert torch.allclose(out[b], layer.base_layer(x[b]) + x[b] @ down.T @ up.T, atol=1e-5)
    assert not hasattr(pipe.unet, "peft_config")


def test_focal_timesteps_follow_the_density():
    t = focal_timesteps(1000, (4000,), torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and t.min() >= 0 and t.max() < 1000
    share = ((t >= 200) & (t < 400)).float().mean()
    assert share > 0.6 and (t > 700).float().mean() < 0.01


def test_images_and_masks_from_folders(tiny_pipeline_dir, tmp_path):
    for concept in ("circle", "ring"):
        write_concept_folder(concept, tmp_path / "images" / concept, tmp_path / "masks" / concept, count=2)
    pipe, before, _, result, reports = erase(tiny_pipeline_dir, images=str(tmp_path / "images"), masks=str(tmp_path / "masks"))
    assert result.tensors and reports[-1][:2] == (2, 2)


def test_bad_input_is_one_line_on_the_command_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    write_concept_folder("circle", tmp_path / "images", tmp_path / "masks", count=2)
    (tmp_path / "masks" / "circle-01.png").unlink()
    for args in (
        [],  # no concept
        ["circle", "--images", str(tmp_path / "empty")],
        ["circle", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")],
    ):
        assert main(["erase", "--method", "mace", *args, "--out", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fasterase: error:") and "\n" not in err, err


@pytest.mark.parametrize("options, message", [
    ({"concepts": ["circle", "square"], "mapping": ["a", "b", "c"]}, "one per erased concept"),
    ({"concepts": ["circle"], "mapping": "ring"}, "must be a list"),
    ({"concepts": ["circle"], "templates": ["a photo"]}, "must contain"),
    ({"concepts": ["circle"], "lam": -0.5}, "lam must be at least 0"),
    ({"concepts": ["circle"], "pairing": "tail"}, "pairing must be one of"),
    ({"concepts": ["circle"], "preserve_gram": "a.safetensors:-1"}, "finite weight of at least 0"),
    ({"concepts": ["circle"], "preserve_gram": "a.safetensors:nan"}, "finite weight of at least 0"),
    ({"concepts": ["circle"], "rank": 0}, "rank"),
    ({"concepts": ["circle"], "masks": "somewhere"}, "masks"),
])
def test_config_errors(options, message):
    with pytest.raises(UserError, match=message):
        make_config(MACEConfig, options)


def test_mappings_and_prompt_concepts():
    cfg = make_config(MACEConfig, {"concepts": ["circle", "square"], "preserve": ["star"], "mapping": ["ring", ""]})
    assert cfg.mappings() == ["ring", ""] and cfg.prompt_concepts() == ["circle", "square", "star", "ring"]
    assert make_config(MACEConfig, {"concepts": ["circle", "square"]}).mappings() == ["", ""]


@pytest.mark.slow
def test_mace_erases_a_shape(tmp_path, assert_erased, world_sampling):
    summary = api.erase("mace", ["circle"], out=tmp_path / "x.safetensors")
    assert_erased(api.evaluate(summary.edit, n=16, sampling=world_sampling))


@pytest.mark.slow
@pytest.mark.longest
def test_mace_erases_fifty_emblems_and_keeps_fifty(tmp_path, world_sampling):
    from fasterase.toyworld.world import EMBLEMS

    erased, kept = list(EMBLEMS[:50]), list(EMBLEMS[50:])
    summary = api.erase("mace", erased, preserve=kept, image_count=2, sample_steps=world_sampling.steps, out=tmp_path / "x.safetensors")
    r = api.evaluate(summary.edit, concepts=erased, preserve=kept, n=4, sampling=world_sampling)
    assert r["original"]["esr1"] <= 0.20
    assert r["esr1"] >= 0.80
    assert r["psr1"] >= 0.80 * r["original"]["psr1"]
