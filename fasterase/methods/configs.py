"""Every method's options, as dataclasses, with the names their values choose from.

Apart from the methods so that nothing here imports torch: the CLI and the API build and check a
whole config (types, ranges, choices, templates) in a fraction of a second, before the heavy
imports and before any model loads. Each method's file holds what it does with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..config import MethodConfig, SamplingConfig, check_choice, option, per_concept, weighted_paths
from ..errors import UserError, reading_text
from ..names import INJECTION_SITES, MASK_SOURCES, PARAMETER_SETS, TEXT_ENCODER_SETS, TEXT_ENCODERS


@dataclass
class TrajectoryConfig(MethodConfig):
    """Options of methods that train on x_t from the frozen model's own trajectories (ESD, CA, KPOP)."""

    lr: float = option(1e-3, "Adam learning rate", positive=True)
    batch_size: int = option(8, "samples (x_t at any timestep) of each concept per update: a step carries every concept", at_least=1)
    trajectories: int = option(16, "sampled trajectories per concept that training draws x_t from", at_least=1)
    sample_steps: int = option(20, "DDIM steps of those trajectories", at_least=1)
    guidance: float = option(5.0, "classifier-free guidance of those trajectories")
    preserve_weight: float = option(1.0, "weight of keeping the frozen model's predictions on the preserved concepts (if any)")
    log_every: int = option(10, "steps between progress reports (each reads the losses off the device)", at_least=1)


MASKS_HELP = (
    "where the concept is in each image: a folder of masks named like the images (white: the concept; needs images), "
    "attention (where the frozen model's cross-attention on the concept's tokens is) or none ('' too: the whole image)"
)


@dataclass
class ImageMethodConfig(MethodConfig):
    """Options of every method that learns from images of the concept (FMN, MACE, fewshot)."""

    images: str = option("", "a folder of the concepts' images (one subfolder per concept when there are several); '' draws them with the base model")
    masks: str = option("", MASKS_HELP)
    sample_steps: int = option(25, "DDIM steps of the images the base model draws", at_least=1)
    guidance: float = option(5.0, "classifier-free guidance of the images the base model draws")

    def sampling(self) -> SamplingConfig:
        """How the base model draws the concepts' images when no folder is given."""
        return SamplingConfig(steps=self.sample_steps, guidance=self.guidance, batch_size=self.sample_batch, seed=self.seed)

    def mask_folder(self) -> str:
        """The folder masks are read from; '' for none, or for masks from attention."""
        return "" if self.masks in ("", *MASK_SOURCES) else self.masks

    def input_paths(self) -> list[str]:
        return [folder for folder in (self.images, self.mask_folder()) if folder]

    def __post_init__(self):
        super().__post_init__()
        if self.mask_folder() and not self.images:
            raise UserError("masks from a folder need the images they belong to: give images as well")
        for name, folder in (("images", self.images), ("masks", self.mask_folder())):
            if folder and not Path(folder).expanduser().is_dir():
                raise UserError(f"{name} folder {folder} does not exist")


CA_TRAINABLE_SETS = ("cross_attention_kv", "cross_attention")
# The ESD paper's names for the parameter sets it trains -> ours.
ESD_TRAINABLE_SETS = {
    "x": "cross_attention",
    "x-strict": "cross_attention_kv",
    "u": "non_cross_attention",
    "all": "all",
}
KPOP_TRAINABLE_SETS = ("cross_attention", "cross_attention_kv", "non_cross_attention")
# Token pairings of the closed forms, by name (`fasterase.models.token_pairs` does what each says).
UCE_PAIRINGS = ("position", "tails", "last")
MACE_PAIRINGS = ("position", "aligned")
PRESERVE_GRAM_HELP = (
    "Grams of prompts to preserve, built by `fasterase cache build`: 'a.safetensors' or several with weights, "
    "'domain.safetensors:8e4,coco.safetensors:1' (each weight times preserve_scale); '' for none"
)


