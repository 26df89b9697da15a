"""Loading pipelines (and refusing what cannot be loaded safely), and the text-side helpers."""

import pytest
import torch

from fasterase.errors import UserError
from fasterase.models.loading import BUILTIN_SAMPLE_STEPS, SAMPLE_STEPS, default_sample_steps, load_pipeline
from fasterase.models.text import check_concept, encode_prompts


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir)


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def test_loads_a_frozen_float32_pipeline(pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    cross = [name for name in pipe.unet.attn_processors if ".attn2." in name]
    for block in ("down_blocks.", "mid_block.", "up_blocks."):
        assert any(name.startswith(block) for name in cross), block
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        assert not any(p.requires_grad for p in module.parameters())
        assert all(p.dtype == torch.float32 for p in module.parameters())
        assert not module.training
    assert pipe.safety_checker is None


def test_the_built_in_world_draws_in_fewer_steps_by_default(pipe):
    assert default_sample_steps(load_pipeline()) == BUILTIN_SAMPLE_STEPS == 10
    assert default_sample_steps(pipe) == SAMPLE_STEPS == 25  # the built-in world's architecture, another model
    from fasterase.toyworld.recipe import assemble_pipeline

    assert default_sample_steps(assemble_pipeline(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae)) == SAMPLE_STEPS  # from no folder


@pytest.mark.parametrize("dtype", [torch.float16, "float16"])
def test_loads_in_float16(tiny_pipeline_dir, dtype):
    pipe = load_pipeline(tiny_pipeline_dir, dtype=dtype)
    assert pipe.unet.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in pipe.unet.parameters())
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        load_pipeline(tmp_path / "no" / "such" / "model")
    assert_one_line(err)
    with pytest.raises(UserError, match="does not exist"):
        load_pipeline("./not-here")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="model_index.json") as err:
        load_pipeline(tmp_path)
    assert_one_line(err)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickled_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(UserError) as err:
        load_pipeline(path)
    message = assert_one_line(err)
    assert "pickled" in message and "refused" in message


def test_garbage_safetensors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00garbage\nwith a newline\n" * 10)
    with pytest.raises(UserError) as err:
        load_pipeline(path)
    assert str(path) in assert_one_line(err)


def test_hub_id_offline_points_at_model_option(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when imported; the test must not reach the network either way.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        load_pipeline("someorg/somemodel")
    message = assert_one_line(err)
    assert "--model" in message
    assert "someorg/somemodel" in message


@pytest.mark.parametrize("concept", ["", "   ", "\t\n"])
def test_empty_concept(pipe, concept):
    with pytest.raises(UserError) as err:
        check_concept(pipe.tokenizer, concept)
    assert_one_line(err)


def test_concept_with_unknown_characters(pipe):
    with pytest.raises(UserError) as err:
        check_concept(pipe.tokenizer, "日本")
    assert_one_line(err)


def test_concept_too_long(pipe):
    with pytest.raises(UserError) as err:
        check_concept(pipe.tokenizer, " ".join(["circle"] * 80))
    assert_one_line(err)


@pytest.mark.parametrize("concept", ["circle", "red circle", "a photo of a ring", "van gogh"])
def test_representable_concepts_pass(pipe, concept):
    check_concept(pipe.tokenizer, concept)


def test_encode_prompts(pipe):
    prompts = ["a photo of a circle", "", "a red square on a striped background"]
    states = encode_prompts(pipe, prompts)
    hidden = pipe.text_encoder.config.hidden_size
    assert states.shape == (3, 77, hidden)
    assert states.dtype == torch.float32
    assert not states.requires_grad
    # Batching does not change the result.
    chunked = encode_prompts(pipe, prompts, batch_size=2)
    torch.testing.assert_close(chunked, states, rtol=1e-5, atol=1e-5)
    one = encode_prompts(pipe, prompts[:1])
    torch.testing.assert_close(one[0], states[0], rtol=1e-5, atol=1e-5)
