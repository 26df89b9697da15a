"""Edits bind to what they change: an edit carries the fingerprints of the components it
changes, so an edit of the text encoder applies to any model with that text encoder, whatever its
UNet, and an edit of the UNet to any model with that UNet, whatever its text encoder. Edits written
before, which carry the UNet's and the text encoder's whatever they changed, keep binding to both."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch

from fasterase import api
from fasterase.config import SamplingConfig
from fasterase.edits import EDIT_FORMAT, changed_components, load_edit, save_edit
from fasterase.errors import UserError
from fasterase.lora import load_lora
from fasterase.models.fingerprint import fingerprints, portable_name
from fasterase.models.loading import load_pipeline
from fasterase.toyworld.folders import write_concept_folder

# Each component's weights file in a diffusers folder, and a tensor of it that a copy changes.
WEIGHTS = {
    "unet": ("unet/diffusion_pytorch_model.safetensors", "attn1.to_q.weight"),
    "text_encoder": ("text_encoder/model.safetensors", "self_attn.q_proj.weight"),
}


@pytest.fixture(scope="module")
def models(family_pipeline_dirs, tmp_path_factory):
    """Model folders by name: "base", a tiny SD1.x pipeline; "unet" and "text_encoder", copies of it
    with one weight of that component scaled by 1.5, the rest the same."""
    base = family_pipeline_dirs("sd1")
    folders = {"base": base}
    for component, (file, suffix) in WEIGHTS.items():
        folder = tmp_path_factory.mktemp(f"other_{component}") / "model"
        shutil.copytree(base, folder)
        tensors = safetensors.torch.load_file(str(folder / file))
        name = next(k for k in tensors if k.endswith(suffix))
        tensors[name] = tensors[name] * 1.5
        safetensors.torch.save_file(tensors, str(folder / file), metadata={"format": "pt"})
        folders[component] = folder
    return folders


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of the circle, so that the erasures below draw none (the slow part on a CPU)."""
    folder = tmp_path_factory.mktemp("images")
    write_concept_folder("circle", folder, count=1)
    return folder


