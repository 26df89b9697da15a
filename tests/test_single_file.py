"""Single-file .safetensors checkpoints (the original SD / SDXL format) loaded offline with the
configs of a local diffusers folder, and refused in one line when they cannot be."""

import json
import shutil
import socket

import pytest
import safetensors.torch
import torch
from single_file_checkpoints import write_single_file

from fasterase.errors import UserError
from fasterase.models.family import FAMILIES
from fasterase.models.loading import load_pipeline
from fasterase.models.single_file import checkpoint_family, load_single_file

pytest.importorskip("diffusers")

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
XL_CLIP = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
XL_OPEN_CLIP = "conditioner.embedders.1.model.positional_embedding"
REFINER_OPEN_CLIP = "conditioner.embedders.0.model.positional_embedding"
SUPPORTED = "SD1.x, SD2.x and SDXL base"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: the hub is offline and sockets refuse to connect."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def handmade(tmp_path, names: dict[str, tuple[int, ...]], name: str = "model.safetensors"):
    """A file with just the characteristic tensors (tiny zeros) of a kind of checkpoint."""
    path = tmp_path / name
    safetensors.torch.save_file({key: torch.zeros(shape) for key, shape in names.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd1_file(tiny_pipeline_dir, tmp_path_factory):
    return write_single_file(tiny_pipeline_dir, tmp_path_factory.mktemp("single") / "sd1.safetensors")


def assert_same_pipeline(loaded, folder, pipeline_class, components, dtype=torch.float32):
    reference = pipeline_class.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    for name in components:
        got, want = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[key], want[key]) for key in want), name
    # The tokenizers and the scheduler are the folder's too (the world's tokenizer is not CLIP's).
    for name in ("tokenizer", "tokenizer_2"):
        if hasattr(reference, name):
            assert getattr(loaded, name).get_vocab() == getattr(reference, name).get_vocab()
    assert type(loaded.scheduler) is type(reference.scheduler)
    assert dict(loaded.scheduler.config) == dict(reference.scheduler.config)


def test_sd1_single_file_loads_offline_with_the_folders_configs(sd1_file, tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    # what diffusers would take the file for without a config folder
    assert infer_diffusers_model_type(safetensors.torch.load_file(str(sd1_file))) == "v1"
    assert checkpoint_family(sd1_file) is FAMILIES["sd1"]
    # The folder's configs and tokenizer suffice: every weight comes from the file.
    configs = tmp_path / "configs"
    shutil.copytree(tiny_pipeline_dir, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    pipe = load_pipeline(sd1_file, model_config=configs)
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert_same_pipeline(pipe, tiny_pipeline_dir, StableDiffusionPipeline, ("unet", "text_encoder", "vae"))


@pytest.mark.parametrize("name, family", [("sd2v", "sd2"), ("sdxl", "sdxl")])
def test_sd2_and_sdxl_single_files_load_offline(family_pipeline_dirs, tmp_path, name, family):
    import diffusers

    folder = family_pipeline_dirs(name)
    path = write_single_file(folder, tmp_path / f"{family}.safetensors", family=family)
    assert checkpoint_family(path) is FAMILIES[family]
    pipe = load_pipeline(path, model_config=folder)
    pipeline_class = getattr(diffusers, FAMILIES[family].pipeline_class)
    assert_same_pipeline(pipe, folder, pipeline_class, FAMILIES[family].components() + ("vae",))


def test_without_config_dir_offline_asks_for_model_config(sd1_file):
    with pytest.raises(UserError) as err:
        load_pipeline(sd1_file)
    message = one_line(err)
    assert "--model-config DIR" in message and "SD1.x/SD2.x/SDXL" in message and str(sd1_file) in message


def test_without_config_dir_a_failed_connection_asks_for_model_config(sd1_file, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub.utils import LocalEntryNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    class Unreachable:
        @classmethod
        def from_single_file(cls, path, **kwargs):
            assert "config" not in kwargs
            try:
                raise ConnectionError("Name or service not known")
            except ConnectionError as exc:
                raise LocalEntryNotFoundError("cannot find the requested files in the local cache\nmore") from exc

    with pytest.raises(UserError) as err:
        load_single_file(sd1_file, FAMILIES["sd1"], None, Unreachable)
    assert "--model-config DIR" in one_line(err)

    class Broken:
        @classmethod
        def from_single_file(cls, path, **kwargs):
            raise ValueError("something else\nwith details")

    with pytest.raises(UserError, match="something else") as err:
        load_single_file(sd1_file, FAMILIES["sd1"], None, Broken)
    assert "--model-config" not in one_line(err)


@pytest.mark.parametrize(
    "names, family",
    [
        ({CONV_IN: (1, 4, 1, 1), SD1_TEXT: (2, 3)}, "sd1"),
        ({CONV_IN: (1, 4, 1, 1), SD2_TEXT: (2, 3)}, "sd2"),
        ({CONV_IN: (1, 4, 1, 1), XL_CLIP: (2, 3), XL_OPEN_CLIP: (2, 3)}, "sdxl"),
    ],
)
def test_checkpoint_family(tmp_path, names, family):
    assert checkpoint_family(handmade(tmp_path, names)) is FAMILIES[family]


@pytest.mark.parametrize(
    "names, why",
    [
        ({CONV_IN: (1, 4, 1, 1), REFINER_OPEN_CLIP: (2, 3)}, "SDXL refiner"),
        ({CONV_IN: (1, 9, 1, 1), SD1_TEXT: (2, 3)}, "9 input channels"),
        ({CONV_IN: (1, 8, 1, 1), SD1_TEXT: (2, 3)}, "8 input channels"),
        ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (3,)}, "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (3,)}, "Flux"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": (1,)}, "without a Stable Diffusion UNet"),
        ({CONV_IN: (1, 4, 1, 1)}, "no text encoder"),
    ],
)
def test_checkpoint_family_refuses(tmp_path, names, why):
    path = handmade(tmp_path, names)
    with pytest.raises(UserError, match=why) as err:
        checkpoint_family(path)
    message = one_line(err)
    assert SUPPORTED in message and str(path) in message


