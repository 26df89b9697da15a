"""What the fine-tuning methods share: prompts per trajectory, training
schedules drawn up front, the trainable-parameter and mixed-precision blocks, the loop that reports
progress, and the whole training of methods whose objective is to match frozen predictions.

ESD and CA train the model so that, fed x_t from the frozen model's own trajectories and a
concept's prompt, it predicts a target that the frozen model gives (ESD: the negatively guided
prediction; CA: the anchor's prediction). They differ only in which prompts draw the trajectories
and what the target is, so `match_predictions` is their training; KPOP uses the pieces.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import UserError
from ..evaluation.sampling import chunk_size
from ..models.family import Conditioning, denoise, encode
from ..models.fingerprint import portable_name
from . import Progress
from .configs import TrajectoryConfig
from .trajectories import TrajectoryBank, sample_trajectories


def trajectory_prompts(templates: list[str], concepts: list[str], trajectories: int) -> list[str]:
    """One prompt per trajectory: `trajectories` per concept, concept-major, cycling through the
    templates. An empty concept stands for the empty prompt, whatever the template."""
    return [templates[i % len(templates)].format(c) if c else "" for c in concepts for i in range(trajectories)]


def concept_schedule(concept_of_entry: torch.Tensor, concepts: int, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, concepts * batch_size) bank positions: each step draws `batch_size` entries of every
    concept, so that every step carries all of them. Every concept must have as many entries."""
    by_concept = torch.stack([torch.nonzero(concept_of_entry.cpu() == k).flatten() for k in range(concepts)])
    picks = torch.randint(by_concept.shape[1], (steps, concepts, batch_size), generator=generator)
    return torch.gather(by_concept.expand(steps, -1, -1), 2, picks).flatten(1).to(concept_of_entry.device)


def uniform_schedule(entries: int, steps: int, size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(steps, size) positions drawn uniformly from `entries` bank entries (none when size is 0)."""
    return torch.randint(max(1, entries), (steps, size), generator=generator).to(device)


def guided_away(neutral: torch.Tensor, concept: torch.Tensor, eta: float) -> torch.Tensor:
    """eps(c_n) - eta (eps(c_e) - eps(c_n)): a target past the neutral prediction, away from the
    concept's (ESD's negative guidance; eta 0 is the neutral prediction itself)."""
    return neutral - eta * (concept - neutral)


def autocast(device: torch.device, dtype: str):
    """Mixed precision when a lower dtype is asked for (`fasterase.erase` asks for one only on a
    GPU); float32 otherwise."""
    if dtype != "float32":
        return torch.autocast(device.type, dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


@contextlib.contextmanager
def trainable(params: dict[object, nn.Parameter]) -> Iterator[None]:
    """A block in which `params` take gradients as float32 master weights: in a model loaded in
    half precision they are upcast for the block (the forward computes with half-precision copies
    under `autocast`, and the optimizer's state is float32, so small updates are not lost to
    rounding). Afterwards the model is frozen again, in its own dtypes, with no gradients left
    behind, however the block ends."""
    dtypes = {name: p.dtype for name, p in params.items()}
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    try:
        yield
    finally:
        for name, p in params.items():
            p.requires_grad_(False)
            p.grad = None
            p.data = p.data.to(dtypes[name])


class Optimization:
    """An optimizer over a run's trainable tensors, in the run's precision. Under float16 on a GPU
    the loss is scaled, so that small gradients do not flush to zero in the half-precision backward
    (torch's GradScaler; with the fused optimizer it skips overflowing steps and adapts its scale
    on the device, with no host synchronisation). Elsewhere it is the plain optimizer."""

    def __init__(self, params, device: torch.device, dtype: str, optimizer: type = torch.optim.Adam, **options):
        """params: tensors, or param groups (dicts with their own options), as torch's optimizers take."""
        cuda = device.type == "cuda"
        params = list(params)
        self.optimizer = optimizer(params, fused=True, **options) if cuda else optimizer(params, **options)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cuda and dtype == "float16")
        self.reached: set[int] = set()  # ids of the tensors a loss has reached (that have had a gradient)

    def reached_by_loss(self, params: dict) -> dict:
        """Those of `params` that some step's loss depended on: the others are left as they were."""
        return {name: p for name, p in params.items() if id(p) in self.reached}

    def step(self, loss: torch.Tensor) -> None:
        """One update on `loss`."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.reached.update(id(p) for p in self.params if p.grad is not None)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def run_steps(step: Callable[[int], dict[str, torch.Tensor]], steps: int, log_every: int, progress: Progress | None) -> None:
    """Runs step(i) for every step; its losses stay on the device except every `log_every` steps
    (and at the last), when they are read for the progress callback and checked: a non-finite loss
    stops the run with a UserError that names its first step."""
    if progress is not None:
        progress(0, steps, {})
    finite = None  # (steps,) bool on the device: whether each step's losses were finite
    for i in range(steps):
        losses = step(i)
        if finite is None:
            finite = torch.ones(steps, dtype=torch.bool, device=next(iter(losses.values())).device)
        finite[i] = torch.stack([value.isfinite().all() for value in losses.values()]).all()
        if (i + 1) % log_every == 0 or i + 1 == steps:
            if not finite[: i + 1].all():
                first = int(torch.nonzero(~finite)[0]) + 1
                raise UserError(
                    f"stopped at step {first} of {steps}: the loss is not finite (nan or inf); with --fp16 try --bf16 or float32,"
                    " else a lower learning rate; nothing was written"
                )
            if progress is not None:
                progress(i + 1, steps, {name: value.item() for name, value in losses.items()})


def changed_tensors(component: str, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """An edit's tensors: the trained parameters, named "<component>.<portable parameter name>"."""
    return {f"{component}.{portable_name(component, name)}": p.detach().cpu().clone() for name, p in params.items()}


