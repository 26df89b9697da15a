"""Every method on every model family (tiny random SD1.x, SD2.x with v-prediction, SDXL base):
what differs between families lives in `fasterase.models.family`, and nothing else is loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fasterase import api
from fasterase.cli import main
from fasterase.edits import load_edit
from fasterase.errors import UserError
from fasterase.config import SamplingConfig
from fasterase.names import PARAMETER_SETS
from fasterase.models.family import FAMILIES, encode, family_of, folder_family, noise_scheduler, training_target
from fasterase.models.fingerprint import portable_name
from fasterase.models.loading import load_pipeline

# the smallest run of each method; every option is one the method has
TINY = {
    "kpop": {"steps": 2, "trajectories": 1, "sample_steps": 2, "batch_size": 1, "prompt_length": 1},
    "esd": {"steps": 2, "trajectories": 1, "sample_steps": 2, "batch_size": 1},
    "ca": {"steps": 2, "trajectories": 1, "sample_steps": 2, "batch_size": 1},
    "fmn": {"steps": 2, "image_count": 1, "sample_steps": 2, "batch_size": 1, "inversion_steps": 1},
    "mace": {"steps": 2, "image_count": 1, "sample_steps": 2, "batch_size": 1},
    "fewshot": {"steps": 2, "image_count": 1, "sample_steps": 2, "batch_size": 1},
    "uce": {},
}
# which tensors each method's defaults may change, by component and name
TRAINABLE = {
    "kpop": lambda component, name: component == "unet" and PARAMETER_SETS["cross_attention"](name),
    "esd": lambda component, name: component == "unet" and PARAMETER_SETS["cross_attention"](name),
    "ca": lambda component, name: component == "unet" and PARAMETER_SETS["cross_attention_kv"](name),
    "fmn": lambda component, name: component == "unet" and PARAMETER_SETS["cross_attention_kv"](name),
    "mace": lambda component, name: component == "unet" and PARAMETER_SETS["cross_attention_kv"](name) and name.endswith(".weight"),
    "uce": lambda component, name: component == "unet" and PARAMETER_SETS["cross_attention_kv"](name) and name.endswith(".weight"),
    "fewshot": lambda component, name: component.startswith("text_encoder") and (".mlp." in name or ".self_attn." in name),
}


def state(pipe) -> dict[str, torch.Tensor]:
    """Every tensor a method may change, as "<component>.<portable name>"."""
    return {
        f"{component}.{portable_name(component, name)}": tensor.clone()
        for component in family_of(pipe).components()
        for name, tensor in getattr(pipe, component).state_dict().items()
    }


@pytest.mark.parametrize("method", list(TINY))
def test_every_method_erases_on_every_family(family_pipeline_dir, method, tmp_path):
    """Each method changes only its trainable set, writes an edit that `load_edited` applies to a
    pipeline of the model's own class, and `generate` draws with it."""
    out = tmp_path / "edit.safetensors"
    summary = api.erase(method, ["circle", "square"], model=family_pipeline_dir, out=out, preserve=["star"], **TINY[method])
    base = load_pipeline(family_pipeline_dir)
    edited = api.load_edited(family_pipeline_dir, summary.edit)
    assert type(edited) is type(base)
    before, after = state(base), state(edited)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed == set(load_edit(summary.edit).tensors), "the edit holds exactly the tensors it changes"
    assert all(TRAINABLE[method](*name.split(".", 1)) for name in changed), sorted(changed)[:3]
    if family_of(base) is FAMILIES["sdxl"] and method == "fewshot":
        assert {name.split(".")[0] for name in changed} == {"text_encoder", "text_encoder_2"}, "both encoders by default"
    # with KPOP's key too: its prompt lives in the family's text-state space
    grid = api.generate(
        ["a circle"], model=family_pipeline_dir, edit=summary.edit, key=summary.key, n=1, out=tmp_path / "grid.png", sampling=SamplingConfig(steps=2)
    )
    assert grid.is_file()


