"""The procedural world: images with exact labels and object masks, and captions from templates.

Every scene is one object (a shape or an emblem, in a colour) on a styled background, or an empty
background. Rendering is deterministic given a seed, so the data set, the classifier's held-out set
and the training captions can be rebuilt anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # edges are antialiased by rendering at 4x and averaging

SHAPES = ("circle", "ring", "square", "diamond", "triangle", "cross", "star", "crescent")
# Pairs a classifier and a model can confuse; erasing one must be reported beside the other.
LOOKALIKES = {"circle": "ring", "ring": "circle", "square": "diamond", "diamond": "square"}

COLOURS = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.75, 0.24),
    "blue": (0.20, 0.32, 0.92),
    "yellow": (0.92, 0.86, 0.16),
    "purple": (0.64, 0.24, 0.80),
    "orange": (0.96, 0.55, 0.12),
}

# Each style is reachable by several words, so generality of an erasure can be tested.
STYLES = {
    "plain": ("plain", "solid", "blank"),
    "striped": ("striped", "stripy", "lined"),
    "dotted": ("dotted", "spotted", "speckled"),
    "checkered": ("checkered", "chequered", "tiled"),
}

NUM_EMBLEMS = 100
EMBLEM_CELLS = 5  # a 5x5 mirror-symmetric glyph of 4-pixel cells
EMBLEM_CELL_PX = 4

TEMPLATES = (
    "a photo of a {obj}",
    "a picture of a {obj}",
    "an image of a {obj}",
    "a {obj}",
    "a drawing of a {obj}",
    "there is a {obj} in the picture",
)
BACKGROUND_SUFFIXES = (" on a {style} background", " against a {style} backdrop")
EMPTY_CAPTIONS = ("an empty {style} background", "a {style} background with nothing on it", "nothing")
EMPTY = "nothing"  # the label of a scene with no object


def _emblem_names(count: int, rng: np.random.Generator) -> tuple[str, ...]:
    onsets = "b d f g k l m n p r s t v z".split()
    vowels = "a e i o u".split()
    codas = "k l n r s x".split()
    names: set[str] = set()
    while len(names) < count:
        name = rng.choice(onsets) + rng.choice(vowels) + rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
        names.add(str(name))
    return tuple(sorted(names))


def _emblem_glyphs(count: int, rng: np.random.Generator) -> np.ndarray:
    """Mirror-symmetric 5x5 glyphs whose free halves differ in at least 3 of 15 cells."""
    glyphs: list[np.ndarray] = []
    while len(glyphs) < count:
        half = rng.random((EMBLEM_CELLS, 3)) < 0.5
        if not 6 <= half.sum() <= 11:
            continue
        if all((half != g[:, :3]).sum() >= 3 for g in glyphs):
            glyphs.append(np.concatenate([half, half[:, 1::-1]], axis=1))
    return np.stack(glyphs)


_world_rng = np.random.default_rng(20261122)
EMBLEMS = _emblem_names(NUM_EMBLEMS, _world_rng)
EMBLEM_GLYPHS = _emblem_glyphs(NUM_EMBLEMS, _world_rng)

# The object classes in the order the classifier's object head predicts them.
OBJECTS = SHAPES + EMBLEMS + (EMPTY,)


def concept_family(concept: str) -> str | None:
    """The label family a world concept belongs to ("shape", "emblem", "colour", "style"), else None."""
    if concept in SHAPES:
        return "shape"
    if concept in EMBLEMS:
        return "emblem"
    if concept in COLOURS:
        return "colour"
    if any(concept in words for words in STYLES.values()):
        return "style"
    return None


def style_of(word: str) -> str:
    for style, words in STYLES.items():
        if word in words:
            return style
    raise KeyError(word)


def family_members(family: str) -> tuple[str, ...]:
    return {"shape": SHAPES, "emblem": EMBLEMS, "colour": tuple(COLOURS), "style": tuple(STYLES)}[family]


def vocabulary() -> list[str]:
    """Every word the captions of this world use."""
    words = set()
    for text in TEMPLATES + BACKGROUND_SUFFIXES + EMPTY_CAPTIONS:
        words.update(text.replace("{obj}", "").replace("{style}", "").split())
    words.update(SHAPES, EMBLEMS, COLOURS)
    for synonyms in STYLES.values():
        words.update(synonyms)
    return sorted(words)


@dataclass(frozen=True)
class Scene:
    obj: str  # a shape, an emblem, or EMPTY
    colour: str
    style: str
    dx: float  # object centre offset, pixels
    dy: float
    scale: float  # object radius, pixels
    phase: float  # background pattern offset, pixels


# An emblem's 4-pixel cells sit exactly on the 4x-downsampled latent grid (its 20-pixel glyph
# spans pixels 4..24), so each cell is one latent pixel: jittered off the grid, a small model
# could not learn 100 glyphs (8% recognised after 1,500 steps, against 89% for shapes).
EMBLEM_OFFSET = -2.0


def random_scene(rng: np.random.Generator, obj: str | None = None, empty_prob: float = 0.04, shape_prob: float = 0.40) -> Scene:
    """A random scene; emblems get the larger share since there are 100 of them against 8 shapes."""
    if obj is None:
        roll = rng.random()
        if roll < empty_prob:
            obj = EMPTY
        elif roll < empty_prob + shape_prob:
            obj = SHAPES[rng.integers(len(SHAPES))]
        else:
            obj = EMBLEMS[rng.integers(NUM_EMBLEMS)]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    style = list(STYLES)[rng.integers(len(STYLES))]
    dx, dy, scale, phase = rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(9.5, 12.0), rng.uniform(0, 8)
    if obj in EMBLEMS:
        dx = dy = EMBLEM_OFFSET
    return Scene(obj, colour, style, float(dx), float(dy), float(scale), float(phase))


def _grid() -> tuple[np.ndarray, np.ndarray]:
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    return np.meshgrid(coords, coords, indexing="xy")


_X, _Y = _grid()


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in object coordinates (radius 1, v pointing down)."""
    r = np.sqrt(u * u + v * v)
    if shape == "circle":
        return r <= 1.0
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.58)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    if shape == "triangle":
        return (v <= 0.75) & (np.abs(u) <= (v + 1.0) * 0.62)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        return r <= 0.42 + 0.6 * np.abs(np.cos(2.5 * theta)) ** 3
    if shape == "crescent":
        return (r <= 1.0) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.75**2)
    raise ValueError(f"unknown shape {shape!r}")


