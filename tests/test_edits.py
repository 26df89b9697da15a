"""The edit and key file formats, applying an edit, and the base-model fingerprints."""

import os
import types

import pytest
import safetensors.torch
import torch
from torch import nn

from fasterase.edits import (
    Edit,
    EditMetadata,
    apply_edit,
    bound_components,
    changed_components,
    check_edit,
    edit_from_modules,
    load_edit,
    load_key,
    save_edit,
    save_key,
)
from fasterase.errors import UserError
from fasterase.models.fingerprint import difference, fingerprints


def sd_pipe(unet: nn.Module, text_encoder: nn.Module) -> types.SimpleNamespace:
    """Stand-ins for an SD1.x pipeline's UNet, text encoder (with the config the family is told by) and VAE."""
    text_encoder.config = types.SimpleNamespace(hidden_act="quick_gelu")
    return types.SimpleNamespace(unet=unet, text_encoder=text_encoder, vae=nn.Linear(2, 1))


def tiny_pipe():
    torch.manual_seed(0)
    return sd_pipe(nn.Linear(3, 2), nn.Linear(2, 2))


def metadata_for(pipe, components=("unet", "text_encoder")) -> EditMetadata:
    """Metadata binding an edit to `components` of `pipe`; by default to the UNet and the text
    encoder, as every edit was bound before edits came to bind to what they change alone."""
    return EditMetadata(
        method="uce",
        concepts=["square", "van gogh"],
        config={"steps": 3, "preserve": ["circle"], "lr": 1e-5},
        base_fingerprints=fingerprints(pipe, components),
        base_model="tiny",
    )


def test_edit_round_trip(tmp_path):
    pipe = tiny_pipe()
    edit = Edit(
        tensors={"unet.weight": torch.randn(2, 3, dtype=torch.float16), "text_encoder.bias": torch.randn(2)},
        metadata=metadata_for(pipe),
    )
    path = tmp_path / "edit.safetensors"
    save_edit(path, edit)
    loaded = load_edit(path)
    assert loaded.metadata == edit.metadata
    assert loaded.tensors.keys() == edit.tensors.keys()
    for key, tensor in edit.tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[key], tensor)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise RuntimeError("interrupted")

    path = tmp_path / "edit.safetensors"
    path.write_bytes(b"previous edit")
    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_edit(path, Edit({"unet.weight": torch.zeros(2, 3)}, metadata_for(tiny_pipe())))
    assert os.listdir(tmp_path) == ["edit.safetensors"]
    assert path.read_bytes() == b"previous edit"


def test_written_file_has_the_permissions_of_a_new_file(tmp_path):
    reference = tmp_path / "reference"
    reference.touch()
    path = tmp_path / "edit.safetensors"
    save_edit(path, Edit({"unet.weight": torch.zeros(2, 3)}, metadata_for(tiny_pipe())))
    assert path.stat().st_mode == reference.stat().st_mode


@pytest.mark.parametrize("where", ["missing directory", "parent is a file"])
def test_unusable_directory_is_a_user_error(tmp_path, where):
    (tmp_path / "file").touch()
    parent = tmp_path / ("missing" if where == "missing directory" else "file")
    with pytest.raises(UserError, match="^cannot write .*edit.safetensors: "):
        save_edit(parent / "edit.safetensors", Edit({}, metadata_for(tiny_pipe())))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_a_user_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match="^cannot write .*: Permission denied$"):
            save_edit(tmp_path / "edit.safetensors", Edit({}, metadata_for(tiny_pipe())))
    finally:
        tmp_path.chmod(0o700)


def test_unreadable_files_are_user_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    key = tmp_path / "key.safetensors"
    save_key(key, {"prompt": torch.zeros(2, 4)}, {"concepts": ["square"]})

    for path, message in [
        (tmp_path / "missing.safetensors", "^cannot read .*missing.safetensors: no such file$"),
        (tmp_path, "^cannot read .*: no such file$"),
        (garbage, "is not a safetensors file"),
        (plain, r"is not a fasterase-edit file \(format tag: none\)$"),
        (key, r"is not a fasterase-edit file \(format tag: fasterase-key\)$"),
    ]:
        with pytest.raises(UserError, match=message) as raised:
            load_edit(path)
        assert "\n" not in str(raised.value)


def test_apply_edit_refuses_another_base_model():
    pipe = tiny_pipe()
    edit = Edit({"unet.weight": torch.zeros(2, 3)}, metadata_for(pipe))
    before = pipe.unet.weight.detach().clone()
    other = tiny_pipe()
    with torch.no_grad():
        other.unet.weight.mul_(1.5)
    with pytest.raises(UserError, match="^this edit was made for base model 'tiny': its unet differs from this model's$") as raised:
        apply_edit(pipe, edit, fingerprints(other))
    assert "\n" not in str(raised.value)
    assert torch.equal(pipe.unet.weight, before)