@pytest.fixture(scope="module")
def fewshot_edit(models, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("fewshot") / "fewshot.safetensors"
    return api.erase("fewshot", ["circle"], model=models["base"], out=out, images=str(images), image_count=1, steps=1, batch_size=1).edit


@pytest.fixture(scope="module")
def uce_edit(models, tmp_path_factory):
    return api.erase("uce", ["circle"], model=models["base"], out=tmp_path_factory.mktemp("uce") / "uce.safetensors").edit


def refusal(model, edit) -> str:
    with pytest.raises(UserError) as raised:
        api.load_edited(model, edit)
    message = str(raised.value)
    assert "\n" not in message
    return message


def assert_applied(pipe, edit) -> None:
    for key, tensor in load_edit(edit).tensors.items():
        component, _, name = key.partition(".")
        parameters = {portable_name(component, n): p for n, p in getattr(pipe, component).named_parameters()}
        assert torch.equal(parameters[name], tensor.to(torch.float32)), key


def test_a_text_encoder_edit_applies_to_any_model_with_that_text_encoder(models, fewshot_edit):
    """The few-shot paper's claim: its text encoder works with another UNet."""
    edit = load_edit(fewshot_edit)
    assert set(edit.metadata.base_fingerprints) == set(changed_components(edit.tensors)) == {"text_encoder"}
    pipe = api.load_edited(models["unet"], fewshot_edit)
    assert_applied(pipe, fewshot_edit)
    other_unet = load_pipeline(models["unet"])
    assert all(torch.equal(p, q) for p, q in zip(pipe.unet.parameters(), other_unet.unet.parameters()))
    assert refusal(models["text_encoder"], fewshot_edit).endswith(": its text_encoder differs from this model's")


def test_a_unet_edit_applies_to_any_model_with_that_unet(models, uce_edit):
    """UCE's closed form reads the text encoder's embeddings, but its edit changes the UNet alone
    and binds to it alone (ARCHITECTURE, Edits): whether it erases as well under another text
    encoder is for evaluate to measure, as for a text encoder's edit under another UNet."""
    assert set(load_edit(uce_edit).metadata.base_fingerprints) == {"unet"}
    assert_applied(api.load_edited(models["text_encoder"], uce_edit), uce_edit)
    assert refusal(models["unet"], uce_edit).endswith(": its unet differs from this model's")


def test_applying_an_edit_fingerprints_only_the_components_it_binds_to(models, fewshot_edit, monkeypatch):
    """A fingerprint hashes every weight of its component: the UNet, the largest, is not hashed for
    an edit of the text encoder."""
    taken = []

    def recording(pipe, components=None):
        taken.append(components)
        return fingerprints(pipe, components)

    monkeypatch.setattr(api, "fingerprints", recording)
    api.load_edited(models["base"], fewshot_edit)
    assert taken == [("text_encoder",)]


def test_edits_written_before_bind_to_every_component_they_carry(models, fewshot_edit, tmp_path):
    """An edit of format version 2 as the releases before wrote it (fingerprints of the UNet and the
    text encoder whatever it changed) still loads and applies to its base, and never to more
    models than it did then: a model with another UNet still refuses it."""
    edit = load_edit(fewshot_edit)
    metadata = {
        "method": "fewshot", "concepts": ["circle"], "config": edit.metadata.config, "base_model": str(models["base"]), "version": "0.3.0",
        "base_fingerprints": fingerprints(load_pipeline(models["base"]), ("unet", "text_encoder")),
    }
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file(
        edit.tensors, str(old), metadata={"format": EDIT_FORMAT, "format_version": "2", **{k: json.dumps(v) for k, v in metadata.items()}}
    )
    assert load_edit(old).metadata.key == ""
    assert_applied(api.load_edited(models["base"], old), fewshot_edit)
    assert refusal(models["unet"], old).endswith(": its unet differs from this model's")
    assert refusal(models["text_encoder"], old).endswith(": its text_encoder differs from this model's")


def test_a_key_stays_bound_to_its_edit(models, uce_edit, tmp_path):
    """KPOP's key works with the edit written together with it, on every model that edit applies
    to (here one with another text encoder), and with no other edit of the same weights."""
    edit = load_edit(uce_edit)
    edit.metadata.key = "0123456789abcdef"
    path, key = tmp_path / "kpop.safetensors", tmp_path / "kpop.key.safetensors"
    prompt = torch.randn(1, load_pipeline(models["base"]).unet.config.cross_attention_dim)
    save_edit(path, edit, (key, {"prompt": prompt}, {"method": "kpop", "prompt_mode": "concat", "inject": "all", "concepts": ["circle"]}))
    assert set(load_edit(path).metadata.base_fingerprints) == {"unet"}
    grid = api.generate(["a circle"], model=models["text_encoder"], edit=path, key=key, n=1, out=tmp_path / "g.png", sampling=SamplingConfig(steps=1))
    assert grid.exists()
    edit.metadata.key = "fedcba9876543210"
    save_edit(tmp_path / "remade.safetensors", edit)
    with pytest.raises(UserError, match="belongs to another edit"):
        api.generate(["a circle"], model=models["base"], edit=tmp_path / "remade.safetensors", key=key, n=1, out=tmp_path / "h.png")


def test_mace_edit_and_loras_bind_to_the_unet(models, images, tmp_path):
    """A LoRA binds, as an edit does, to the components its factors change."""
    summary = api.erase(
        "mace", ["circle"], model=models["base"], out=tmp_path / "mace.safetensors", images=str(images), image_count=1, steps=1, batch_size=1, save_loras=True
    )
    assert set(load_edit(summary.edit).metadata.base_fingerprints) == {"unet"}
    (lora,) = summary.loras
    _, metadata = load_lora(lora)
    assert set(metadata["base_fingerprints"]) == set(changed_components(safetensors.torch.load_file(str(lora)))) == {"unet"}
    assert metadata["base_fingerprints"]["unet"] == fingerprints(load_pipeline(models["base"]), ("unet",))["unet"]
