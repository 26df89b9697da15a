"""`fasterase cache build`: the preservation Gram of a caption file, streamed in batches, written
atomically with its metadata, and read back by the methods' preserve_gram option."""

from __future__ import annotations

import json

import pytest
import torch

from fasterase.cli import main
from fasterase.closed_form import load_gram, preservation_gram

CAPTIONS = ["a photo of a square", "a red circle", "a blue ring on a white background", "a star", "a green diamond"]


def run_failing(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fasterase: error:") and "\n" not in err, err
    return err


def test_cache_build_writes_the_gram_of_the_captions(tiny_pipeline_dir, tmp_path, capsys):
    from fasterase.models.loading import load_pipeline

    prompts = tmp_path / "captions.txt"
    prompts.write_text("\n".join(CAPTIONS[:2] + ["", "   "] + CAPTIONS[2:]) + "\n")  # blank lines are skipped
    out = tmp_path / "gram.safetensors"
    argv = ["cache", "build", "--prompts", str(prompts), "--model", str(tiny_pipeline_dir), "--batch-size", "2", "--out", str(out), "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    facts = json.loads(captured.out)
    assert "cache build" in captured.err and "5/5" in captured.err, "a progress bar over the prompts"
    pipe = load_pipeline(tiny_pipeline_dir)
    expected = preservation_gram(pipe, CAPTIONS, "tiny")
    assert (facts["prompts"], facts["tokens"], facts["text_encoder"]) == (5, 5 * pipe.tokenizer.model_max_length, expected.text_encoder)
    loaded = load_gram(out, pipe)
    assert (loaded.prompts, loaded.tokens, loaded.model) == (5, facts["tokens"], str(tiny_pipeline_dir.resolve()))
    torch.testing.assert_close(loaded.gram, expected.gram, rtol=1e-10, atol=1e-8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt", "gram.safetensors"], "no temporary file left"


def test_methods_read_the_built_cache(tiny_pipeline_dir, tmp_path, capsys):
    from fasterase.config import make_config
    from fasterase.methods.configs import UCEConfig
    from fasterase.methods.uce import UCE
    from fasterase.models.loading import load_pipeline

    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS * 4))
    out = tmp_path / "gram.safetensors"
    assert main(["cache", "build", "--prompts", str(tmp_path / "captions.txt"), "--model", str(tiny_pipeline_dir), "--out", str(out)]) == 0
    assert "wrote the Gram of 20 prompts" in capsys.readouterr().out
    plain, cached = (
        UCE().erase(load_pipeline(tiny_pipeline_dir), make_config(UCEConfig, {"concepts": ["circle"], **options})).tensors
        for options in ({}, {"preserve_gram": str(out)})
    )
    assert any(not torch.equal(plain[k], cached[k]) for k in plain)


@pytest.mark.parametrize("case, message", [
    ("missing", "cannot read"),
    ("empty", "has no captions"),
    ("binary", "is not UTF-8 text"),
    ("unwritable", "does not exist"),
    ("batch", "--batch-size must be at least 1"),
])
def test_cache_build_errors_are_one_line(tmp_path, capsys, case, message):
    prompts, out, extra = tmp_path / "captions.txt", tmp_path / "gram.safetensors", []
    if case == "empty":
        prompts.write_text("\n  \n")
    elif case == "binary":
        prompts.write_bytes(b"\xff\xfe\x00caption")
    elif case != "missing":
        prompts.write_text("a circle\n")
    if case == "unwritable":
        out = tmp_path / "no-such-folder" / "gram.safetensors"
    if case == "batch":
        extra = ["--batch-size", "0"]
    assert message in run_failing(capsys, ["cache", "build", "--prompts", str(prompts), "--out", str(out), *extra])
    assert not out.exists()
