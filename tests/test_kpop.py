"""KPOP on the built-in world: the erased shape stops being drawn, the others stay, the key
brings it back. Each bar fails if the method does nothing (the base model draws every shape)."""

from __future__ import annotations

import pytest

from fasterase import api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def circle_edit(tmp_path_factory):
    out = tmp_path_factory.mktemp("kpop") / "circle.safetensors"
    summary = api.erase("kpop", ["circle"], out=out)
    return summary


@pytest.fixture(scope="module")
def circle_report(circle_edit):
    return api.evaluate(circle_edit.edit, n=32)


def test_erases_the_shape_and_keeps_the_others(circle_report):
    r = circle_report
    assert r["original"]["esr1"] <= 0.15, "the base model must draw circles for the test to mean anything"
    assert r["esr1"] >= 0.90
    assert r["psr1"] >= 0.85 * r["original"]["psr1"]
    assert set(r["lookalikes"]) == {"ring"}
    assert "ring" not in [c for c, d in r["concepts"].items() if d["role"] == "preserved"]


def test_writes_edit_and_key_separately(circle_edit):
    from fasterase.edits import load_edit, load_key

    edit = load_edit(circle_edit.edit)
    assert edit.metadata.method == "kpop" and edit.metadata.concepts == ["circle"]
    assert all(".attn2." in k for k in edit.tensors), "default trainable set: cross-attention only"
    tensors, metadata = load_key(circle_edit.key)
    assert set(tensors) == {"prompt"} and "prompt" not in " ".join(edit.tensors)
    assert metadata["base_fingerprint"] == edit.metadata.base_fingerprint


def test_the_key_recovers_the_concept(circle_edit, circle_report):
    with_key = api.evaluate(circle_edit.edit, n=32, preserve=[], key=circle_edit.key)
    original = circle_report["concepts"]["circle"]["original"]["top1"]
    assert with_key["concepts"]["circle"]["edited"]["top1"] >= 0.70 * original


def test_erases_two_shapes_at_once(tmp_path):
    summary = api.erase("kpop", ["circle", "square"], out=tmp_path / "two.safetensors")
    r = api.evaluate(summary.edit, n=32)
    assert r["esr1"] >= 0.90
    assert r["psr1"] >= 0.85 * r["original"]["psr1"]
    assert set(r["lookalikes"]) == {"ring", "diamond"}


def test_evaluate_and_generate_commands(circle_edit, tmp_path, capsys):
    import json

    from PIL import Image

    from fasterase.cli import main

    grid = tmp_path / "eval.png"
    assert main(["evaluate", "--edit", str(circle_edit.edit), "--n", "2", "--grid", str(grid), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for scores in (result, result["original"]):
        assert all(0 <= scores[k] <= 1 for k in ("esr1", "esr5", "psr1", "psr5"))
    assert result["concepts"]["circle"]["role"] == "erased" and "ring" in result["lookalikes"]
    assert Image.open(grid).size[0] > 0

    out = tmp_path / "grid.png"
    argv = ["generate", "--prompt", "a photo of a circle", "--edit", str(circle_edit.edit), "--key", str(circle_edit.key), "--n", "2", "--out", str(out)]
    assert main(argv) == 0 and Image.open(out).size[0] > 0
