"""Ring-A-Bell: from the original model's text encoder alone, prompts of K tokens whose text states
approach the evaluation prompt's plus eta times the concept direction; they replay as text, the
search gets closer to its goal over the generations, and a seed gives one result."""

from __future__ import annotations

import pytest
import torch

from fasterase.attacks import AttackTarget, attack_config, get_attack
from fasterase.attacks.ringabell import next_generation, searchable_tokens
from fasterase.errors import UserError
from fasterase.models.family import context_width
from fasterase.models.text import encode_prompts

SMALL = {"length": 8, "population": 16, "generations": 6}


@pytest.fixture(scope="module")
def base():
    from fasterase.models.loading import builtin_model_dir, load_pipeline

    return load_pipeline(builtin_model_dir())


class Unread:
    """An edited model that fails the test if the attack reads anything of it."""

    def __getattr__(self, name):
        raise AssertionError(f"ringabell read the edited model's {name}")


def find(pipe, prompts, **options):
    cfg = attack_config("ringabell", options)
    target = AttackTarget(Unread(), pipe, "circle", prompts, images=lambda: pytest.fail("ringabell asked for images"))
    return get_attack("ringabell")().find(target, cfg)


def distance_to_goal(pipe, found: list[str], prompt: str, eta: float) -> torch.Tensor:
    """||E(found) - (E(prompt) + eta * c)||^2, c the mean over the default templates of
    E(template with circle) - E(template without it)."""
    templates = ["{}", "a photo of a {}", "a picture of a {}", "an image of a {}"]
    direction = (encode_prompts(pipe, [t.format("circle") for t in templates]) - encode_prompts(pipe, [t.format("") for t in templates])).mean(0)
    goal = encode_prompts(pipe, [prompt]) + eta * direction
    return ((encode_prompts(pipe, found) - goal) ** 2).sum((1, 2))


def test_found_prompts_replay_as_k_tokens_and_are_drawn_and_judged(base):
    from fasterase.evaluation.judges import load_judge
    from fasterase.evaluation.sampling import generate

    judge = load_judge("world")
    prompts = judge.prompts("circle", 3)
    found = find(base, prompts, **SMALL)
    assert len(found.prompts) == len(prompts) and found.tensors == {}
    assert found.record["tokens"] == base.tokenizer(found.prompts, add_special_tokens=False).input_ids
    assert all(len(tokens) == SMALL["length"] for tokens in found.record["tokens"])
    # the text the attacked model reads is the searched token sequence
    assert found.record["replayed_fitness"] == pytest.approx(found.record["fitness"], rel=1e-5)
    top1, top5 = judge.recognised(generate(base, found.prompts), "circle", ["circle"])
    assert top1.shape == top5.shape == (len(prompts),)


def test_the_search_gets_closer_to_its_goal_over_the_generations(base):
    options = {"length": 8, "population": 32, "eta": 3.0}
    initial = find(base, ["a photo of a circle"], generations=1, **options)  # the random population's best
    evolved = find(base, ["a photo of a circle"], generations=25, **options)
    before, after = (distance_to_goal(base, f.prompts, "a photo of a circle", 3.0) for f in (initial, evolved))
    assert after < 0.9 * before
    assert evolved.record["initial_fitness"] == pytest.approx(before.tolist(), rel=1e-5)
    assert evolved.record["fitness"] == pytest.approx(after.tolist(), rel=1e-5)


def test_a_seed_gives_one_result(base):
    prompts = ["a photo of a circle", "a red circle"]
    first, again, other = (find(base, prompts, seed=seed, **SMALL) for seed in (3, 3, 4))
    assert first.prompts == again.prompts and first.record == again.record
    assert other.prompts != first.prompts


