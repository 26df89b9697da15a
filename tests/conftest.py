"""Shared fixtures: a tiny random Stable Diffusion pipeline folder built with the world's recipe."""

import os

import torch

# Without CUDA, kernel tests run Triton's interpreter on CPU tensors; with CUDA, the compiled kernels
# on CUDA tensors. Triton reads this when it is imported, which importing torch does not do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A StableDiffusionPipeline folder (safetensors) with random weights, the world's tokenizer and
    the built-in model's architecture. Tests that need it skip where diffusers is not installed."""
    pytest.importorskip("diffusers")
    from transformers import CLIPTextModel, CLIPTokenizer

    from fasterase.toyworld.recipe import assemble_pipeline, make_unet, make_vae, text_encoder_config
    from fasterase.toyworld.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("tiny_pipeline")
    save_tokenizer(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer)))
    folder = root / "pipeline"
    assemble_pipeline(make_unet(), text_encoder, tokenizer, make_vae()).save_pretrained(str(folder), safe_serialization=True)
    return folder


# Tiny pipelines of every family, random weights: SD1.x, SD2.x with v-prediction, SDXL base.
FAMILY_PIPELINES = {"sd1": ("sd1", "epsilon"), "sd2v": ("sd2", "v_prediction"), "sdxl": ("sdxl", "epsilon")}


@pytest.fixture(scope="session")
def family_pipeline_dirs(tmp_path_factory):
    """name -> a tiny random pipeline folder of that family (see FAMILY_PIPELINES), built on first use."""
    pytest.importorskip("diffusers")
    from fasterase.models.random_init import save_random_pipeline

    built = {}

    def folder(name: str):
        if name not in built:
            family, prediction = FAMILY_PIPELINES[name]
            built[name] = save_random_pipeline(tmp_path_factory.mktemp(name), family, prediction_type=prediction)
        return built[name]

    return folder


@pytest.fixture(params=list(FAMILY_PIPELINES))
def family_pipeline_dir(request, family_pipeline_dirs):
    """Each family's tiny pipeline folder in turn."""
    return family_pipeline_dirs(request.param)


@pytest.fixture(scope="session")
def world_sampling():
    """How the tests that draw hundreds of images of the built-in world (erasures' evaluations,
    the world's report, the images MACE draws of fifty emblems) draw them: the built-in world's
    default of 10 DDIM steps, named here because the tests' bars were measured at it. 10 steps draw
    as well as 25 in 40% of the time (benchmarks/results/sampling-steps-cpu-2026-12-07.json): the
    base model drew 16 of 16 of each shape in both, and its emblems (4 each) 85% and 93% (first and
    last fifty) in 25, 84.5% and 93.5% in 10; KPOP's circle edit scored ESR-1 1.0 and PSR-1 0.990,
    and its key brought back 14 of 16 circles, in both."""
    from fasterase.config import SamplingConfig
    from fasterase.models.loading import BUILTIN_SAMPLE_STEPS

    return SamplingConfig(steps=BUILTIN_SAMPLE_STEPS)


@pytest.fixture(scope="session")
def kpop_circle(tmp_path_factory):
    """KPOP's default erasure of the circle from the built-in model (its summary: edit and key),
    made once for the tests of KPOP and of the attacks."""
    from fasterase import api

    return api.erase("kpop", ["circle"], out=tmp_path_factory.mktemp("kpop") / "circle.safetensors")


@pytest.fixture
def assert_erased():
    """The bar every method meets on the built-in world (issue: ESR-1 >= 80%, PSR-1 >= 80% of the
    original's), and that fails if the method does nothing: the base model must draw the concept."""

    def check(report: dict, esr1: float = 0.80, psr1: float = 0.80) -> None:
        assert report["original"]["esr1"] <= 0.15, "the base model must draw the concept for the test to mean anything"
        assert report["esr1"] >= esr1, report
        assert report["psr1"] >= psr1 * report["original"]["psr1"], report

    return check