def test_unreadable_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00garbage\nwith a newline\n" * 10)
    with pytest.raises(UserError) as err:
        checkpoint_family(path)
    assert str(path) in one_line(err)


def test_config_dir_of_another_family_is_refused(tmp_path, sd1_file, tiny_pipeline_dir, family_pipeline_dirs):
    sd2_file = handmade(tmp_path, {CONV_IN: (1, 4, 1, 1), SD2_TEXT: (2, 3)})
    for path, folder, found in ((sd2_file, tiny_pipeline_dir, "SD1.x"), (sd1_file, family_pipeline_dirs("sdxl"), "SDXL")):
        with pytest.raises(UserError, match="same family") as err:
            load_pipeline(path, model_config=folder)
        message = one_line(err)
        assert str(folder) in message and f"an {found} folder" in message


def test_config_dir_that_is_no_pipeline_folder(tmp_path, sd1_file):
    configs = tmp_path / "configs"
    configs.mkdir()
    with pytest.raises(UserError, match="no model_index.json") as err:
        load_pipeline(sd1_file, model_config=configs)
    one_line(err)
    (configs / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UserError, match="StableDiffusion3Pipeline") as err:
        load_pipeline(sd1_file, model_config=configs)
    assert SUPPORTED in one_line(err)


def test_model_config_needs_a_single_file(tiny_pipeline_dir):
    with pytest.raises(UserError, match="--model-config") as err:
        load_pipeline(tiny_pipeline_dir, model_config=tiny_pipeline_dir)
    one_line(err)


def test_missing_weights_are_refused(tmp_path, sd1_file, tiny_pipeline_dir):
    """diffusers leaves a text-encoder tensor the file lacks empty (on the meta device), silently."""
    state = safetensors.torch.load_file(str(sd1_file))
    path = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({k: v for k, v in state.items() if "final_layer_norm" not in k}, str(path))
    with pytest.raises(UserError, match="lacks 2 of the weights") as err:
        load_pipeline(path, model_config=tiny_pipeline_dir)
    assert "text_encoder.final_layer_norm.weight" in one_line(err)

    bad = handmade(tmp_path, {CONV_IN: (1, 4, 1, 1), SD1_TEXT: (2, 3)}, "wrong_shapes.safetensors")
    with pytest.raises(UserError, match="could not load") as err:
        load_pipeline(bad, model_config=tiny_pipeline_dir)
    one_line(err)