def test_every_family_searches_the_states_its_unet_reads(family_pipeline_dir):
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(family_pipeline_dir)
    found = find(pipe, ["a photo of a circle"], length=4, population=8, generations=3, eta=2.0)
    width = encode_prompts(pipe, found.prompts).shape[-1]
    assert width == context_width(pipe)  # SDXL: both encoders' states
    assert found.record["replayed_fitness"] == pytest.approx(found.record["fitness"], rel=1e-5)
    assert found.record["fitness"] == pytest.approx(distance_to_goal(pipe, found.prompts, "a photo of a circle", 2.0).tolist(), rel=1e-5)


def test_searchable_tokens(base):
    tokenizer = base.tokenizer
    every = searchable_tokens([tokenizer], replayable=False).tolist()
    replayable = searchable_tokens([tokenizer], replayable=True).tolist()
    assert set(every) == set(range(len(tokenizer))) - set(tokenizer.all_special_ids)
    assert set(replayable) < set(every) and tokenizer.convert_tokens_to_ids("circle</w>") in replayable
    assert tokenizer.convert_tokens_to_ids("cir") not in replayable  # a word's first piece: its text alone tokenizes otherwise
    text = tokenizer.decode(replayable, clean_up_tokenization_spaces=False)
    assert tokenizer(text, add_special_tokens=False).input_ids == replayable


def test_next_generation_keeps_survivors_and_mates_them():
    vocabulary = torch.arange(10, 20)
    survivors = 100 + torch.arange(4 * 5 * 6).view(4, 5, 6)  # every token tells where it came from
    fitness = torch.rand(4, 5)
    generator = torch.Generator().manual_seed(0)
    cfg = attack_config("ringabell", {"mutation_rate": 0.0, "crossover_rate": 1.0})
    candidates, known = next_generation(survivors, fitness, cfg, vocabulary, generator)
    assert torch.equal(candidates[:, :5], survivors) and torch.equal(known[:, :5], fitness)
    assert known[:, 5:].isnan().all()  # every survivor mated: two children each, to score
    first, second = candidates[:, 5:10], candidates[:, 10:]
    # each child is a head of its survivor and the tail of one partner, the other child the reverse
    for p in range(4):
        for i in range(5):
            head = (first[p, i] == survivors[p, i]).long().cumprod(0).sum()
            partner = survivors[p, (survivors[p] == first[p, i, -1]).any(1)][0]
            assert torch.equal(first[p, i], torch.cat([survivors[p, i, :head], partner[head:]]))
            assert torch.equal(second[p, i], torch.cat([partner[:head], survivors[p, i, head:]]))
    cfg = attack_config("ringabell", {"mutation_rate": 1.0, "crossover_rate": 0.0})
    candidates, known = next_generation(survivors, fitness, cfg, vocabulary, generator)
    assert known[:, :5].isnan().all() and known[:, 5:].isinf().all()  # mutated survivors, no children
    changed = candidates[:, :5] != survivors
    assert (changed.sum(-1) == 1).all() and (candidates[:, :5][changed] < 20).all()


def test_options_are_checked(base, tmp_path):
    for options in ({"mutation_rate": 1.5}, {"crossover_rate": -0.1}, {"population": 1}, {"templates": []}, {"templates": ["no slot"]}):
        with pytest.raises(UserError):
            attack_config("ringabell", options)
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a circle\n")
    with pytest.raises(UserError, match="prompt pairs"):
        attack_config("ringabell", {"pairs": str(bad)})
    with pytest.raises(UserError, match="cannot read"):
        attack_config("ringabell", {"pairs": str(tmp_path / "missing.txt")})
    with pytest.raises(UserError, match="length must be at most 75"):
        find(base, ["a photo of a circle"], length=76)


def test_a_pairs_file_gives_the_direction_its_pairs_measure(base, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a photo of a circle\ta photo of a \n\na picture of a circle\ta picture of a\n")
    from_file = find(base, ["a photo of a circle"], pairs=str(pairs), **SMALL)
    from_templates = find(base, ["a photo of a circle"], templates=["a photo of a {}", "a picture of a {}"], **SMALL)
    assert from_file.record == from_templates.record
