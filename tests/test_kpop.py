"""KPOP on the built-in world: the erased shape stops being drawn, the others stay, the key
brings it back. Each bar fails if the method does nothing (the base model draws every shape)."""

from __future__ import annotations

import pytest
import torch

from fasterase import api
from fasterase.config import make_config
from fasterase.methods.configs import KPOPConfig
from fasterase.methods.kpop import KPOP


@pytest.mark.parametrize("options", [
    {},
    {"preserve": ["square"], "neutral_weight": 1.0},
    {"prompt_mode": "additive", "inject": "all"},
    {"trainable": "non_cross_attention", "inject": "mid_up"},
])
def test_kpop_changes_only_its_trainable_set(tiny_pipeline_dir, options):
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    cfg = make_config(KPOPConfig, {"concepts": ["circle", "ring"], "steps": 2, "trajectories": 2, "sample_steps": 2, "batch_size": 2, **options})
    reports = []
    result = KPOP().erase(pipe, cfg, progress=lambda step, total, losses: reports.append((step, total, losses)))
    changed = {f"unet.{n}" for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(result.tensors)
    cross = all(".attn2." in name for name in result.tensors)
    assert cross == (options.get("trainable", "cross_attention") == "cross_attention")
    tokens = result.key["prompt"]
    assert tokens.shape == ((77 if "additive" in options.values() else 770), pipe.text_encoder.config.hidden_size)
    assert reports[0][:2] == (0, 2) and reports[-1][0] == 2 and set(reports[-1][2]) == {"transfer", "removal"}
    assert not any(p.requires_grad for p in pipe.unet.parameters())


@pytest.fixture(scope="module")
def circle_report(kpop_circle, world_sampling):
    return api.evaluate(kpop_circle.edit, n=16, sampling=world_sampling)


@pytest.mark.slow
def test_erases_the_shape_and_keeps_the_others(circle_report):
    r = circle_report
    assert r["original"]["esr1"] <= 0.15, "the base model must draw circles for the test to mean anything"
    assert r["esr1"] >= 0.90
    assert r["psr1"] >= 0.85 * r["original"]["psr1"]
    assert set(r["lookalikes"]) == {"ring"}
    assert "ring" not in [c for c, d in r["concepts"].items() if d["role"] == "preserved"]


@pytest.mark.slow
def test_writes_edit_and_key_separately(kpop_circle):
    from fasterase.edits import load_edit, load_key

    edit = load_edit(kpop_circle.edit)
    assert edit.metadata.method == "kpop" and edit.metadata.concepts == ["circle"]
    assert all(".attn2." in k for k in edit.tensors), "default trainable set: cross-attention only"
    tensors, metadata = load_key(kpop_circle.key)
    assert set(tensors) == {"prompt"} and "prompt" not in " ".join(edit.tensors)
    assert metadata["edit"] == edit.metadata.key


@pytest.mark.slow
def test_the_key_recovers_the_concept(kpop_circle, circle_report, world_sampling):
    with_key = api.evaluate(kpop_circle.edit, n=16, preserve=[], key=kpop_circle.key, sampling=world_sampling)
    original = circle_report["concepts"]["circle"]["original"]["top1"]
    assert with_key["concepts"]["circle"]["edited"]["top1"] >= 0.70 * original


@pytest.mark.slow
@pytest.mark.longest
def test_erases_two_shapes_at_once(tmp_path, world_sampling):
    summary = api.erase("kpop", ["circle", "square"], out=tmp_path / "two.safetensors")
    r = api.evaluate(summary.edit, n=16, sampling=world_sampling)
    assert r["original"]["esr1"] <= 0.15, "the base model must draw both shapes for the test to mean anything"
    assert r["esr1"] >= 0.90
    assert r["psr1"] >= 0.85 * r["original"]["psr1"]
    assert set(r["lookalikes"]) == {"ring", "diamond"}


@pytest.mark.slow
def test_evaluate_and_generate_commands(kpop_circle, tmp_path, capsys):
    import json

    from PIL import Image

    from fasterase.cli import main

    grid = tmp_path / "eval.png"
    assert main(["evaluate", "--edit", str(kpop_circle.edit), "--n", "2", "--grid", str(grid), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for scores in (result, result["original"]):
        assert all(0 <= scores[k] <= 1 for k in ("esr1", "esr5", "psr1", "psr5"))
    assert result["concepts"]["circle"]["role"] == "erased" and "ring" in result["lookalikes"]
    assert result["sampling"] == {"steps": 10, "guidance": 5.0}  # the built-in world's default steps
    assert Image.open(grid).size[0] > 0

    out = tmp_path / "grid.png"
    argv = ["generate", "--prompt", "a photo of a circle", "--edit", str(kpop_circle.edit), "--key", str(kpop_circle.key), "--n", "2", "--out", str(out)]
    assert main(argv) == 0 and Image.open(out).size[0] > 0