@dataclass
class CAConfig(TrajectoryConfig):
    # The empty prompt is an anchor every model has, and what it produces (the model's generic
    # image) is a neutral stand-in for any concept; the paper picks a category per concept
    # ("dog" for "grumpy cat", "painting" for a style), which only the user can name.
    anchor: str = option("", "the concept whose outputs the erased concepts' prompts are mapped to; '' is the empty prompt")
    anchor_prompts: str = option(
        "",
        "a text file of the anchor's captions, one a line (the reference generates ~200): the trajectories are drawn from them "
        "instead of the templates, and the concepts' prompts are the same captions made the concept's (see concept_type); "
        "for an object, captions without the anchor are skipped, as the reference skips them; '' for the templates",
    )
    concept_type: str = option(
        "object",
        "object: a concept's prompt is the anchor's with the concept in the anchor's place (in captions: every occurrence of "
        "the anchor, case aside); style: the anchor's prompt with ', in the style of X' or, two in three, 'in X's style, ' (the reference's phrasings)",
    )
    trainable: str = option("cross_attention_kv", "cross_attention_kv (the paper's default) or cross_attention")
    lr: float = option(1e-3, "Adam learning rate (the paper's is 1.6e-5 for SD; preset sd14)", positive=True)

    def prompt_concepts(self) -> list[str]:
        return super().prompt_concepts() + ([self.anchor] if self.anchor else [])

    def input_paths(self) -> list[str]:
        return super().input_paths() + ([self.anchor_prompts] if self.anchor_prompts else [])

    def anchor_captions(self) -> list[str]:
        """The captions of anchor_prompts that training uses, stripped ([] without the file): for
        objects, those that contain the anchor. A one-line UserError for a file that cannot be read
        as text or leaves no caption."""
        if not self.anchor_prompts:
            return []
        path = Path(self.anchor_prompts).expanduser()
        with reading_text(path):
            captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not captions:
            raise UserError(f"anchor_prompts {path} has no captions (one a line)")
        if self.concept_type == "object":
            captions = [c for c in captions if re.search(re.escape(self.anchor), c, re.IGNORECASE)]
            if not captions:
                raise UserError(f"no caption in anchor_prompts {path} contains the anchor {self.anchor!r}")
        return captions

    def __post_init__(self):
        super().__post_init__()
        check_choice("trainable", self.trainable, CA_TRAINABLE_SETS)
        check_choice("concept_type", self.concept_type, ("object", "style"))
        if self.anchor in self.concepts:
            raise UserError(f"the anchor {self.anchor!r} is one of the concepts to erase")
        if self.anchor_prompts and self.concept_type == "object" and not self.anchor:
            raise UserError("anchor_prompts of an object need the anchor that the concept replaces in them: give anchor too")
        self.anchor_captions()  # refuses a file that cannot be read or leaves no caption, before any model loads


@dataclass
class ESDConfig(TrajectoryConfig):
    negative_guidance: float = option(1.0, "eta: how far the target is guided away from the concept")
    trainable: str = option(
        "x",
        "parameters trained, by the paper's names: x (cross-attention), x-strict (cross-attention "
        "keys and values), u (all but cross-attention; for concepts such as nudity) or all",
    )
    lr: float = option(1e-3, "Adam learning rate (the paper's 1e-5 is for SD; preset sd14)", positive=True)
    guidance: float = option(3.0, "classifier-free guidance of the trajectories (the paper's start guidance)")

    def __post_init__(self):
        super().__post_init__()
        check_choice("trainable", self.trainable, ESD_TRAINABLE_SETS)


@dataclass
class FewShotConfig(ImageMethodConfig):
    steps: int = option(10, "Adam steps of gradient ascent: the stopping point, since ascent has no optimum", at_least=1)
    lr: float = option(1e-4, "Adam learning rate (the paper's 1e-5 is for SD; preset sd14)", positive=True)
    trainable: str = option("mlp_last_attention", f"text-encoder parameters to update: {', '.join(TEXT_ENCODER_SETS)}")
    image_count: int = option(4, "images per concept the base model draws when no folder is given", at_least=1)
    batch_size: int = option(4, "images of every concept per step, each with its own prompt, noise and timestep", at_least=1)
    text_encoders: list[str] = option([], f"text encoders to update, of {', '.join(TEXT_ENCODERS)}; [] for every one the model has (both on SDXL)")
    preserve_weight: float = option(1.0, "weight of keeping the preserved concepts' text-encoder states (if any)")
    log_every: int = option(5, "steps between progress reports (each reads the loss off the device)", at_least=1)

    def __post_init__(self):
        super().__post_init__()
        check_choice("trainable", self.trainable, TEXT_ENCODER_SETS)
        for name in self.text_encoders:
            check_choice("text_encoders", name, TEXT_ENCODERS)


