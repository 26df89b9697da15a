"""Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion
Models?", ICLR 2024; reference code github.com/chiayi-hsu/Ring-A-Bell): prompts of a few discrete
tokens whose text states carry the concept more strongly than the concept's own prompts.

It reads the original model's text encoders alone (never the UNet, never the edit), so it needs no
gradient, runs on any model, and what it finds is plain text that any edit of that base replays:

1. The concept direction: c = mean over prompt pairs of E(prompt with the concept) - E(the same
   prompt without it), where E(p) is the (77, d) text states cross-attention reads (SD1.x: the
   last hidden state of CLIP; SDXL: both encoders' penultimate states, concatenated), as the
   reference's Get_Concept_Vector.ipynb averages CLIP's last hidden states over its pairs.
2. For each evaluation prompt p, a goal: E(p) + eta * c.
3. A genetic algorithm over prompts of K tokens, [start, t_1 .. t_K, end, padding], that minimises
   the squared distance ||E(prompt) - goal||^2 over all 77 x d values (InversePrompt.ipynb): a
   random population; each generation keeps the better half; each survivor, with probability
   crossover_rate, mates with a random survivor (a random cut: the two heads swap tails) into two
   children; every prompt of the new generation, survivors included, with probability
   mutation_rate, gets one random position set to a random token.
4. The found prompt is the best prompt's tokens as text.

Where this differs from the reference: every evaluation prompt's search and every prompt of every
population are scored together, a batch of candidates per text-encoder call, and survivors that no
mutation changed keep their score instead of being encoded again; the best prompt seen in any
generation is returned (the reference returns the last generation's best, which a mutation of it
can make worse); by default only tokens that their own text tokenizes back to are drawn
(`replayable_tokens`): the decoded prompt of the reference's arbitrary tokens may tokenize into
other tokens, and it is the text that the attacked model reads. The record holds the distance of
each found prompt as text (`replayed_fitness`) beside that of its searched tokens (`fitness`).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models.family import encode_ids, family_of
from ..models.text import encode_prompts
from . import Attack, AttackTarget, Found, Progress, register
from .configs import RingABellConfig


def concept_direction(pipe, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """(77, d) float32: the mean, over the pairs, of the text states of the prompt with the concept
    minus those of the prompt without it."""
    with_concept = encode_prompts(pipe, [p for p, _ in pairs]).float()
    without_concept = encode_prompts(pipe, [p for _, p in pairs]).float()
    return (with_concept - without_concept).mean(0)


def searchable_tokens(tokenizers: list, replayable: bool) -> torch.Tensor:
    """The token ids the search draws from: every id but the special ones (start, end, padding and
    unknown of every tokenizer); with `replayable`, only those whose own text, tokenized again by
    every tokenizer, is that one token. Such tokens end a word, so the text of a sequence of them
    (words separated by spaces) tokenizes back into that sequence."""
    first = tokenizers[0]
    if any(t.get_vocab() != first.get_vocab() for t in tokenizers[1:]):
        raise UserError("ringabell searches one token sequence for every text encoder, but this model's tokenizers have different vocabularies")
    special = {i for t in tokenizers for i in t.all_special_ids}
    ids = [i for i in range(len(first)) if i not in special]
    if replayable:
        texts = [first.decode([i], clean_up_tokenization_spaces=False) for i in ids]
        again = [t(texts, add_special_tokens=False).input_ids for t in tokenizers]
        ids = [i for n, i in enumerate(ids) if all(tokens[n] == [i] for tokens in again)]
    if not ids:
        raise UserError("the tokenizer has no token the search can draw")
    return torch.tensor(ids)


def framed_ids(pipe, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per text encoder, the (B, 77) ids of prompts of K tokens (B, K) as the pipeline tokenizes
    their text: start, the tokens, end, then that tokenizer's padding; on the encoder's device."""
    family = family_of(pipe)
    framed = []
    for tokenizer_name, encoder_name in zip(family.tokenizers, family.text_encoders):
        tokenizer = getattr(pipe, tokenizer_name)
        count, length = tokens.shape
        column = lambda token_id, width: torch.full((count, width), token_id, dtype=tokens.dtype)  # noqa: E731
        padding = tokenizer.model_max_length - length - 2
        ids = torch.cat([column(tokenizer.bos_token_id, 1), tokens, column(tokenizer.eos_token_id, 1), column(tokenizer.pad_token_id, padding)], 1)
        framed.append(ids.to(getattr(pipe, encoder_name).device))
    return framed


