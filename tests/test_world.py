"""The procedural world's contract, and the tokenizer built for its captions."""

import itertools

import numpy as np
import pytest

from fasterase.toyworld import world
from fasterase.toyworld.tokenizer import MAX_LENGTH, save_tokenizer

STYLE_WORDS = {word for words in world.STYLES.values() for word in words}


def centred(obj: str, colour: str = "red", style: str = "plain") -> world.Scene:
    return world.Scene(obj=obj, colour=colour, style=style, dx=0.0, dy=0.0, scale=10.5, phase=0.0)


def test_shapes_include_lookalike_pairs():
    assert len(world.SHAPES) >= 8
    assert len(set(world.SHAPES)) == len(world.SHAPES)
    for a, b in (("circle", "ring"), ("square", "diamond")):
        assert a in world.SHAPES and b in world.SHAPES
        assert world.LOOKALIKES[a] == b and world.LOOKALIKES[b] == a
    for a, b in world.LOOKALIKES.items():
        assert a in world.SHAPES and b in world.SHAPES and a != b
        assert world.LOOKALIKES[b] == a


def test_colours_and_styles():
    assert len(world.COLOURS) >= 6
    for rgb in world.COLOURS.values():
        assert len(rgb) == 3 and all(0.0 <= c <= 1.0 for c in rgb)
    assert len(world.STYLES) >= 4
    all_words = [word for words in world.STYLES.values() for word in words]
    assert len(all_words) == len(set(all_words)), "a style synonym belongs to two styles"
    for style, words in world.STYLES.items():
        assert len(words) >= 2
        for word in words:
            assert world.style_of(word) == style
    with pytest.raises(KeyError):
        world.style_of("circle")


def test_emblem_names():
    assert world.NUM_EMBLEMS == 100
    assert len(world.EMBLEMS) == 100
    assert len(set(world.EMBLEMS)) == 100
    for name in world.EMBLEMS:
        assert name.isalpha() and name.islower() and " " not in name
    others = set(world.SHAPES) | set(world.COLOURS) | STYLE_WORDS | {world.EMPTY}
    assert not others & set(world.EMBLEMS)


def test_emblem_glyphs_are_distinct():
    glyphs = world.EMBLEM_GLYPHS
    assert glyphs.shape == (100, world.EMBLEM_CELLS, world.EMBLEM_CELLS)
    assert glyphs.dtype == bool
    mirrored = glyphs[:, :, ::-1]
    for i, j in itertools.combinations(range(len(glyphs)), 2):
        assert not np.array_equal(glyphs[i], glyphs[j]), (world.EMBLEMS[i], world.EMBLEMS[j])
        assert not np.array_equal(glyphs[i], mirrored[j]), (world.EMBLEMS[i], world.EMBLEMS[j])
        assert not np.array_equal(mirrored[i], glyphs[j]), (world.EMBLEMS[i], world.EMBLEMS[j])
    for glyph in glyphs:
        assert glyph.any()


def test_render_is_deterministic_and_well_typed():
    rng = np.random.default_rng(3)
    for _ in range(5):
        scene = world.random_scene(rng)
        image, mask = world.render(scene)
        again_image, again_mask = world.render(scene)
        assert np.array_equal(image, again_image) and np.array_equal(mask, again_mask)
        assert image.dtype == np.float32 and image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
        assert image.shape == (32, 32, 3)
        assert mask.dtype == bool and mask.shape == (32, 32)
        assert image.min() >= 0.0 and image.max() <= 1.0


@pytest.mark.parametrize("style", list(world.STYLES))
def test_empty_scene_has_empty_mask(style):
    image, mask = world.render(centred(world.EMPTY, style=style))
    assert not mask.any()
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_objects_have_masks_in_their_colour():
    colours = list(world.COLOURS)
    for i, obj in enumerate(world.SHAPES + world.EMBLEMS):
        colour = colours[i % len(colours)]
        style = list(world.STYLES)[i % len(world.STYLES)]
        image, mask = world.render(centred(obj, colour, style))
        assert mask.any(), obj
        # Pixels at the mask's edge are antialiased blends; the median is the object's colour.
        median = np.median(image[mask], axis=0)
        np.testing.assert_allclose(median, world.COLOURS[colour], atol=0.03, err_msg=f"{obj} in {colour}")