def test_an_edit_binds_to_the_unet_and_text_encoders_only():
    """Fingerprints of a component no edit of the model binds to (a VAE, an SDXL encoder this model
    lacks) in an edit's metadata are refused: nothing vouches for what the edit would need there."""
    pipe = tiny_pipe()
    edit = Edit({"unet.weight": torch.zeros(2, 3)}, metadata_for(pipe))
    edit.metadata.base_fingerprints["vae"] = fingerprints(pipe)["vae"]
    with pytest.raises(UserError, match="^this edit was made for base model 'tiny' and binds to its vae; edits of this model bind to its unet and text_encoder$"):
        apply_edit(pipe, edit, fingerprints(pipe))


def test_apply_edit_copies_into_the_right_parameters():
    pipe = tiny_pipe()
    pipe.text_encoder.half()
    base = fingerprints(pipe)
    new_weight = torch.randn(2, 3, dtype=torch.float64)
    new_bias = torch.randn(2)
    edit = Edit({"unet.weight": new_weight, "text_encoder.bias": new_bias}, metadata_for(pipe))
    apply_edit(pipe, edit, base)
    assert pipe.unet.weight.dtype == torch.float32
    assert torch.equal(pipe.unet.weight, new_weight.float())
    assert pipe.text_encoder.bias.dtype == torch.float16
    assert torch.equal(pipe.text_encoder.bias, new_bias.half())


def test_changed_components_are_those_of_an_edits_tensors_or_a_loras_factors():
    names = ["unet.down.attn2.to_k.weight", "text_encoder_2.encoder.layers.0.mlp.fc1.bias", "unet.mid.attn2.to_v.lora_A.weight"]
    assert changed_components(names) == ("text_encoder_2", "unet")
    assert changed_components([]) == ()


def test_an_edit_binds_to_the_components_it_carries_fingerprints_of():
    """An edit of the text encoder bound to it alone applies whatever the UNet; one bound to both
    (as edits were before) refuses another UNet though it changes only the text encoder. The base
    model's fingerprints need cover only what an edit binds to, and must cover all of it."""
    pipe = tiny_pipe()
    other_unet = tiny_pipe()
    with torch.no_grad():
        other_unet.unet.weight.mul_(1.5)
    tensors = {"text_encoder.bias": torch.zeros(2)}
    alone, both = Edit(tensors, metadata_for(pipe, ("text_encoder",))), Edit(tensors, metadata_for(pipe))
    with pytest.raises(UserError, match="its unet differs from this model's$"):
        check_edit(other_unet, both, fingerprints(other_unet, bound_components(other_unet, both)))
    assert bound_components(other_unet, alone) == ("text_encoder",)
    apply_edit(other_unet, alone, fingerprints(other_unet, ("text_encoder",)))
    assert torch.equal(other_unet.text_encoder.bias, torch.zeros(2))
    with pytest.raises(ValueError, match="no fingerprint of this model's unet was taken"):
        check_edit(pipe, both, fingerprints(pipe, ("text_encoder",)))
    assert fingerprints(pipe, ()) == {}


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"unet.no_such_weight": torch.zeros(2)}, "'unet.no_such_weight', which this model does not have"),
        ({"unet.bias": torch.zeros(2, 3)}, r"'unet.bias' has shape \(2, 3\), the model's \(2,\)"),
        # the VAE has a weight of that shape, but no fingerprint binds it to a base model
        ({"vae.weight": torch.zeros(1, 2)}, "^this edit changes 'vae.weight': edits change only the unet and text_encoder, on the base they were made for$"),
        # an editable component, but the edit's fingerprints do not bind it
        ({"text_encoder.bias": torch.zeros(2)}, "^this edit changes 'text_encoder.bias' but carries no fingerprint of the text_encoder it was made for$"),
    ],
)
def test_apply_edit_refuses_unknown_or_misshapen_tensors_and_changes_nothing(tensors, message):
    pipe = tiny_pipe()
    before = pipe.unet.weight.detach().clone()
    edit = Edit({"unet.weight": torch.zeros(2, 3), **tensors}, metadata_for(pipe, ("unet",)))
    with pytest.raises(UserError, match=message):
        apply_edit(pipe, edit, fingerprints(pipe))
    assert torch.equal(pipe.unet.weight, before)


def test_edit_from_modules_copies_named_tensors_to_cpu():
    pipe = tiny_pipe()
    edit = edit_from_modules(
        {"unet": pipe.unet, "text_encoder": pipe.text_encoder},
        {"unet": ["weight"], "text_encoder": ["bias"]},
        metadata_for(pipe),
    )
    assert edit.tensors.keys() == {"unet.weight", "text_encoder.bias"}
    assert torch.equal(edit.tensors["unet.weight"], pipe.unet.weight)
    assert not edit.tensors["unet.weight"].requires_grad
    with torch.no_grad():
        pipe.unet.weight.add_(1)
    assert not torch.equal(edit.tensors["unet.weight"], pipe.unet.weight)


