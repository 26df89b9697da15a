"""MACE: mass concept erasure (Lu et al., 2024), in three stages over the cross-attention keys and
values of the UNet.

1. Closed-form refinement (CFR). Every to_k/to_v projection W is replaced by the ridge solution
   (`fasterase.closed_form`) that sends the text embeddings of each concept's prompts where W sends
   the same prompts with the mapping concept in its place, keeps W on the preserved prompts (the
   preserved concepts', the empty prompt's, and optionally cached Grams of many prompts, each with
   its weight), and stays near W (lambda; 0 where the preservation terms make the system
   solvable, as in the reference's celebrity, art and nudity settings). Which tokens pair with
   which is `pairing` (`fasterase.models.token_pairs.MACE_PAIRINGS`): by position (the default:
   every position with the mapping prompt's at the same position, so the positions before the
   concept, the same in both prompts since the text encoder is causal, stay where W sends them),
   or aligned as the reference aligns them (common prefix and suffix in order, the padding after,
   and the concept's own sub-tokens without a target). For the default empty mapping, pairing by
   position kept the other shapes best in UCE on the built-in world. The reference weighs the
   preservation terms of this stage by its scale squared (it applies it twice):
   square_refinement_scale. Every projection shares the Grams: one accumulation, one
   factorisation, W* = W M for all. The default mapping is the empty concept: it needs no word of
   any vocabulary, so it works on any model, and it sends the concept towards what the template
   alone draws.
2. One rank-r LoRA per concept on every cross-attention to_k and to_v (peft), trained so that image
   positions stop attending to the concept's tokens: the loss is the captured sum of squared
   attention probabilities on them (`fasterase.attention.AttentionCapture`), inside the concept's
   masks when the images have masks. Timesteps are drawn with the reference's concept-focal
   importance density, sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)). All concepts train in the
   same step: their LoRAs are the slices of one peft LoRA of rank r x concepts, and each batch item
   sees only its own concept's slice (a fixed 0/1 mask on the rank dimension, applied before the
   up projection), so a step is one forward and backward of fixed shape over every concept's
   items, and each concept's factors receive only its own items' gradients. Under torchrun,
   concept k trains in process k mod N, on the items and from the initial LoRA one process would
   give it: the concepts are independent until the fusion, which every process then runs.
3. Fusion. The LoRAs are merged into one set of to_k/to_v weights by the same ridge solve: each
   concept's prompt tokens are sent where the refined weights plus that concept's LoRA send them
   (`fasterase.lora.fuse_loras`: no dense B A is formed), with the same preservation terms at
   preserve_scale. `fusion_positions` tail (the default) fuses the positions from the concept on
   and keeps those before it; all (the reference) fuses every position of the concept's prompts:
   then a LoRA's change of the start token, which every prompt shares, reaches every prompt (on
   the built-in world, lr 1e-2, PSR-1 fell to 0.03 that way, 0.53 the default way).
   `fusion_target` says where the preserved tokens' projections are kept: at the refined weights
   (current, the default) or at the base model's (original, as the reference's caches of the
   original model's outputs do).

The edit is the fused to_k/to_v weights.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..attention import AttentionCapture, capture_processors
from ..closed_form import RidgeGrams, edit_weights, gram, mapping_matrix, preserved_prompts, prompt_gram, weighted_grams
from ..concept_images import ConceptImages, concept_images
from ..distributed import all_gather, ranks
from ..errors import UserError
from ..lora import fuse_loras, lora_state_dict
from ..models.family import Conditioning, denoise, encode, noise_scheduler
from ..models.text import concept_tail, encode_prompts, token_columns
from ..models.token_pairs import MACE_PAIRINGS
from . import ErasureResult, Method, Progress, register
from .configs import MACEConfig
from .parameters import select_parameters
from .training import Optimization, autocast, run_steps, trainable


def focal_timesteps(num_train_timesteps: int, shape: tuple[int, ...], generator: torch.Generator, focal: bool = True) -> torch.Tensor:
    """Timesteps drawn from MACE's concept-focal density over 0 .. num_train_timesteps - 1,
    proportional to sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)): the steps where the
    concept's layout forms (or uniformly, when not focal)."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    density = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400)) if focal else torch.ones_like(t)
    return torch.multinomial(density, math.prod(shape), replacement=True, generator=generator).view(shape)


ADAPTER = "mace"