@dataclass
class FMNConfig(ImageMethodConfig):
    steps: int = option(35, "re-steering steps", at_least=1)
    lr: float = option(3e-4, "AdamW learning rate (the paper's 2e-6 is for SD; preset sd14)", positive=True)
    # On the built-in world, training the whole UNet or all of cross-attention to ignore the
    # padding erased every shape with the circle; the key/value projections alone erase it only.
    trainable: str = option("cross_attention_kv", f"UNet parameters to train: {', '.join(PARAMETER_SETS)} (the reference: all)")
    include_end: bool = option(True, "also re-steer the end-of-text positions (on SD1.x: the padding too)")
    batch_size: int = option(4, "items (image, prompt, timestep) of each concept per step", at_least=1)
    image_count: int = option(8, "images per concept drawn by the base model when no folder is given", at_least=1)
    inversion_steps: int = option(0, "textual-inversion steps before re-steering (0: target the concept's own tokens)")
    inversion_tokens: int = option(1, "learnt token vectors per concept", at_least=1)
    inversion_init: str = option(
        "concept",
        "how the learnt vectors start: concept (the concept's sub-token vectors, in turn) or concept_then_random (one per "
        "sub-token, the rest random normal with std 1: the reference's initializer tokens 'elon|musk|<rand-1>|<rand-1>')",
    )
    inversion_lr: float = option(5e-3, "Adam learning rate of textual inversion", positive=True)
    inversion_norm_pull: float = option(
        0.0,
        "after each inversion step, every learnt vector's norm moves this fraction of the way to the mean norm of the text "
        "encoder's token vectors (the reference's clip_ti_decay: 0.1, towards 0.4); 0: off",
    )
    log_every: int = option(5, "steps between progress reports (each reads the loss off the device)", at_least=1)

    def __post_init__(self):
        super().__post_init__()
        check_choice("trainable", self.trainable, PARAMETER_SETS)
        check_choice("inversion_init", self.inversion_init, ("concept", "concept_then_random"))
        if self.inversion_norm_pull > 1:
            raise UserError(f"inversion_norm_pull must be at most 1 (all the way to the mean norm), not {self.inversion_norm_pull}")


@dataclass
class KPOPConfig(TrajectoryConfig):
    # 100 steps with the prompt at 3e-2 score as 150 at 1e-2 did on the built-in world (ESR, PSR,
    # look-alikes, the key's recovery; benchmarks/results/defaults-halved-cpu-2026-12-07.json) in 2/3
    # of the time; with 100 steps at 1e-2 the key brought back 56% of the circles, not 91%.
    steps: int = option(100, "iterations (one transfer and one removal update each)", at_least=1)
    neutral: str = option("", "the concept the erased one is mapped to; '' is the empty prompt")
    prompt_mode: str = option("concat", "'concat' (prompt tokens appended to the text keys) or 'additive'")
    prompt_length: int = option(10, "concat prompt length in multiples of the text context (k: k x 77 tokens)", at_least=1)
    # The paper injects in SD's mid block (8x8x1280; preset sd14). The built-in world's mid block is
    # 2x2x128: a prompt there recovered only 25-69% of the erased shape, against 88% from all layers.
    inject: str = option("all", "cross-attention layers that see the prompt: mid, mid_up or all")
    trainable: str = option("cross_attention", "cross_attention, cross_attention_kv (key/value projections only), or non_cross_attention (for concepts like nudity)")
    prompt_weight: float = option(0.1, "lambda: weight of keeping the concept with the prompt, in the removal step (the prompt learns through this term)", positive=True)
    negative_guidance: float = option(0.5, "eta: the removal target is eps(c_n) - eta (eps(c_e) - eps(c_n)), past the neutral prompt away from the concept (see above); 0 is the paper's")
    neutral_weight: float = option(0.0, "weight of keeping the neutral prompt's own prediction in the removal step")
    lr: float = option(2e-3, "Adam learning rate of the model (the paper's 1e-5 is for SD; preset sd14)", positive=True)
    prompt_lr: float = option(3e-2, "Adam learning rate of the prompt", positive=True)

    def prompt_concepts(self) -> list[str]:
        return super().prompt_concepts() + ([self.neutral] if self.neutral else [])

    def __post_init__(self):
        super().__post_init__()
        check_choice("prompt_mode", self.prompt_mode, ("concat", "additive"))
        check_choice("inject", self.inject, INJECTION_SITES)
        check_choice("trainable", self.trainable, KPOP_TRAINABLE_SETS)