def test_families_are_told_apart(family_pipeline_dirs):
    for name, (family, pipeline_class) in {"sd1": ("sd1", "StableDiffusionPipeline"), "sd2v": ("sd2", "StableDiffusionPipeline"),
                                           "sdxl": ("sdxl", "StableDiffusionXLPipeline")}.items():
        folder = family_pipeline_dirs(name)
        pipe = load_pipeline(folder)
        assert folder_family(folder) is family_of(pipe) is FAMILIES[family]
        assert type(pipe).__name__ == pipeline_class
    assert load_pipeline(family_pipeline_dirs("sd2v")).scheduler.config.prediction_type == "v_prediction"


def test_sdxl_conditioning(family_pipeline_dirs):
    """SDXL's UNet reads both encoders' penultimate states side by side, the second's pooled
    embedding and the time ids; guidance's unconditional branch reads zeros."""
    from fasterase.models.family import unconditional

    pipe = load_pipeline(family_pipeline_dirs("sdxl"))
    cond = encode(pipe, ["a circle", "a red square"])
    assert cond.states.shape == (2, 77, pipe.unet.config.cross_attention_dim)
    reference, _, pooled, _ = pipe.encode_prompt(["a circle", "a red square"], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.states, reference)
    torch.testing.assert_close(cond.added["text_embeds"], pooled)
    side = pipe.default_sample_size * pipe.vae_scale_factor
    assert cond.added["time_ids"].tolist() == [[side, side, 0, 0, side, side]] * 2
    empty = unconditional(pipe)
    assert not empty.states.any() and not empty.added["text_embeds"].any()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_training_target_follows_the_prediction_type(tiny_pipeline_dir, prediction):
    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.scheduler.register_to_config(prediction_type=prediction)
    scheduler = noise_scheduler(pipe)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    expected = {"epsilon": noise, "v_prediction": scheduler.get_velocity(latents, noise, t), "sample": latents}[prediction]
    assert torch.equal(training_target(scheduler, latents, noise, t), expected)


@pytest.mark.parametrize("method, options, module", [("fmn", {"inversion_steps": 1}, "fasterase.inversion"), ("fewshot", {}, "fasterase.methods.fewshot")])
def test_data_targets_are_velocities_on_a_v_prediction_model(family_pipeline_dirs, method, options, module, monkeypatch, tmp_path):
    """FMN's inversion and few-shot unlearning regress on what the scheduler predicts."""
    import importlib

    module = importlib.import_module(module)
    targets = []

    def recorded(scheduler, latents, noise, timesteps):
        target = training_target(scheduler, latents, noise, timesteps)
        assert torch.equal(target, scheduler.get_velocity(latents, noise, timesteps))
        targets.append(target)
        return target

    monkeypatch.setattr(module, "training_target", recorded)
    api.erase(method, ["circle"], model=family_pipeline_dirs("sd2v"), out=tmp_path / "e.safetensors", **{**TINY[method], **options})
    assert targets