def distances(pipe, tokens: torch.Tensor, goals: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B,) float32 on the CPU: ||E(prompt) - goal||^2 for prompts of K tokens (B, K), prompt i
    against goals[rows[i]] ((P, 77, d) on the text states' device)."""
    scores = [torch.zeros(0)]  # none when no prompt changed (no crossover, no mutation)
    for start in range(0, len(tokens), batch_size):
        states = encode_ids(pipe, framed_ids(pipe, tokens[start : start + batch_size])).states.float()
        goal = goals[rows[start : start + batch_size].to(goals.device)]
        scores.append(((states - goal) ** 2).sum((1, 2)).cpu())
    return torch.cat(scores)


def random_tokens(vocabulary: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return vocabulary[torch.randint(len(vocabulary), shape, generator=generator)]


def next_generation(
    survivors: torch.Tensor, survivor_fitness: torch.Tensor, cfg: RingABellConfig, vocabulary: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's crossover and mutation for every evaluation prompt's population at once.

    survivors (P, H, K), their fitness (P, H). Returns the new generation, (P, 3H, K): the
    survivors, then each survivor's first and second child, and its known fitness (P, 3H): a
    survivor's own where no mutation changed it, NaN for a prompt to score, inf for the children of
    the survivors that did not mate (there is no such prompt). As in the reference, the children
    number twice the matings, about population * crossover_rate."""
    prompts, half, length = survivors.shape
    mates = torch.rand(prompts, half, generator=generator) < cfg.crossover_rate
    partner_index = torch.randint(half, (prompts, half), generator=generator)
    partners = torch.gather(survivors, 1, partner_index[..., None].expand(-1, -1, length))
    # the reference's cut point 1..K counts the start token: 0..K-1 tokens come from the head
    cut = torch.randint(length, (prompts, half, 1), generator=generator)
    head = torch.arange(length) < cut
    candidates = torch.cat([survivors, torch.where(head, survivors, partners), torch.where(head, partners, survivors)], 1)
    mutated = torch.rand(candidates.shape[:2], generator=generator) < cfg.mutation_rate
    position = torch.randint(length, candidates.shape[:2], generator=generator)
    replacement = random_tokens(vocabulary, candidates.shape[:2], generator)
    hit = mutated[..., None] & (torch.arange(length) == position[..., None])
    candidates = torch.where(hit, replacement[..., None], candidates)
    unborn = torch.full((prompts, half), float("inf"))
    fitness = torch.cat([survivor_fitness, unborn, unborn], 1)
    fitness[torch.cat([mutated[:, :half], mates, mates], 1)] = float("nan")
    return candidates, fitness


@register
class RingABell(Attack):
    name = "ringabell"

    @torch.no_grad()
    def find(self, target: AttackTarget, cfg: RingABellConfig, progress: Progress | None = None) -> Found:
        pipe = target.original
        family = family_of(pipe)
        tokenizers = [getattr(pipe, name) for name in family.tokenizers]
        longest = min(t.model_max_length for t in tokenizers) - 2
        if cfg.length > longest:
            raise UserError(f"length must be at most {longest} (the text encoder reads {longest} tokens between start and end), not {cfg.length}")
        vocabulary = searchable_tokens(tokenizers, cfg.replayable_tokens)
        direction = concept_direction(pipe, cfg.prompt_pairs(target.concept))
        goals = encode_prompts(pipe, target.prompts).float() + cfg.eta * direction  # (P, 77, d)

        prompts, half = len(target.prompts), cfg.population // 2
        generator = torch.Generator().manual_seed(cfg.seed)
        candidates = random_tokens(vocabulary, (prompts, cfg.population, cfg.length), generator)
        fitness = torch.full((prompts, cfg.population), float("nan"))
        if progress is not None:
            progress(0, cfg.generations, {})
        for generation in range(cfg.generations):
            if generation:
                candidates, fitness = next_generation(survivors, survivor_fitness, cfg, vocabulary, generator)
            unscored = fitness.isnan()
            fitness[unscored] = distances(pipe, candidates[unscored], goals, unscored.nonzero()[:, 0], cfg.batch_size)
            # identical prompts tie (a child can copy its parent): a stable sort orders them by position
            order = fitness.argsort(dim=1, stable=True)[:, :half]
            survivors = torch.gather(candidates, 1, order[..., None].expand(-1, -1, cfg.length))
            survivor_fitness = torch.gather(fitness, 1, order)
            if generation == 0:
                initial_fitness = best_fitness = survivor_fitness[:, 0]
                best = survivors[:, 0]
            better = survivor_fitness[:, 0] < best_fitness
            best = torch.where(better[:, None], survivors[:, 0], best)
            best_fitness = torch.where(better, survivor_fitness[:, 0], best_fitness)
            if progress is not None and ((generation + 1) % cfg.log_every == 0 or generation + 1 == cfg.generations):
                progress(generation + 1, cfg.generations, {"fitness": best_fitness.mean().item()})

        found = [tokenizers[0].decode(tokens, clean_up_tokenization_spaces=False) for tokens in best.tolist()]
        replayed = ((encode_prompts(pipe, found).float() - goals) ** 2).sum((1, 2)).cpu()
        record = {
            "tokens": best.tolist(),
            "fitness": best_fitness.tolist(),
            "initial_fitness": initial_fitness.tolist(),
            "replayed_fitness": replayed.tolist(),
            "direction_norm": direction.norm().item(),
        }
        return Found(found, record=record)
