"""Attacks on erased models: the command, its report and replay file, bad input, and concept
inversion, which brings back what a text-encoder edit (fewshot) erased."""

from __future__ import annotations

import json

import pytest
import torch

from fasterase import api
from fasterase.attacks import ATTACK_CONFIGS, attack_config, load_found
from fasterase.cli import main
from fasterase.errors import UserError
from fasterase.models.loading import builtin_model_dir

from hand_made_edits import hand_made_edit

# Small enough for a test, enough for the built-in world's inversion to find the circle again.
INVERSION = {"steps": 60, "lr": 2e-2, "image_count": 4, "batch_size": 4, "sample_steps": 10}
SAMPLING = ["--sample-steps", "10"]


@pytest.fixture(scope="module")
def fewshot_edit(tmp_path_factory):
    """fewshot's erasure of the circle: it changes only the text encoder."""
    path = tmp_path_factory.mktemp("fewshot") / "fewshot.safetensors"
    api.erase("fewshot", ["circle"], out=path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(api, "load_pipeline", lambda *args, **kwargs: pytest.fail("a model was loaded before the input was checked"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fasterase: error: "), err
    return err


def test_attack_configs_and_presets():
    assert set(ATTACK_CONFIGS) == {"inversion", "prompt", "ringabell"}
    for name in ATTACK_CONFIGS:
        attack_config(name)
    with pytest.raises(UserError, match="unknown attack 'nope'; available: inversion, prompt, ringabell"):
        attack_config("nope")
    with pytest.raises(UserError, match="steps must be at least 1"):
        attack_config("inversion", {"steps": 0})


@pytest.mark.parametrize("extra, message", [
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["--attack", "inversion", "--set", "tokens=0"], "tokens must be at least 1"),
    (["--attack", "inversion", "--key", "{tmp}/edit.safetensors"], "this uce edit has no key: only KPOP edits"),
    (["--attack", "inversion", "--concept", "circle", "--replay", "{tmp}/x.safetensors"], "not allowed with argument"),
])
def test_bad_attack_commands(extra, message, tmp_path, capsys, monkeypatch):
    edit = hand_made_edit(builtin_model_dir(), tmp_path / "edit.safetensors")
    monkeypatch.setattr(api, "load_pipeline", lambda *args, **kwargs: pytest.fail("a model was loaded before the input was checked"))
    argv = ["attack", "--edit", str(edit), *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_edit_without_a_concept_needs_one_named(tmp_path, capsys, no_model):
    edit = hand_made_edit(builtin_model_dir(), tmp_path / "edit.safetensors", concepts=())
    assert main(["attack", "--edit", str(edit), "--attack", "inversion"]) == 2
    assert "this edit erases no concepts: say which to attack with --concept" in one_error_line(capsys)


@pytest.mark.slow
def test_inversion_brings_back_what_fewshot_erased(fewshot_edit, tmp_path, capsys):
    """Concept inversion never reads the erased word, so an edit of the text encoder alone falls
    to it: recognition goes from under 10% without the attack to at least 70% of the original's."""
    report = tmp_path / "report.json"
    argv = ["attack", "--edit", str(fewshot_edit), "--attack", "inversion", "--n", "16", "--report", str(report), "--json", *SAMPLING]
    for option, value in INVERSION.items():
        argv += ["--set", f"{option}={value}"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    outcome = result["attacks"]["inversion"]
    assert outcome["baseline"] < 0.10 <= 0.7 * outcome["original"] <= outcome["asr"], outcome
    assert json.loads(report.read_text()) == {k: v for k, v in result.items() if k != "report"}

    # what it found replays: the same prompts, word and seeds give the same images
    found = outcome["found"]
    attack_name, replayed, metadata = load_found(found)
    assert attack_name == "inversion" and metadata["concept"] == "circle" and len(replayed.prompts) == 16
    assert main(["attack", "--edit", str(fewshot_edit), "--replay", found, "--json", *SAMPLING]) == 0
    again = json.loads(capsys.readouterr().out)["attacks"]["inversion"]
    assert again["asr"] == outcome["asr"] and again["replayed"] == found


@pytest.mark.slow
def test_inversion_is_deterministic_for_a_seed(fewshot_edit):
    from fasterase.attacks.run import find
    from fasterase.models.loading import load_pipeline

    original = load_pipeline(builtin_model_dir())
    edited = api.load_edited(edit=fewshot_edit)
    cfg = attack_config("inversion", {**INVERSION, "steps": 5})
    first, second = (find("inversion", cfg, edited, original, "circle", ["a photo of a circle"] * 2) for _ in range(2))
    assert first.prompts == second.prompts and first.tensors.keys() == second.tensors.keys()
    for name, vectors in first.tensors.items():
        # the same draws and steps; CPU reductions may round differently from run to run
        torch.testing.assert_close(second.tensors[name], vectors, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_kpop_key_is_reported_as_the_owners_attack(kpop_circle, world_sampling, capsys):
    """The key brings the concept back: reported beside the attack, on the same seeds."""
    options = {"generations": 2, "population": 8}
    result = api.attack(kpop_circle.edit, attack="ringabell", options=options, key=kpop_circle.key, n=8, sampling=world_sampling)
    assert set(result["key"]) == {"asr", "baseline", "original"} and result["key"]["baseline"] == result["attacks"]["ringabell"]["baseline"]
    assert result["key"]["asr"] > result["key"]["baseline"], result["key"]


@pytest.mark.slow
def test_evaluate_runs_attacks_on_its_own_prompts_and_seeds(fewshot_edit, capsys):
    argv = ["evaluate", "--edit", str(fewshot_edit), "--n", "8", "--attack", "ringabell", "--json", *SAMPLING]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    outcome = result["attacks"]["circle"]["ringabell"]
    assert outcome["baseline"] == result["concepts"]["circle"]["edited"]["top1"]
    assert outcome["original"] == result["concepts"]["circle"]["original"]["top1"] and 0 <= outcome["asr"] <= 1
