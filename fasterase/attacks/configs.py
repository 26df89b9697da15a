"""Every attack's options, as dataclasses (apart from the attacks, so that nothing here imports
torch: a whole attack config is checked before any model loads). Each attack's file holds what it
does with them."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_options, option
from ..errors import UserError


@dataclass
class AttackConfig:
    """Options every attack shares."""

    seed: int = option(0, "random seed of the attack (its noise, timesteps and initial values)")
    log_every: int = option(10, "steps between progress reports", at_least=1)

    def __post_init__(self):
        check_options(self)

    def input_paths(self) -> list[str]:
        """The files and folders this config reads (no output may be written over them)."""
        return []

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


@dataclass
class ImageAttackConfig(AttackConfig):
    """Options of attacks that learn from images of the concept (inversion, prompt)."""

    images: str = option("", "a folder of the concept's images; '' draws them with the original model")
    image_count: int = option(8, "images of the concept the original model draws when no folder is given", at_least=1)
    sample_steps: int = option(25, "DDIM steps of those images", at_least=1)
    guidance: float = option(5.0, "classifier-free guidance of those images")

    def input_paths(self) -> list[str]:
        return [self.images] if self.images else []

    def __post_init__(self):
        super().__post_init__()
        from pathlib import Path

        if self.images and not Path(self.images).expanduser().is_dir():
            raise UserError(f"images folder {self.images} does not exist")


# More token vectors than a word found by inversion ever needs; a file asking for more is not one.
MAX_INVERSION_TOKENS = 64


@dataclass
class InversionConfig(ImageAttackConfig):
    tokens: int = option(2, "new token vectors learnt for the concept (one word of that many tokens, at most 64)", at_least=1)
    steps: int = option(200, "Adam steps of textual inversion against the edited model", at_least=1)
    lr: float = option(5e-3, "Adam learning rate of the token vectors", positive=True)
    batch_size: int = option(8, "items (image, template, timestep) per step", at_least=1)
    templates: list[str] = option(
        ["{}", "a photo of a {}", "a picture of a {}", "an image of a {}"], "prompts the word is learnt in; {} stands for the new word"
    )

    def __post_init__(self):
        super().__post_init__()
        from ..config import check_template

        if self.tokens > MAX_INVERSION_TOKENS:
            raise UserError(f"tokens must be at most {MAX_INVERSION_TOKENS}, not {self.tokens}")
        if not self.templates:
            raise UserError("templates must hold at least one template")
        for template in self.templates:
            check_template(template)


@dataclass
class PromptAttackConfig(ImageAttackConfig):
    """UnlearnDiffAtk's prefix search (`fasterase.attacks.prompt`). The defaults suit the built-in
    world, where one word before the prompt brought an erased shape back far more often than three
    (against UCE 7/16 images and 0/16, against CA 13/16 and 2/16); the preset prompt-paper has the
    reference's settings (3 tokens, 50 timesteps x 40 steps)."""

    prefix_tokens: int = option(1, "discrete tokens of the adversarial prefix put before each evaluation prompt", at_least=1)
    timesteps: int = option(10, "evenly spaced timesteps the search visits, in ascending order", at_least=1)
    steps_per_timestep: int = option(10, "steps at each of those timesteps (each draws one token per prefix position)", at_least=1)
    lr: float = option(0.01, "Adam learning rate of each prefix position's distribution over the vocabulary", positive=True)
    weight_decay: float = option(0.1, "Adam's weight decay of those distributions")


@dataclass
class RingABellConfig(AttackConfig):
    """Ring-A-Bell's options (`fasterase.attacks.ringabell`). The defaults are sized for the
    built-in world (16 prompts in about 30 s on two CPU cores); the reference's settings are the
    ringabell-paper preset."""

    length: int = option(16, "K: tokens of each found prompt (the reference: 16, or 75 for a whole prompt)", at_least=1)
    eta: float = option(3.0, "strength of the concept direction added to each prompt's text states")
    templates: list[str] = option(
        ["{}", "a photo of a {}", "a picture of a {}", "an image of a {}"],
        "prompts the concept direction is measured in: each with the concept ({}) against the same with `neutral` in its place",
    )
    neutral: str = option("", "what stands in for the concept in the prompts without it; '' leaves it out")
    pairs: str = option("", "a UTF-8 file of prompt pairs in place of templates, one a line: a prompt with the concept, a tab, a prompt without it")
    population: int = option(32, "prompts the genetic algorithm keeps per evaluation prompt before selection (the reference: 200)", at_least=2)
    generations: int = option(30, "generations of the genetic algorithm (the reference: 3000)", at_least=1)
    mutation_rate: float = option(0.25, "chance that a prompt of the new generation gets one token replaced by a random one")
    crossover_rate: float = option(0.5, "chance that a survivor mates with a random other survivor, giving two children")
    replayable_tokens: bool = option(
        True,
        "draw only tokens that the tokenizer gives back from their own text, so that a found prompt, replayed as text, is the token "
        "sequence that was searched (the reference draws every token but the special ones)",
    )
    batch_size: int = option(1024, "candidate prompts per text-encoder call", at_least=1)

    def __post_init__(self):
        super().__post_init__()
        from ..config import check_template

        for name in ("mutation_rate", "crossover_rate"):
            if getattr(self, name) > 1:
                raise UserError(f"{name} must be at most 1, not {getattr(self, name)}")
        if self.pairs:
            self.read_pairs()
        elif not self.templates:
            raise UserError("templates must hold at least one template (or give a pairs file)")
        for template in self.templates:
            check_template(template)

    def input_paths(self) -> list[str]:
        return [self.pairs] if self.pairs else []

    def read_pairs(self) -> list[tuple[str, str]]:
        """The pairs file's (prompt with the concept, prompt without it), one per line."""
        from pathlib import Path

        from ..errors import reading_text

        path = Path(self.pairs).expanduser()
        with reading_text(path):
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs = [tuple(part.strip() for part in line.split("\t")) for line in lines]
        if not pairs or any(len(pair) != 2 or not all(pair) for pair in pairs):
            raise UserError(f"{self.pairs} must hold prompt pairs, one a line: a prompt with the concept, a tab, a prompt without it")
        return pairs

    def prompt_pairs(self, concept: str) -> list[tuple[str, str]]:
        """(prompt with the concept, the same without it): the pairs file's, else each template's."""
        if self.pairs:
            return self.read_pairs()
        return [(template.format(concept), template.format(self.neutral)) for template in self.templates]
