"""Prompt sets: CSV (I2P's columns) and text files, per-row seeds and guidance, and evaluation on them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fasterase.cli import main
from fasterase.config import SamplingConfig
from fasterase.errors import UserError
from fasterase.evaluation.prompts import PromptRow, read_prompt_set
from hand_made_edits import hand_made_edit

CSV = "\ufeffprompt,seed,guidance,concept\na photo of a circle,7,,circle\n  ,1,,circle\na circle,,3.5,circle\na photo of a square,11,,square\n"


def test_csv_and_text_prompt_sets(tmp_path):
    (tmp_path / "set.csv").write_text(CSV)
    assert read_prompt_set(tmp_path / "set.csv") == [
        PromptRow("a photo of a circle", 7, None, "circle"),  # the blank prompt is skipped, the BOM ignored
        PromptRow("a circle", None, 3.5, "circle"),
        PromptRow("a photo of a square", 11, None, "square"),
    ]
    (tmp_path / "set.txt").write_text("a circle\n\na square\n")
    assert read_prompt_set(tmp_path / "set.txt") == [PromptRow("a circle"), PromptRow("a square")]


@pytest.mark.parametrize("text, message", [
    ("caption,seed\na circle,1\n", "has no 'prompt' column (its columns: caption, seed)"),
    ("prompt,seed\na circle,one\n", "line 2: seed 'one' is not a whole number from 0"),
    ("prompt,seed\na circle,-4\n", "line 2: seed '-4' is not a whole number from 0"),
    ("prompt,guidance\na circle,inf\n", "line 2: guidance 'inf' is not a finite number"),
    ("prompt\n", "has no prompts"),
])
def test_bad_prompt_sets(tmp_path, text, message, capsys, monkeypatch):
    from fasterase import api

    (tmp_path / "set.csv").write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        read_prompt_set(tmp_path / "set.csv")
    edit = hand_made_edit(None, tmp_path / "edit.safetensors")
    monkeypatch.setattr(api, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded before the prompt set was read"))
    assert main(["evaluate", "--edit", str(edit), "--prompts", str(tmp_path / "set.csv"), "--grid", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_each_row_draws_the_same_image_whatever_is_drawn_with_it():
    from fasterase.evaluation.sampling import draw_share
    from fasterase.models.loading import load_pipeline

    def images(rows, cfg):
        return np.concatenate([images for _, images in draw_share(pipe, rows, cfg)])

    pipe = load_pipeline()
    rows = [PromptRow("a photo of a circle", 7), PromptRow("a photo of a square"), PromptRow("a photo of a star", guidance=2.0)]
    together = images(rows, SamplingConfig(steps=3))
    apart = images(rows, SamplingConfig(steps=3, batch_size=1))
    np.testing.assert_allclose(together, apart, atol=1e-5)
    # a row's own seed fixes its noise wherever the row is; without one, its index does
    moved = images([PromptRow("a photo of a square", 1), rows[0]], SamplingConfig(steps=3))
    np.testing.assert_allclose(moved[1], together[0], atol=1e-5)
    np.testing.assert_allclose(moved[0], together[1], atol=1e-5)  # index 1 with seed 0 is seed 1


def test_evaluate_on_a_prompt_set(tmp_path, capsys):

    edit = hand_made_edit(None, tmp_path / "edit.safetensors")
    rows = ["prompt,seed,concept"] + [f"a photo of a circle,{i},circle" for i in range(3)] + [f"a photo of a {s},,{s}" for s in ("square", "star")]
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    argv = ["evaluate", "--edit", str(edit), "--prompts", str(tmp_path / "set.csv"), "--sample-steps", "3", "--grid", str(tmp_path / "g.png"), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images_per_concept"] == {"circle": 3, "square": 1, "star": 1}
    assert {c: d["role"] for c, d in result["concepts"].items()} == {"circle": "erased", "square": "preserved", "star": "preserved"}
    assert main(argv) == 0 and json.loads(capsys.readouterr().out) == result
    assert main([*argv, "--preserve", "ring"]) == 2
    assert "the prompt set has no prompt for the concept 'ring'" in capsys.readouterr().err