@dataclass
class ConceptLoRAs:
    """One rank-r LoRA per concept on every cross-attention to_k/to_v, held as the slices of one
    peft LoRA of rank concepts x r: concept k owns rank components k*r ... (k+1)*r - 1."""

    layers: dict[str, nn.Module]  # projection module name -> its peft LoRA layer
    rank: int
    item_mask: torch.Tensor  # (B, concepts x r): which components each batch item goes through

    def route(self, concept_of_item: torch.Tensor) -> None:
        """From now on batch item b goes through concept_of_item[b]'s LoRA alone."""
        concepts = self.item_mask.shape[1] // self.rank
        self.item_mask = nn.functional.one_hot(concept_of_item, concepts).repeat_interleave(self.rank, 1).to(self.item_mask)

    def parameters(self) -> dict[str, nn.Parameter]:
        return {f"{name}.lora_{part}": getattr(layer, f"lora_{part}")[ADAPTER].weight for name, layer in self.layers.items() for part in "AB"}

    def factors(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Concept k's LoRA: for every projection weight, (up (d_out, r), down (r, d)), scale folded in."""
        part = slice(k * self.rank, (k + 1) * self.rank)
        return {
            f"{name}.weight": (layer.lora_B[ADAPTER].weight[:, part].detach() * layer.scaling[ADAPTER], layer.lora_A[ADAPTER].weight[part].detach())
            for name, layer in self.layers.items()
        }


@contextlib.contextmanager
def concept_loras(unet, concepts: int, rank: int, seed: int = 0) -> Iterator[ConceptLoRAs]:
    """A block in which every cross-attention to_k/to_v of `unet` carries the concepts' LoRAs
    (peft's default init: up factors zero, down factors random, drawn from `seed`); each item's text goes through its own concept's LoRA,
    the mask applied between the down and up projections. On exit the UNet gets its own projection
    modules back."""
    targets = sorted({name.rsplit(".", 1)[0] for name in select_parameters(unet, "cross_attention_kv")})
    originals = {t: unet.get_submodule(t) for t in targets}
    # peft takes 3-4 s to import: only when LoRAs are trained, not for every command's start
    from peft import LoraConfig, inject_adapter_in_model

    had_config = hasattr(unet, "peft_config")
    config = LoraConfig(r=concepts * rank, lora_alpha=concepts * rank, lora_dropout=0.0, target_modules=targets)
    with torch.random.fork_rng(devices=[unet.device] if unet.device.type == "cuda" else []):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    loras = ConceptLoRAs({t: unet.get_submodule(t) for t in targets}, rank, torch.ones(1, concepts * rank, device=unet.device, dtype=unet.dtype))

    def select(module, args):
        (x,) = args  # (B, tokens, concepts x r)
        return (x * loras.item_mask[:, None, :],)

    hooks = [layer.lora_B[ADAPTER].register_forward_pre_hook(select) for layer in loras.layers.values()]
    try:
        yield loras
    finally:
        for hook in hooks:
            hook.remove()
        for target, module in originals.items():
            parent, _, child = target.rpartition(".")
            setattr(unet.get_submodule(parent), child, module)
        unet.peft_config.pop(ADAPTER, None)
        if not had_config and not unet.peft_config:
            del unet.peft_config


@register
class MACE(Method):
    name = "mace"
    shares_work = True

    def erase(self, pipe, cfg: MACEConfig, progress: Progress | None = None) -> ErasureResult:
        unet, device = pipe.unet, pipe.device
        if not cfg.concepts:
            raise UserError("mace needs at least one concept to erase")
        cached = weighted_grams(cfg.preservation_grams(), pipe)
        images = concept_images(
            pipe, cfg.concepts, cfg.images, cfg.masks, count=cfg.image_count, templates=cfg.templates,
            sampling=cfg.sampling(),
        )
        concepts = [c for c in cfg.concepts for _ in cfg.templates]
        prompts = [t.format(c) for c in cfg.concepts for t in cfg.templates]  # concept-major
        with torch.no_grad():
            context = encode(pipe, prompts)
            states = context.states  # what cross-attention reads: the closed forms solve over it
            # P: the preserved prompts' and caches' tokens, before preserve_scale
            kept = preserved_prompts(cfg)
            preserved = prompt_gram(pipe, kept) if kept else torch.zeros(states.shape[-1], states.shape[-1], dtype=torch.float64, device=device)
            if cached is not None:
                preserved += cached
        weights = select_parameters(unet, "cross_attention_kv")
        original = {n: p.detach().clone() for n, p in weights.items()} if cfg.fusion_target == "original" else None
        refinement_scale = cfg.preserve_scale**2 if cfg.square_refinement_scale else cfg.preserve_scale
        self._refine(pipe, cfg, concepts, prompts, states, refinement_scale * preserved, weights)
        loras = self._train(pipe, cfg, images, prompts, context, progress)
        with torch.no_grad():
            fusion_preserved = cfg.preserve_scale * preserved
            if cfg.fusion_positions == "all":
                fused_positions = torch.ones(states.shape[:2], dtype=torch.bool, device=device)
            else:
                # From the concept on; before it a prompt's states are those of any prompt with the
                # same beginning (the text encoder is causal): those keep their projections.
                fused_positions = concept_tail(pipe.tokenizer, prompts, concepts).to(device)
                fusion_preserved = fusion_preserved + gram(states, ~fused_positions)
            by_concept = (len(cfg.concepts), len(cfg.templates), *states.shape[1:])
            concept_grams = [gram(own, mask) for own, mask in zip(states.view(by_concept), fused_positions.view(by_concept[:3]))]
            fused = fuse_loras(
                {n: p.detach() for n, p in weights.items()}, loras, concept_grams, fusion_preserved, cfg.lam, cfg.op_backend("ridge_solve"), original
            )
            for name, value in fused.items():
                weights[name].copy_(value)
        separate = {c: lora_state_dict(factors) for c, factors in zip(cfg.concepts, loras)} if cfg.save_loras else {}
        return ErasureResult(tensors={f"unet.{name}": value.detach().cpu().clone() for name, value in fused.items()}, loras=separate)

    @staticmethod
    @torch.no_grad()
    def _refine(pipe, cfg: MACEConfig, concepts: list[str], prompts: list[str], states: torch.Tensor, preserved: torch.Tensor, weights: dict) -> None:
        """Stage 1: every to_k/to_v W becomes W M, M the one ridge solution that sends the concepts'
        prompt tokens where W sends the mapping prompts' tokens they are paired with (`pairing`),
        keeping W on the `preserved` Gram."""
        targets = [t.format(m) for m in cfg.mappings() for t in cfg.templates]
        pairs = MACE_PAIRINGS[cfg.pairing].edited(pipe.tokenizer, prompts, concepts, targets)
        grams = RidgeGrams.zeros(states.shape[-1], states.device)
        grams.add_edit(*pairs.states(states, encode_prompts(pipe, targets)))
        grams.preserved += preserved
        mapping = mapping_matrix(grams, cfg.lam, cfg.op_backend("ridge_solve"))
        for name, value in edit_weights({n: p.detach() for n, p in weights.items()}, mapping).items():
            weights[name].copy_(value)

    @staticmethod
    def _train(pipe, cfg: MACEConfig, images: ConceptImages, prompts: list[str], context: Conditioning, progress: Progress | None):
        """Stage 2: every concept's LoRA, trained together; returns per concept, for every
        projection, its factors (up (d_out, r), down (r, d)), the LoRA's scale folded in."""
        unet, device = pipe.unet, pipe.device
        count, templates = len(cfg.concepts), len(cfg.templates)
        columns = token_columns(pipe.tokenizer, prompts, [c for c in cfg.concepts for _ in cfg.templates], cfg.include_end).to(device)

        generator = torch.Generator().manual_seed(cfg.seed)
        scheduler = noise_scheduler(pipe)
        timesteps = functools.partial(focal_timesteps, scheduler.config.num_train_timesteps, focal=cfg.importance_sampling)
        items = images.draw_items(count, templates, cfg.steps, cfg.batch_size, timesteps, generator)
        # Under torchrun, concept k trains in process k mod N on the items one process would give
        # it, from the same initial LoRA: the concepts are independent until the fusion.
        rank, size = ranks()
        own = [k for k in range(count) if k % size == rank]
        kept = items.concept.cpu().remainder(size) == rank
        image, prompt, timestep, noise = (t[:, kept.to(t.device)] for t in (items.image, items.prompt, items.timestep, items.noise))

        capture = AttentionCapture(columns[:0])
        mixed_precision = autocast(device, cfg.dtype)
        with concept_loras(unet, count, cfg.rank, cfg.seed) as loras, capture_processors(unet, capture, cfg.op_backend("cross_attention")):
            loras.route(items.concept[kept.to(items.concept.device)])  # the same items' concepts every step
            params = loras.parameters()
            optimization = Optimization(params.values(), device, cfg.dtype, torch.optim.AdamW, lr=cfg.lr)

            def step(i: int) -> dict[str, torch.Tensor]:
                x = scheduler.add_noise(images.latents[image[i]], noise[i], timestep[i])
                capture.columns = columns[prompt[i]]
                capture.masks = None if images.masks is None else images.masks[image[i]]
                capture.stats.clear()
                with mixed_precision:
                    denoise(unet, x, timestep[i], context[prompt[i]])
                # The sum of the concepts' means: each LoRA gets the gradient of its own loss alone.
                loss = capture.watched_sq().view(len(own), cfg.batch_size).mean(1).sum()
                optimization.step(loss)
                return {"attention": loss.detach() / len(own)}

            if own:  # more processes than concepts leave some without any
                with trainable(params):
                    run_steps(step, cfg.steps, cfg.log_every, progress)
            trained = {k: {name: (up.cpu(), down.cpu()) for name, (up, down) in loras.factors(k).items()} for k in own}
        everyone = {k: factors for part in all_gather(trained) for k, factors in part.items()}
        return [{name: (up.to(device), down.to(device)) for name, (up, down) in everyone[k].items()} for k in range(count)]