def test_captions_name_the_object():
    rng = np.random.default_rng(11)
    objects_seen = set()
    for _ in range(300):
        scene = world.random_scene(rng, empty_prob=0.1)
        text = world.caption(scene, rng)
        words = text.split()
        if scene.obj == world.EMPTY:
            assert not (set(words) & (set(world.SHAPES) | set(world.EMBLEMS))), text
        else:
            assert scene.obj in words, text
            objects_seen.add(scene.obj)
        for word in words:
            if word in world.COLOURS:
                assert word == scene.colour, text
            if word in STYLE_WORDS:
                assert world.style_of(word) == scene.style, text
    assert len(objects_seen) > 20


def test_caption_with_colour_and_style():
    scene = centred("star", "blue", "dotted")
    text = world.caption(scene, np.random.default_rng(0), colour_prob=1.0, style_prob=1.0)
    words = text.split()
    assert "star" in words and "blue" in words
    assert any(w in world.STYLES["dotted"] for w in words)
    text = world.caption(scene, np.random.default_rng(0), colour_prob=0.0, style_prob=0.0)
    assert "star" in text.split() and "blue" not in text.split()
    assert not set(text.split()) & STYLE_WORDS


def test_sample_batch_labels_agree_with_scenes():
    batch = world.sample_batch(48, seed=5, empty_prob=0.2)
    assert batch.images.shape == (48, 32, 32, 3) and batch.images.dtype == np.float32
    assert batch.masks.shape == (48, 32, 32) and batch.masks.dtype == bool
    assert len(batch.captions) == len(batch.scenes) == 48
    for i, scene in enumerate(batch.scenes):
        assert world.OBJECTS[batch.objects[i]] == scene.obj
        assert list(world.COLOURS)[batch.colours[i]] == scene.colour
        assert list(world.STYLES)[batch.styles[i]] == scene.style
        image, mask = world.render(scene)
        assert np.array_equal(batch.images[i], image)
        assert np.array_equal(batch.masks[i], mask)
        if scene.obj != world.EMPTY:
            assert scene.obj in batch.captions[i].split()
    assert any(s.obj == world.EMPTY for s in batch.scenes)
    again = world.sample_batch(48, seed=5, empty_prob=0.2)
    assert np.array_equal(again.images, batch.images) and again.captions == batch.captions


def test_objects_order():
    assert world.OBJECTS == world.SHAPES + world.EMBLEMS + (world.EMPTY,)


def test_concept_family():
    for shape in world.SHAPES:
        assert world.concept_family(shape) == "shape"
    for emblem in world.EMBLEMS:
        assert world.concept_family(emblem) == "emblem"
    for colour in world.COLOURS:
        assert world.concept_family(colour) == "colour"
    for word in STYLE_WORDS:
        assert world.concept_family(word) == "style"
    for unknown in ("dog", "van gogh", "", "Circle", world.EMPTY):
        assert world.concept_family(unknown) is None
    for family in ("shape", "emblem", "colour", "style"):
        for member in world.family_members(family):
            if family == "style":
                assert world.concept_family(member) == "style"
            else:
                assert world.concept_family(member) == family


def test_vocabulary_covers_captions():
    vocab = set(world.vocabulary())
    batch = world.sample_batch(40, seed=1, empty_prob=0.2)
    for text in batch.captions:
        assert set(text.split()) <= vocab, text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    size = save_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    assert len(tok) == size
    return tok


def test_every_world_word_is_one_token(tokenizer):
    for word in world.vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
        assert ids[0] != tokenizer.unk_token_id, word
    distinct = {tokenizer(word, add_special_tokens=False).input_ids[0] for word in world.vocabulary()}
    assert len(distinct) == len(world.vocabulary())


def test_captions_are_one_token_per_word(tokenizer):
    for text in world.sample_batch(20, seed=2).captions:
        assert len(tokenizer(text, add_special_tokens=False).input_ids) == len(text.split()), text


def test_unknown_characters_map_to_unknown_token(tokenizer):
    assert tokenizer.unk_token_id is not None
    assert tokenizer.unk_token_id in tokenizer("日本", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id in tokenizer("a photo of 日本", add_special_tokens=False).input_ids
    # English words outside the vocabulary are spelled in pieces, not unknown.
    ids = tokenizer("zebra", add_special_tokens=False).input_ids
    assert ids and tokenizer.unk_token_id not in ids


def test_max_length_and_end_of_text_padding(tokenizer):
    assert tokenizer.model_max_length == MAX_LENGTH == 77
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    ids = tokenizer("a photo of a circle", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:6] == tokenizer("a photo of a circle", add_special_tokens=False).input_ids
    assert all(i == tokenizer.eos_token_id for i in ids[6:])
