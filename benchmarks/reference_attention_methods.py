"""Reference UCE, Forget-Me-Not and MACE, run the way their authors' code runs them, on our model,
for `bench_methods.py` to measure ours against (GitHub issue 14).

Each function takes the config our method gets and returns the changed tensors named as ours
names them, leaving `pipe` as it found it. It keeps the official loop's structure (batch 1, one
concept at a time, attention maps materialised and stored by a processor, one `torch.inverse` per
projection) and takes the objective and every setting from our config, so that both edits can
reach the same quality. It reuses our model plumbing (text encoding, the UNet call, token
positions, concept images) and none of our fast paths (AttentionCapture and its kernels, the
shared ridge solve, batched schedules, LoRA fusion).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fasterase.attention import cross_attention_processors
from fasterase.closed_form import preserved_prompts, weighted_grams
from fasterase.concept_images import ConceptImages, concept_images
from fasterase.methods.configs import FMNConfig, MACEConfig, UCEConfig
from fasterase.methods.mace import focal_timesteps
from fasterase.methods.parameters import select_parameters
from fasterase.methods.training import autocast, trainable
from fasterase.models.family import denoise, encode, noise_scheduler
from fasterase.models.fingerprint import portable_name
from fasterase.models.text import concept_tail, encode_prompts, token_columns
from fasterase.models.token_pairs import MACE_PAIRINGS, UCE_PAIRINGS

# A LoRA of the key/value projections: "<module>.weight" -> (up (d_out, r), down (r, d)).
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]

# The closed forms' sums and inverses. The official scripts run them in float32; ours in float64,
# because the text states' Grams are ill-conditioned: on the built-in world float32 moved UCE's
# edit by 0.4-3% of its size and MACE's fused edit by 3-7%; in float64 both agree with ours to
# 1e-7 or better. A precision that changes the result is a quality setting: we take ours.
SOLVE_DTYPE = torch.float64


def _key_value_weights(unet) -> dict[str, torch.Tensor]:
    """Every cross-attention to_k/to_v weight, by parameter name (their biases, if any, are left
    alone: a bias is added after the projection, so the edits do not change it)."""
    return {n: p.detach() for n, p in select_parameters(unet, "cross_attention_kv").items() if n.endswith(".weight")}


@torch.no_grad()
def reference_uce(pipe, cfg: UCEConfig) -> dict[str, torch.Tensor]:
    """UCE as unified-concept-editing's train-scripts/train_erase.py (edit_model) runs it: for
    each cross-attention projection W in turn, every erased prompt and its guide prompt are
    encoded again (inside the projection loop, as there), and

        mat1 = lam W + sum erase_scale (W t) c^T + sum preserve (W c_p) c_p^T,
        mat2 = lam I + sum erase_scale c c^T   + sum preserve c_p c_p^T,
        W*   = mat1 @ torch.inverse(mat2)

    From our config: the prompts (concept x template, guide in the concept's place), which token
    positions pair (`pairing`), the preserved prompts (preserved concepts, the empty prompt, cached
    Grams), lam, erase_scale, the preservation scale, and the precision (SOLVE_DTYPE). The result
    equals our UCE's up to round-off. The text states are encoded tens of times (projections x
    prompts), no UNet row is run.
    """
    tokenizer, pairing = pipe.tokenizer, UCE_PAIRINGS[cfg.pairing]
    edits = [(c, t.format(c), t.format(g)) for c, g in zip(cfg.concepts, cfg.guides()) for t in cfg.templates]
    preserved = preserved_prompts(cfg)
    scale = max(0.1, 1 / len(preserved)) if cfg.preserve_scale_by_count and preserved else cfg.preserve_scale
    cached = weighted_grams(cfg.preservation_grams(), pipe)
    edited = {}
    for name, weight in _key_value_weights(pipe.unet).items():
        w = weight.to(SOLVE_DTYPE)
        mat1 = cfg.lam * w
        mat2 = cfg.lam * torch.eye(w.shape[1], device=w.device, dtype=SOLVE_DTYPE)
        for concept, prompt, guide_prompt in edits:
            states = encode_prompts(pipe, [prompt, guide_prompt]).to(SOLVE_DTYPE)
            pairs = pairing.edited(tokenizer, [prompt], [concept], [guide_prompt])
            sources, targets = pairs.states(states[:1], states[1:])  # (P, d) each
            mat1 += cfg.erase_scale * (targets @ w.T).T @ sources
            mat2 += cfg.erase_scale * sources.T @ sources
        for prompt in preserved:
            states = encode_prompts(pipe, [prompt]).to(SOLVE_DTYPE)[0]
            kept = states[pairing.preserved(tokenizer, [prompt])[0].to(states.device)]
            mat1 += scale * (kept @ w.T).T @ kept
            mat2 += scale * kept.T @ kept
        if cached is not None:
            mat1 += scale * w @ cached.to(SOLVE_DTYPE)
            mat2 += scale * cached.to(SOLVE_DTYPE)
        edited[f"unet.{name}"] = (mat1 @ torch.inverse(mat2)).to(weight.dtype).cpu()
    return edited


class StoredMaps:
    """The official AttnController: during one UNet forward (batch 1), every cross-attention
    layer's attention probabilities on the watched text columns, stored in call order."""

    def __init__(self) -> None:
        self.columns: torch.Tensor | None = None  # (77,) bool: the watched text columns
        self.mask: torch.Tensor | None = None  # (1, 1, H, W) in [0, 1]: where the concept is, or None
        self.maps: list[torch.Tensor] = []  # (heads, Mq, watched) per layer

    def store(self, probs: torch.Tensor) -> None:
        self.maps.append(probs[..., self.columns])

    def loss(self) -> torch.Tensor:
        """Our methods' attention loss: the sum over layers, heads, image positions (weighted by
        the mask, resized to each layer's grid by area as ours resizes it) and watched columns of
        the squared probabilities."""
        total = torch.zeros((), device=self.maps[0].device)
        for probs in self.maps:
            squares = probs.float().square().sum(-1)  # (heads, Mq)
            if self.mask is not None:
                queries = probs.shape[1]
                rows = round(math.sqrt(queries * self.mask.shape[-2] / self.mask.shape[-1]))
                squares = squares * nn.functional.interpolate(self.mask.float(), size=(rows, queries // rows), mode="area").flatten(1)
            total = total + squares.sum()
        return total


class StoringProcessor:
    """Cross-attention as diffusers' AttnProcessor computes it, the probabilities materialised by
    `attn.get_attention_scores` and handed to `maps` (the official FMN and MACE processors); with
    `lora`, its low-rank terms added to the key and value projections, as MACE's LoRAAttnProcessor
    adds them."""

    def __init__(self, maps: StoredMaps, lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.maps = maps
        self.lora = lora  # "to_k" / "to_v" -> (up, down)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        text = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key, value = attn.to_k(text), attn.to_v(text)
        if self.lora is not None:
            key, value = key + self._low_rank("to_k", text), value + self._low_rank("to_v", text)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        probs = attn.get_attention_scores(query, attn.head_to_batch_dim(key), attention_mask)  # (B heads, Mq, 77)
        self.maps.store(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(value)))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _low_rank(self, projection: str, text: torch.Tensor) -> torch.Tensor:
        up, down = self.lora[projection]
        return text @ down.T.to(text.dtype) @ up.T.to(text.dtype)


def _attention_steps(
    pipe, cfg: FMNConfig | MACEConfig, images: ConceptImages, concepts: list[int], params: dict[str, torch.Tensor],
    processors: Callable[[str], StoringProcessor], maps: StoredMaps, timestep: Callable[[torch.Generator], torch.Tensor],
    generator: torch.Generator,
) -> set[str]:
    """cfg.steps AdamW updates of `params` on the attention loss of `concepts` (indices into
    cfg.concepts). Each update accumulates cfg.batch_size items of every one of them, concept by
    concept, each drawn inside the step as the official data loaders draw them (one of the
    concept's images, one of its prompts, encoded then, a timestep from `timestep`, fresh noise)
    and run through the UNet at batch 1: accelerate's gradient accumulation over our batch. The
    names of the parameters the loss reached (the others are left as they were)."""
    unet, device = pipe.unet, pipe.device
    scheduler = noise_scheduler(pipe)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.dtype == "float16")
    items = len(concepts) * cfg.batch_size
    with cross_attention_processors(unet, processors):
        for _ in range(cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            for k in concepts:
                own = torch.nonzero(images.concept_index.cpu() == k).flatten()
                for _ in range(cfg.batch_size):
                    image = int(own[torch.randint(len(own), (1,), generator=generator)])
                    prompt = cfg.templates[int(torch.randint(len(cfg.templates), (1,), generator=generator))].format(cfg.concepts[k])
                    t = timestep(generator).to(device)
                    latents = images.latents[image : image + 1]
                    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
                    with torch.no_grad():
                        context = encode(pipe, [prompt])
                    maps.columns = token_columns(pipe.tokenizer, [prompt], [cfg.concepts[k]], cfg.include_end)[0].to(device)
                    maps.mask = None if images.masks is None else images.masks[image : image + 1]
                    maps.maps.clear()
                    with autocast(device, cfg.dtype):
                        denoise(unet, scheduler.add_noise(latents, noise, t), t, context)
                    scaler.scale(maps.loss() / items).backward()
            reached = {name for name, p in params.items() if p.grad is not None}
            scaler.step(optimizer)
            scaler.update()
    maps.maps.clear()
    return reached


def reference_fmn(pipe, cfg: FMNConfig) -> dict[str, torch.Tensor]:
    """Forget-Me-Not as SHI-Labs/Forget-Me-Not's src/train_attn.py runs it: the concept's images
    up front; every step draws an image, a prompt, a uniform timestep and noise, encodes the
    prompt, and runs the UNet at batch 1 through a processor that materialises softmax(Q K^T) in
    every cross-attention layer and stores its maps on the concept's token columns (the
    reference's AttnController); the loss is made of the stored maps; AdamW.

    From our config: the images (`concept_images`: drawn by the base model or read, masks as
    asked), the templates, the watched columns (the concept's sub-tokens and, with include_end,
    end of text and padding), the loss (the sum of squared probabilities, not the reference's
    norm of them), the trainable set, lr, steps and seed; no gradient clipping (ours has none). A
    step carries batch_size items of every concept, as ours does, each run alone and their
    gradients accumulated. Textual inversion (inversion_steps > 0) is not part of this reference.
    """
    if cfg.inversion_steps:
        raise NotImplementedError("reference_fmn re-steers the concept's own tokens: run it with inversion_steps=0")
    unet = pipe.unet
    images = concept_images(pipe, cfg.concepts, cfg.images, cfg.masks, count=cfg.image_count, templates=cfg.templates, sampling=cfg.sampling())
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = noise_scheduler(pipe).config.num_train_timesteps
    params = select_parameters(unet, cfg.trainable)
    original = {name: p.detach().clone() for name, p in params.items()}
    maps = StoredMaps()
    try:
        with trainable(params):
            reached = _attention_steps(
                pipe, cfg, images, list(range(len(cfg.concepts))), params, lambda name: StoringProcessor(maps), maps,
                lambda g: torch.randint(steps, (1,), generator=g), generator,
            )
        return {f"unet.{portable_name('unet', name)}": params[name].detach().cpu().clone() for name in reached}
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(original[name])


def reference_mace(pipe, cfg: MACEConfig) -> dict[str, torch.Tensor]:
    """MACE as Shilin-LU/MACE runs it (src/cfr_lora_training.py, src/cfr_utils.py,
    src/fuse_lora_close_form.py), in three stages:

    1. closed-form refinement: for each cross-attention projection W in turn,
       W* = (lam W + sum v c^T + s W P) @ torch.inverse(lam I + sum c c^T + s P), where c are the
       concept prompts' states and v = W t the projections of the paired mapping prompts' states
       (prepare_k_v and closed_form_refinement);
    2. one LoRA per concept on every cross-attention to_k/to_v, trained on the refined weights,
       one concept after another, each with its own AdamW: every step runs the UNet at batch 1
       through a processor that materialises the attention probabilities and stores their maps
       on the concept's columns (the reference's processor also materialises, without storing,
       the self-attention probabilities; here self-attention keeps diffusers' processor);
    3. fusion: each LoRA merged densely into the refined weights (W + B A, diffusers' fuse_lora),
       the concept's prompts' projections taken from it, and for each projection in turn
       W* = (lam W + sum (W + B_k A_k) c c^T + s T P) @ torch.inverse(lam I + sum c c^T + s P),
       T the refined or (fusion_target original) the base weights.

    From our config: prompts (concept x template, the mapping in the concept's place), the token
    pairs of stage 1 (`pairing`), the precision of the closed forms (SOLVE_DTYPE), the preserved
    prompts (preserved concepts, the empty prompt, cached Grams; every position) and their scales
    (squared in stage 1 with square_refinement_scale), lam, the fused positions (`fusion_positions`; tail keeps the
    positions before the concept at T), the images and masks (`concept_images`), the loss (our
    sum of squared probabilities on the watched columns, inside the masks resized by area), the
    timestep density, rank, lr, steps, batch_size (accumulated over batch-1 items, as in
    `reference_fmn`) and seed; no gradient clipping. Returns the fused to_k/to_v weights.
    """
    images = concept_images(pipe, cfg.concepts, cfg.images, cfg.masks, count=cfg.image_count, templates=cfg.templates, sampling=cfg.sampling())
    generator = torch.Generator().manual_seed(cfg.seed)
    params = {n: p for n, p in select_parameters(pipe.unet, "cross_attention_kv").items() if n.endswith(".weight")}
    original = {name: p.detach().clone() for name, p in params.items()}
    kept = preserved_prompts(cfg)
    with torch.no_grad():
        preserved_states = encode_prompts(pipe, kept).flatten(0, 1).to(SOLVE_DTYPE) if kept else None  # every position
        cached = weighted_grams(cfg.preservation_grams(), pipe)
    refinement_scale = cfg.preserve_scale**2 if cfg.square_refinement_scale else cfg.preserve_scale
    refined = _refine(pipe, cfg, original, preserved_states, cached, refinement_scale)
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(refined[name])
        loras = [_train_lora(pipe, cfg, images, k, generator) for k in range(len(cfg.concepts))]
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(original[name])
    return _fuse(pipe, cfg, refined, loras, original, preserved_states, cached)


def _preserved_terms(w: torch.Tensor, target: torch.Tensor, states: torch.Tensor | None, cached: torch.Tensor | None, scale: float):
    """The preservation terms of one projection: scale (T P, P), P = sum c c^T over the preserved
    prompts' states (and the cached Grams), T the weight whose projections are kept."""
    mat1, mat2 = torch.zeros_like(w), torch.zeros(w.shape[1], w.shape[1], device=w.device, dtype=SOLVE_DTYPE)
    if states is not None:
        mat1 += (states @ target.T).T @ states
        mat2 += states.T @ states
    if cached is not None:
        mat1 += target @ cached.to(SOLVE_DTYPE)
        mat2 += cached.to(SOLVE_DTYPE)
    return scale * mat1, scale * mat2


@torch.no_grad()
def _refine(pipe, cfg: MACEConfig, weights: dict[str, torch.Tensor], preserved_states, cached, scale: float) -> dict[str, torch.Tensor]:
    """Stage 1: one closed form and one torch.inverse per projection."""
    pairing = MACE_PAIRINGS[cfg.pairing]
    # prepare_k_v: per concept, its prompts and their mapping prompts encoded together, the states paired
    paired = []
    for concept, mapping in zip(cfg.concepts, cfg.mappings()):
        prompts, targets = [t.format(concept) for t in cfg.templates], [t.format(mapping) for t in cfg.templates]
        states = encode_prompts(pipe, prompts + targets).to(SOLVE_DTYPE)
        pairs = pairing.edited(pipe.tokenizer, prompts, [concept] * len(prompts), targets)
        paired.append(pairs.states(states[: len(prompts)], states[len(prompts) :]))  # (P, d) each
    refined = {}
    for name, weight in weights.items():
        w = weight.to(SOLVE_DTYPE)
        mat1, mat2 = _preserved_terms(w, w, preserved_states, cached, scale)
        mat1 += cfg.lam * w
        mat2 += cfg.lam * torch.eye(w.shape[1], device=w.device, dtype=SOLVE_DTYPE)
        for sources, targets in paired:
            mat1 += (targets @ w.T).T @ sources
            mat2 += sources.T @ sources
        refined[name] = (mat1 @ torch.inverse(mat2)).to(weight.dtype)
    return refined


def _train_lora(pipe, cfg: MACEConfig, images: ConceptImages, k: int, generator: torch.Generator) -> Factors:
    """Stage 2 for concept k: its own rank-r LoRA of every cross-attention to_k/to_v (down
    factors uniform in +-1/sqrt(d), as nn.Linear and peft draw them; up factors zero), trained
    alone."""
    lora = {}
    for name, w in _key_value_weights(pipe.unet).items():
        down = (torch.rand(cfg.rank, w.shape[1], generator=generator) * 2 - 1) / math.sqrt(w.shape[1])
        lora[name] = (nn.Parameter(torch.zeros(w.shape[0], cfg.rank, device=w.device)), nn.Parameter(down.to(w.device)))
    params = {f"{name}.{part}": factor for name, factors in lora.items() for part, factor in zip(("up", "down"), factors)}
    maps = StoredMaps()

    def processor(layer: str) -> StoringProcessor:  # layer: "<module>.processor"
        module = layer.removesuffix(".processor")
        return StoringProcessor(maps, {p: lora[f"{module}.{p}.weight"] for p in ("to_k", "to_v")})

    steps = noise_scheduler(pipe).config.num_train_timesteps
    _attention_steps(
        pipe, cfg, images, [k], params, processor, maps,
        lambda g: focal_timesteps(steps, (1,), g, focal=cfg.importance_sampling), generator,
    )
    return {name: (up.detach(), down.detach()) for name, (up, down) in lora.items()}


@torch.no_grad()
def _fuse(pipe, cfg: MACEConfig, refined, loras: list[Factors], original, preserved_states, cached) -> dict[str, torch.Tensor]:
    """Stage 3: one closed form and one torch.inverse per projection, over every concept's LoRA."""
    # prepare_k_v(all_words=True): per concept, its prompts' states, split into fused and kept positions
    concept_states = []
    for concept in cfg.concepts:
        prompts = [t.format(concept) for t in cfg.templates]
        states = encode_prompts(pipe, prompts).to(SOLVE_DTYPE)
        if cfg.fusion_positions == "all":
            fused = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        else:
            fused = concept_tail(pipe.tokenizer, prompts, [concept] * len(prompts)).to(states.device)
        concept_states.append((states[fused], states[~fused]))
    result = {}
    for name, weight in refined.items():
        w = weight.to(SOLVE_DTYPE)
        target = w if cfg.fusion_target == "current" else original[name].to(SOLVE_DTYPE)
        mat1, mat2 = _preserved_terms(w, target, preserved_states, cached, cfg.preserve_scale)
        mat1 += cfg.lam * w
        mat2 += cfg.lam * torch.eye(w.shape[1], device=w.device, dtype=SOLVE_DTYPE)
        for (up, down), (fused, kept) in zip((lora[name] for lora in loras), concept_states):
            with_lora = w + up.to(SOLVE_DTYPE) @ down.to(SOLVE_DTYPE)  # the LoRA fused densely into the weight
            mat1 += (fused @ with_lora.T).T @ fused + (kept @ target.T).T @ kept
            mat2 += fused.T @ fused + kept.T @ kept
        result[f"unet.{name}"] = (mat1 @ torch.inverse(mat2)).to(weight.dtype).cpu()
    return result