@dataclass
class MACEConfig(ImageMethodConfig):
    steps: int = option(50, "LoRA training steps; each step carries every concept", at_least=1)
    mapping: list[str] = option(
        [""], "what each concept's prompt tokens are mapped to in the refinement: one concept for all or one per concept; '' is nothing (the template's other words)"
    )
    masks: str = option("attention", MASKS_HELP)
    pairing: str = option(
        "position",
        "token pairs of the refinement: position (each position with the mapping prompt's at the same position) "
        "or aligned (the reference: common prefix and suffix aligned, the concept's own sub-tokens without a target)",
    )
    fusion_positions: str = option("tail", "tokens of each concept's prompts the fusion sends where its LoRA sends them: tail (from the concept on) or all (the reference)")
    fusion_target: str = option("current", "where the fusion keeps the preserved tokens' projections: current (the refined weights) or original (the base model's, as the reference's caches do)")
    lam: float = option(0.5, "lambda: pull of every projection towards its current weights (refinement and fusion); 0 where the preservation terms make the system solvable")
    preserve_scale: float = option(0.1, "weight of each preserved prompt's tokens (preserved concepts, the empty prompt, preserve_gram)")
    preserve_empty: bool = option(True, "also preserve the empty prompt (classifier-free guidance's unconditional branch); the reference preserves only its caches")
    preserve_gram: str = option("", PRESERVE_GRAM_HELP)
    square_refinement_scale: bool = option(False, "the refinement weighs the preservation terms by preserve_scale squared, as the reference's stage 1 does (it applies its scale twice)")
    rank: int = option(1, "rank of each concept's LoRA", at_least=1)
    lr: float = option(1e-3, "AdamW learning rate of the LoRAs (the paper's 1e-5 is for SD; preset sd14)", positive=True)
    batch_size: int = option(2, "items (image, prompt, timestep) of each concept per step", at_least=1)
    image_count: int = option(8, "images per concept drawn by the base model when no folder is given", at_least=1)
    include_end: bool = option(True, "the attention loss also watches the end-of-text positions (on SD1.x: the padding too)")
    importance_sampling: bool = option(True, "draw timesteps from the concept-focal density (else uniformly)")
    log_every: int = option(10, "steps between progress reports (each reads the loss off the device)", at_least=1)
    save_loras: bool = option(False, "also write each concept's LoRA (diffusers load_lora_weights format); it was trained on the refined weights")

    def prompt_concepts(self) -> list[str]:
        return super().prompt_concepts() + [m for m in dict.fromkeys(self.mapping) if m]

    def mappings(self) -> list[str]:
        """The mapping concept of each erased concept."""
        return per_concept("mapping", self.mapping, self.concepts)

    def preservation_grams(self) -> list[tuple[str, float]]:
        return weighted_paths("preserve_gram", self.preserve_gram)

    def input_paths(self) -> list[str]:
        return super().input_paths() + [path for path, _ in self.preservation_grams()]

    def __post_init__(self):
        super().__post_init__()
        self.mappings()  # refuses a mapping list that fits neither one for all nor one per concept
        check_choice("pairing", self.pairing, MACE_PAIRINGS)
        check_choice("fusion_positions", self.fusion_positions, ("tail", "all"))
        check_choice("fusion_target", self.fusion_target, ("current", "original"))
        self.preservation_grams()


@dataclass
class UCEConfig(MethodConfig):
    steps: int = option(1, "ignored: UCE is one closed-form solve", at_least=1)
    guide: list[str] = option([""], "what the erased concepts become: one guide for all or one per concept; '' is nothing (the template's other words)")
    pairing: str = option(
        "position",
        "token pairs: position (from the concept's last sub-token on, each position with the guide prompt's at the same position), "
        "tails (the 2023 reference: tail from the last word paired with the guide prompt's tail from its last word) "
        "or last (the 2025 reference: each prompt's last word alone, preserved prompts too)",
    )
    lam: float = option(0.5, "lambda: pull of every projection towards its original weights; 0 where the preservation terms make the system solvable")
    erase_scale: float = option(1.0, "weight of each erased prompt's tokens", positive=True)
    preserve_scale: float = option(0.1, "weight of each preserved prompt's tokens (preserved concepts, the empty prompt, preserve_gram)")
    preserve_scale_by_count: bool = option(False, "the 2023 reference's preserve scale, max(0.1, 1 / number of preserved prompts, the empty one included), in place of preserve_scale")
    preserve_empty: bool = option(True, "also preserve the empty prompt (classifier-free guidance's unconditional branch), as the 2023 reference does")
    preserve_gram: str = option("", PRESERVE_GRAM_HELP)
    batch_size: int = option(64, "prompts encoded at a time", at_least=1)

    def prompt_concepts(self) -> list[str]:
        return super().prompt_concepts() + [g for g in dict.fromkeys(self.guide) if g]

    def guides(self) -> list[str]:
        """The guide of each erased concept."""
        return per_concept("guide", self.guide, self.concepts)

    def preservation_grams(self) -> list[tuple[str, float]]:
        return weighted_paths("preserve_gram", self.preserve_gram)

    def input_paths(self) -> list[str]:
        return super().input_paths() + [path for path, _ in self.preservation_grams()]

    def __post_init__(self):
        super().__post_init__()
        self.guides()  # refuses a guide list that fits neither one for all nor one per concept
        check_choice("pairing", self.pairing, UCE_PAIRINGS)
        self.preservation_grams()