def _background(style: str, phase: float) -> np.ndarray:
    x, y = _X + phase, _Y + phase * 0.5
    dark, light = 0.12, 0.34
    if style == "plain":
        mask = np.zeros_like(x, dtype=bool)
    elif style == "striped":
        mask = ((x + y) % 8) < 4
    elif style == "dotted":
        mask = ((x % 6) - 3) ** 2 + ((y % 6) - 3) ** 2 <= 1.6**2
    elif style == "checkered":
        mask = ((x // 8) + (y // 8)) % 2 == 0
    else:
        raise ValueError(f"unknown style {style!r}")
    return np.where(mask, light, dark)


def _object_mask(scene: Scene) -> np.ndarray:
    cx = IMAGE_SIZE / 2 + scene.dx
    cy = IMAGE_SIZE / 2 + scene.dy
    if scene.obj == EMPTY:
        return np.zeros_like(_X, dtype=bool)
    if scene.obj in SHAPES:
        return _shape_inside(scene.obj, (_X - cx) / scene.scale, (_Y - cy) / scene.scale)
    glyph = EMBLEM_GLYPHS[EMBLEMS.index(scene.obj)]
    half = EMBLEM_CELLS * EMBLEM_CELL_PX / 2
    col = np.floor((_X - cx + half) / EMBLEM_CELL_PX).astype(int)
    row = np.floor((_Y - cy + half) / EMBLEM_CELL_PX).astype(int)
    valid = (col >= 0) & (col < EMBLEM_CELLS) & (row >= 0) & (row < EMBLEM_CELLS)
    return valid & glyph[row.clip(0, EMBLEM_CELLS - 1), col.clip(0, EMBLEM_CELLS - 1)]


def _downsample(a: np.ndarray) -> np.ndarray:
    n = IMAGE_SIZE
    return a.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, *a.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Returns the image (32, 32, 3) float32 in [0, 1] and the object mask (32, 32) bool."""
    background = _background(scene.style, scene.phase)
    inside = _object_mask(scene)
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float64)
    hi = np.where(inside[..., None], colour, background[..., None])
    coverage = _downsample(inside.astype(np.float64))
    return _downsample(hi).astype(np.float32), coverage >= 0.5


def caption(scene: Scene, rng: np.random.Generator, colour_prob: float = 0.5, style_prob: float = 0.5) -> str:
    """A caption naming the object, and sometimes its colour and its background style."""
    style_word = STYLES[scene.style][rng.integers(len(STYLES[scene.style]))]
    if scene.obj == EMPTY:
        return EMPTY_CAPTIONS[rng.integers(len(EMPTY_CAPTIONS))].format(style=style_word)
    obj = f"{scene.colour} {scene.obj}" if rng.random() < colour_prob else scene.obj
    text = TEMPLATES[rng.integers(len(TEMPLATES))].format(obj=obj)
    if rng.random() < style_prob:
        text += BACKGROUND_SUFFIXES[rng.integers(len(BACKGROUND_SUFFIXES))].format(style=style_word)
    return text


@dataclass
class Batch:
    images: np.ndarray  # (N, 32, 32, 3) float32 in [0, 1]
    masks: np.ndarray  # (N, 32, 32) bool
    objects: np.ndarray  # (N,) index into OBJECTS
    colours: np.ndarray  # (N,) index into COLOURS
    styles: np.ndarray  # (N,) index into STYLES
    captions: list[str]
    scenes: list[Scene]


def sample_batch(n: int, seed: int, **scene_kwargs) -> Batch:
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, **scene_kwargs) for _ in range(n)]
    rendered = [render(s) for s in scenes]
    return Batch(
        images=np.stack([r[0] for r in rendered]),
        masks=np.stack([r[1] for r in rendered]),
        objects=np.array([OBJECTS.index(s.obj) for s in scenes]),
        colours=np.array([list(COLOURS).index(s.colour) for s in scenes]),
        styles=np.array([list(STYLES).index(s.style) for s in scenes]),
        captions=[caption(s, rng) for s in scenes],
        scenes=scenes,
    )
