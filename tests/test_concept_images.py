"""Concept images: folders of the user's images and masks, or images the base model draws, as latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fasterase.concept_images import ConceptImages, concept_images, encode_images
from fasterase.models.family import image_size
from fasterase.config import make_config
from fasterase.errors import UserError
from fasterase.config import SamplingConfig
from fasterase.methods.configs import ImageMethodConfig
from fasterase.toyworld import world
from fasterase.toyworld.folders import write_concept_folder


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from fasterase.models.loading import load_pipeline

    return load_pipeline(tiny_pipeline_dir)


def _png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_world_folder_holds_the_rendered_scenes_and_their_exact_masks(tmp_path):
    paths = write_concept_folder("circle", tmp_path / "images", tmp_path / "masks", count=3, seed=5)
    assert [p.name for p in paths] == ["circle-00.png", "circle-01.png", "circle-02.png"]
    rng = np.random.default_rng(5)
    for path in paths:
        image, inside = world.render(world.random_scene(rng, obj="circle"))
        assert np.array_equal(np.asarray(Image.open(path)), np.round(image * 255).astype(np.uint8))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / path.name)) > 127, inside)
    # a style's mask is the background that shows it
    write_concept_folder("stripy", tmp_path / "style", tmp_path / "style_masks", count=1)
    mask = np.asarray(Image.open(tmp_path / "style_masks" / "stripy-00.png"))
    assert 0.5 < (mask > 127).mean() < 1.0
    with pytest.raises(UserError, match="no concept 'castle'"):
        write_concept_folder("castle", tmp_path / "nope")


def test_folder_images_and_masks_become_latents_and_image_space_masks(pipe, tmp_path):
    write_concept_folder("circle", tmp_path / "images", tmp_path / "masks", count=4)
    shots = concept_images(pipe, ["circle"], str(tmp_path / "images"), str(tmp_path / "masks"))
    size, grid = image_size(pipe), pipe.unet.config.sample_size
    assert shots.latents.shape == (4, pipe.unet.config.in_channels, grid, grid)
    assert shots.masks.shape == (4, 1, size, size) and shots.masks.dtype == torch.float32
    assert 0 <= shots.masks.min() and shots.masks.max() <= 1 and shots.masks.amax(dim=(1, 2, 3)).eq(1).all()
    assert shots.concept_index.tolist() == [0, 0, 0, 0]
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p in sorted((tmp_path / "images").iterdir())]))
    expected = pipe.vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    assert torch.allclose(shots.latents, expected, atol=1e-5)


def test_images_are_centre_cropped_and_resized_to_the_pipelines_size(pipe, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _png(tmp_path / "images" / "wide.png", np.full((48, 96, 3), 200))
    left = np.zeros((48, 96))
    left[:, :48] = 255  # the centre crop keeps columns 24..72: its left half is white
    _png(tmp_path / "masks" / "wide.png", left)
    shots = concept_images(pipe, ["circle"], str(tmp_path / "images"), str(tmp_path / "masks"))
    size = image_size(pipe)
    row = shots.masks[0, 0, size // 2]
    assert row.shape == (size,) and row[: size // 2 - 1].eq(1).all() and row[size // 2 + 1 :].eq(0).all()


def test_several_concepts_read_one_subfolder_each(pipe, tmp_path):
    write_concept_folder("circle", tmp_path / "images" / "circle", count=2)
    write_concept_folder("square", tmp_path / "images" / "square", count=3)
    shots = concept_images(pipe, ["square", "circle"], str(tmp_path / "images"))
    assert shots.concept_index.tolist() == [0, 0, 0, 1, 1] and shots.masks is None
    picks = shots.schedule(2, steps=3, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert picks.shape == (3, 8) and shots.concept_index[picks].tolist() == [[0] * 4 + [1] * 4] * 3
    with pytest.raises(UserError, match="one subfolder per concept; missing: star"):
        concept_images(pipe, ["circle", "star"], str(tmp_path / "images"))


def test_drawn_images_are_seeded_and_grouped_by_concept(pipe):
    sampling = SamplingConfig(steps=2, seed=3)
    first = concept_images(pipe, ["circle", "ring"], count=2, templates=["a photo of a {}"], sampling=sampling)
    again = concept_images(pipe, ["circle", "ring"], count=2, templates=["a photo of a {}"], sampling=sampling)
    assert isinstance(first, ConceptImages) and len(first) == 4 and first.masks is None
    assert first.concept_index.tolist() == [0, 0, 1, 1]
    assert torch.equal(first.latents, again.latents)


def test_encode_images_in_batches_matches_one_batch(pipe):
    pixels = torch.rand(5, 3, image_size(pipe), image_size(pipe), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(encode_images(pipe, pixels, batch_size=2), encode_images(pipe, pixels), atol=1e-5)


def test_bad_folders_fail_with_one_line_messages(pipe, tmp_path):
    with pytest.raises(UserError, match="images folder .*missing does not exist"):
        make_config(ImageMethodConfig, {"images": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="masks from a folder need the images"):
        make_config(ImageMethodConfig, {"masks": str(tmp_path)})

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"^no readable image in .*empty$"):
        concept_images(pipe, ["circle"], str(tmp_path / "empty"))

    write_concept_folder("circle", tmp_path / "images", tmp_path / "masks", count=3)
    (tmp_path / "masks" / "circle-01.png").rename(tmp_path / "masks" / "other.png")
    with pytest.raises(UserError) as error:
        concept_images(pipe, ["circle"], str(tmp_path / "images"), str(tmp_path / "masks"))
    message = str(error.value)
    assert "\n" not in message and "no mask for circle-01" in message and "masks without an image: other" in message