def test_fingerprints_agree_on_every_load_dtype_they_share():
    """float32 loads fingerprint both canonical dtypes, half-precision loads their own: an edit made
    on one load applies to every other load of its base except float16 against bfloat16."""
    torch.manual_seed(0)
    # large enough that double rounding (float16, then bfloat16) changes some elements
    pipe = sd_pipe(nn.Linear(64, 64), nn.Linear(32, 16))
    loads = {torch.float32: fingerprints(pipe)}
    assert set(loads[torch.float32]["unet"]) == {"float16", "bfloat16"}
    for dtype in (torch.float16, torch.bfloat16):
        cast = sd_pipe(nn.Linear(64, 64).to(dtype), nn.Linear(32, 16).to(dtype))
        cast.unet.load_state_dict(pipe.unet.state_dict())
        cast.text_encoder.load_state_dict(pipe.text_encoder.state_dict())
        cast.vae = pipe.vae
        loads[dtype] = fingerprints(cast)
        assert set(loads[dtype]["unet"]) == {str(dtype).removeprefix("torch.")}
    for made_on, recorded in loads.items():
        for applied_on, actual in loads.items():
            if {made_on, applied_on} == {torch.float16, torch.bfloat16}:
                assert difference(recorded, actual).endswith(": load it in float32 to compare")
            else:
                assert difference(recorded, actual) is None


def test_edits_and_fingerprints_carry_across_transformers_versions():
    """transformers 4 names the CLIP text encoder's tensors "text_model.<name>", transformers 5
    "<name>": the same base model must keep its fingerprint, and an edit made under one version
    must apply under the other."""
    plain = tiny_pipe()
    prefixed = sd_pipe(plain.unet, nn.Module())
    prefixed.vae = plain.vae
    prefixed.text_encoder.text_model = plain.text_encoder  # state_dict names text_model.weight, ...
    assert fingerprints(prefixed) == fingerprints(plain)
    for value, (made_on, applied_on) in enumerate(((plain, prefixed), (prefixed, plain))):
        names = list(made_on.text_encoder.state_dict())
        edit = edit_from_modules({"text_encoder": made_on.text_encoder}, {"text_encoder": names}, metadata_for(plain))
        assert edit.tensors.keys() == {"text_encoder.weight", "text_encoder.bias"}
        edit.tensors["text_encoder.bias"] = torch.full((2,), float(value))
        apply_edit(applied_on, edit, fingerprints(applied_on))
        assert torch.equal(plain.text_encoder.bias, torch.full((2,), float(value)))  # the one module both name


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae"])
def test_fingerprints_see_every_element(component):
    """Any element changed by one float16 step, in float32 and in float16 weights, changes its
    component's fingerprint and no other."""
    for dtype in (torch.float32, torch.float16):
        pipe = tiny_pipe()
        pipe.unet, pipe.text_encoder, pipe.vae = pipe.unet.to(dtype), pipe.text_encoder.to(dtype), pipe.vae.to(dtype)
        reference = fingerprints(pipe)
        for name, tensor in getattr(pipe, component).state_dict(keep_vars=True).items():
            for index in range(tensor.numel()):
                flat = tensor.data.view(-1)
                before = flat[index].clone()
                flat[index] = torch.nextafter(before.half(), torch.tensor(float("inf"), dtype=torch.float16)).to(dtype)
                changed = fingerprints(pipe)
                flat[index] = before
                assert {c for c in reference if changed[c]["float16"] != reference[c]["float16"]} == {component}, (name, index)
        assert fingerprints(pipe) == reference


def test_builtin_model_with_a_scaled_attention_weight_refuses_its_edits():
    """The issue's example: a copy of the base model with one attention weight scaled by 1.5
    refuses an edit of another weight of its UNet; a copy with another VAE or text encoder, which
    the edit leaves alone, takes it."""
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(None)
    base = fingerprints(pipe)
    attention = lambda model: model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2  # noqa: E731
    edit = Edit({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight": torch.zeros_like(attention(pipe).to_v.weight)}, metadata_for(pipe, ("unet",)))
    check_edit(pipe, edit, base)
    copy = load_pipeline(None)
    with torch.no_grad():
        attention(copy).to_k.weight.mul_(1.5)
    with pytest.raises(UserError, match="its unet differs from this model's"):
        check_edit(copy, edit, fingerprints(copy))
    with torch.no_grad():
        attention(copy).to_k.weight.copy_(attention(pipe).to_k.weight)
        next(copy.vae.parameters()).mul_(1.5)
        next(copy.text_encoder.parameters()).mul_(1.5)
    check_edit(copy, edit, fingerprints(copy))


def test_key_round_trip(tmp_path):
    tensors = {"prompt": torch.randn(4, 8, dtype=torch.bfloat16)}
    metadata = {"method": "kpop", "concepts": ["square"], "config": {"tokens": 4}}
    path = tmp_path / "key.safetensors"
    save_key(path, tensors, metadata)
    loaded_tensors, loaded_metadata = load_key(path)
    assert loaded_metadata == metadata
    assert torch.equal(loaded_tensors["prompt"], tensors["prompt"])
    assert loaded_tensors["prompt"].dtype == torch.bfloat16

    edit_path = tmp_path / "edit.safetensors"
    save_edit(edit_path, Edit({"unet.weight": torch.zeros(2, 3)}, metadata_for(tiny_pipe())))
    with pytest.raises(UserError, match=r"is not a fasterase-key file \(format tag: fasterase-edit\)$"):
        load_key(edit_path)
