"""Masks of a concept from the frozen model's cross-attention: on the built-in world they overlap the
exact masks of its procedural images far better than a mask of the whole image does."""

import pytest
import torch

from fasterase.attention_masks import attention_masks
from fasterase.concept_images import concept_images
from fasterase.models.loading import load_pipeline
from fasterase.toyworld.folders import write_concept_folder

SHAPES = ["circle", "triangle", "star"]
TEMPLATES = ["{}", "a photo of a {}", "a picture of a {}", "an image of a {}"]  # MACE's default
PROMPTS = [t.format(s) for s in SHAPES for t in TEMPLATES]
# Measured on these 6 images: attention masks 0.66 (circle 0.82, triangle 0.73, star 0.55), a mask
# of all ones 0.22; the bar sits between them with margin on both sides.
IOU_BAR = 0.45


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def images(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("world_shapes")
    for shape in SHAPES:
        write_concept_folder(shape, root / "images" / shape, root / "masks" / shape, count=2, seed=0)
    return concept_images(pipe, SHAPES, str(root / "images"), str(root / "masks"))


def intersection_over_union(masks: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(N,) of boolean masks (N, 1, H, W)."""
    return (masks & exact).flatten(1).sum(1) / (masks | exact).flatten(1).sum(1)


def test_attention_masks_cover_the_shapes_better_than_the_whole_image(pipe, images):
    masks = attention_masks(pipe, images, PROMPTS, SHAPES)
    assert masks.shape == images.masks.shape and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    exact = images.masks > 0.5
    attention = intersection_over_union(masks > 0.5, exact)
    whole_image = intersection_over_union(torch.ones_like(exact), exact)
    assert whole_image.mean() < IOU_BAR, "the bar must be one a mask of all ones fails"
    assert attention.mean() > IOU_BAR, attention
    assert (attention > whole_image).all(), (attention, whole_image)
    assert torch.equal(attention_masks(pipe, images, PROMPTS, SHAPES), masks), "the same noise every call"


@pytest.mark.parametrize(
    "prompts, options, message",
    [
        (PROMPTS[:-1], {}, "do not split evenly"),
        (PROMPTS, {"threshold": 1.0}, "threshold"),
        (PROMPTS, {"timesteps": (200, 1000)}, "training timesteps"),
    ],
)
def test_bad_arguments_are_refused(pipe, images, prompts, options, message):
    with pytest.raises(ValueError, match=message):
        attention_masks(pipe, images, prompts, SHAPES, **options)