def unsupported_folder(tmp_path, source, edit_index=None, edit_unet=None):
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    for name, change in (("model_index.json", edit_index), ("unet/config.json", edit_unet)):
        if change:
            config = json.loads((folder / name).read_text())
            change(config)
            (folder / name).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind, edit_index, edit_unet, words", [
    ("refiner", lambda c: c.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None]), None, "SDXL refiner"),
    ("sd3", lambda c: c.update(_class_name="StableDiffusion3Pipeline"), None, "StableDiffusion3Pipeline"),
    ("flux", lambda c: c.update(_class_name="FluxPipeline"), None, "FluxPipeline"),
    ("inpainting", None, lambda c: c.update(in_channels=9), "9 input channels"),
])
def test_unsupported_models_get_one_line(family_pipeline_dirs, tmp_path, capsys, kind, edit_index, edit_unet, words):
    folder = unsupported_folder(tmp_path, family_pipeline_dirs("sdxl"), edit_index, edit_unet)
    with pytest.raises(UserError, match=words):
        load_pipeline(folder)
    out = tmp_path / "edit.safetensors"
    assert main(["erase", "--method", "uce", "--concept", "circle", "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SD1.x, SD2.x and SDXL base" in err and words in err
    assert not out.exists()


def test_half_precision_flag_on_a_cpu(tmp_path):
    """--fp16 still erases on a CPU (in float32, and says so); the edit is in the base model's
    stored dtype (the built-in world ships float16), or the one asked for."""
    notes = []
    options = {**TINY["uce"], "dtype": "float16"}
    summary = api.erase("uce", ["circle"], out=tmp_path / "half.safetensors", notify=notes.append, **options)
    assert any("float32" in note for note in notes)
    assert {t.dtype for t in load_edit(summary.edit).tensors.values()} == {torch.float16}
    summary = api.erase("uce", ["circle"], out=tmp_path / "full.safetensors", edit_dtype="float32", **TINY["uce"])
    assert {t.dtype for t in load_edit(summary.edit).tensors.values()} == {torch.float32}


def test_a_non_finite_loss_stops_the_run_and_writes_nothing(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "edit.safetensors"
    options = {**TINY["esd"], "steps": 4, "log_every": 1, "lr": 1e30}
    with pytest.raises(UserError, match=r"stopped at step \d of 4: the loss is not finite") as err:
        api.erase("esd", ["circle"], model=tiny_pipeline_dir, out=out, **options)
    assert "\n" not in str(err.value) and "--bf16" in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", list(TINY))
def test_half_precision_trains_float32_masters(family_pipeline_dirs, method, monkeypatch):
    """What --bf16 does on a GPU, run on the CPU (autocast works there too): the frozen weights
    stay bfloat16, the trained tensors and their optimizer state are float32 while training, and
    the model is in its own dtype again afterwards."""
    from fasterase.config import make_config
    from fasterase.methods import CONFIGS, get_method
    from fasterase.methods.training import Optimization

    step = Optimization.step
    dtypes = set()

    def recorded(self, loss):
        step(self, loss)
        dtypes.update(p.dtype for p in self.params)
        dtypes.update(v.dtype for state in self.optimizer.state.values() for v in state.values() if v.is_floating_point() and v.dim())

    monkeypatch.setattr(Optimization, "step", recorded)
    pipe = load_pipeline(family_pipeline_dirs("sdxl"), dtype="bfloat16")
    method_class = get_method(method)
    cfg = make_config(CONFIGS[method], {"concepts": ["circle", "square"], "dtype": "bfloat16", **TINY[method]})
    result = method_class().erase(pipe, cfg)
    assert dtypes <= {torch.float32} and (dtypes or method == "uce")
    assert all(torch.isfinite(t).all() for t in result.tensors.values())
    assert {p.dtype for name in family_of(pipe).components() for p in getattr(pipe, name).parameters()} == {torch.bfloat16}


def test_sampling_is_chunked_by_sample_batch(tiny_pipeline_dir, monkeypatch, tmp_path):
    """Images and trajectories are drawn `sample_batch` prompts at a time, however many concepts
    and images there are, so the peak of drawing does not grow with them."""
    import diffusers

    from fasterase.methods import trajectories

    drawn, sampled = [], []
    draw = diffusers.StableDiffusionPipeline.__call__
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "__call__", lambda self, prompt, **kw: drawn.append(len(prompt)) or draw(self, prompt, **kw))
    step = trajectories.denoise
    monkeypatch.setattr(trajectories, "denoise", lambda unet, x, *args: sampled.append(len(x)) or step(unet, x, *args))
    concepts = ["circle", "square", "star"]
    api.erase("fmn", concepts, model=tiny_pipeline_dir, out=tmp_path / "f.safetensors", sample_batch=2, **{**TINY["fmn"], "image_count": 3})
    assert sorted(drawn) == [1] + [2] * 4
    api.erase("esd", concepts, model=tiny_pipeline_dir, out=tmp_path / "e.safetensors", sample_batch=2, **{**TINY["esd"], "trajectories": 3})
    assert sampled and max(sampled) == 2 * 2, "a chunk of 2 prompts, doubled for guidance"