@dataclass
class PredictionTargets:
    """Training items: fed x_t at t and the text `context[bank.prompt_index]`, the trained model
    should predict `target`."""

    bank: TrajectoryBank
    context: Conditioning  # one row per prompt
    target: torch.Tensor  # (N, C, h, w), one per bank entry

    def inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """The UNet's inputs (x_t, t, conditioning) for the entries at positions `idx`."""
        return self.bank.latents[idx], self.bank.timesteps[idx], self.context[self.bank.prompt_index[idx]]


def join_inputs(parts: list[tuple[torch.Tensor, torch.Tensor, Conditioning]]) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Several batches of UNet inputs (x_t, t, conditioning) as one, in order."""
    latents, timesteps, context = zip(*parts)
    return torch.cat(latents), torch.cat(timesteps), Conditioning.cat(list(context))


def sample_banks(pipe, cfg: TrajectoryConfig, prompts: list[str]) -> tuple[TrajectoryBank, PredictionTargets | None]:
    """The frozen model's trajectories under `prompts` (one per trajectory, concept-major) and,
    in the same sampling, under the preserved concepts' prompts, with the targets that keep the
    frozen model's predictions on the latter (None when nothing is preserved)."""
    preserve_prompts = trajectory_prompts(cfg.templates, cfg.preserve, cfg.trajectories)
    bank = sample_trajectories(pipe, prompts + preserve_prompts, cfg.sample_steps, cfg.guidance, cfg.seed, chunk_size(pipe, cfg.sample_batch))
    if not cfg.preserve:
        return bank, None
    erased = bank.prompt_index < len(prompts)
    kept = bank.take(~erased)
    kept = dataclasses.replace(kept, prompt_index=kept.prompt_index - len(prompts))
    return bank.take(erased), PredictionTargets(kept, encode(pipe, preserve_prompts), kept.eps_prompt)


def match_predictions(
    unet,
    params: dict[str, nn.Parameter],
    erase: PredictionTargets,
    keep: PredictionTargets | None,
    cfg: TrajectoryConfig,
    progress: Progress | None,
) -> None:
    """Trains `params` of `unet` with Adam on ||eps'(x_t, c) - target||^2 over the erased
    concepts' items, plus preserve_weight times the same over the preserved ones. Each step is one
    forward and backward of fixed shape: `batch_size` items of every erased concept (concept k's
    items are bank prompts k * trajectories ... (k + 1) * trajectories - 1) and `batch_size`
    preserved items, all drawn before the loop."""
    device = erase.target.device
    generator = torch.Generator().manual_seed(cfg.seed)
    schedule = concept_schedule(erase.bank.prompt_index // cfg.trajectories, len(cfg.concepts), cfg.steps, cfg.batch_size, generator)
    keep_schedule = uniform_schedule(len(keep.bank) if keep else 0, cfg.steps, cfg.batch_size if keep else 0, generator, device)
    size = schedule.shape[1]
    optimization = Optimization(params.values(), device, cfg.dtype, lr=cfg.lr)
    mixed_precision = autocast(device, cfg.dtype)
    mse = nn.functional.mse_loss

    def step(i: int) -> dict[str, torch.Tensor]:
        idx, k = schedule[i], keep_schedule[i]
        # One forward carries the erased items, then the preserved ones.
        parts = [erase.inputs(idx)] + ([keep.inputs(k)] if keep else [])
        x, t, c = join_inputs(parts)
        with mixed_precision:
            pred = denoise(unet, x, t, c).float()
        losses = {"erase": mse(pred[:size], erase.target[idx])}
        loss = losses["erase"]
        if keep is not None:
            losses["keep"] = mse(pred[size:], keep.target[k])
            loss = loss + cfg.preserve_weight * losses["keep"]
        optimization.step(loss)
        return {name: value.detach() for name, value in losses.items()}

    with trainable(params):
        run_steps(step, cfg.steps, cfg.log_every, progress)
