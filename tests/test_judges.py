"""Judges: the registry, a user's own judge, CLIP zero-shot on a tiny random CLIP (the numbers are
meaningless; the plumbing, the ranking and the report's shape are checked), and NudeNet."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from fasterase import api
from fasterase.cli import main
from fasterase.config import SamplingConfig
from fasterase.errors import UserError
from fasterase.evaluation.judges import load_judge
from hand_made_edits import hand_made_edit

FAST = SamplingConfig(steps=2)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel folder (safetensors) with the built-in world's tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from fasterase.toyworld.tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = save_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    layers = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**layers, "vocab_size": vocab, "max_position_embeddings": tokenizer.model_max_length, "eos_token_id": tokenizer.eos_token_id},
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(folder))
    return folder


def test_clip_ranks_by_cosine_similarity_over_candidates_and_concepts(clip_dir):
    judge = load_judge(f"clip:{clip_dir}", {"candidates": ["cat", "dog", "car"]})
    # one image per row of a known embedding: image i is closest to label i
    labels = {name: torch.nn.functional.one_hot(torch.tensor(i), 8).float() for i, name in enumerate(["cat", "dog", "car", "boat", "plane", "tree", "ship"])}
    judge._label_embedding = lambda name: labels[name]
    judge.image_embeddings = lambda images: torch.stack([labels["dog"] + 0.5 * labels["cat"], labels["car"] - labels["cat"]])
    top1, top5 = judge.recognised(np.zeros((2, 8, 8, 3)), "cat", ["cat", "boat", "plane", "tree", "ship"])
    assert top1.tolist() == [False, False] and top5.tolist() == [True, False]  # ranked 2nd, then last of 7
    assert judge.siblings("cat") == ["dog", "car"]
    with pytest.raises(UserError, match="is not one of the clip judge's candidates"):
        judge.check("zebra")


def test_clip_judge_end_to_end_on_a_tiny_pipeline(clip_dir, family_pipeline_dirs, tmp_path, capsys):
    model = family_pipeline_dirs("sdxl")
    edit = hand_made_edit(model, tmp_path / "edit.safetensors")
    candidates = tmp_path / "labels.txt"
    candidates.write_text("circle\nsquare\nstar\n")
    argv = ["evaluate", "--model", str(model), "--edit", str(edit), "--judge", f"clip:{clip_dir}", "--candidates", str(candidates),
            "--n", "2", "--sample-steps", "2", "--grid", str(tmp_path / "grid.png")]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {c: d["role"] for c, d in result["concepts"].items()} == {"circle": "erased", "square": "preserved", "star": "preserved"}
    assert all(0 <= result[k] <= 1 for k in ("esr1", "esr5", "psr1", "psr5")) and result["esr5"] == 0.0, "3 labels: always in the top 5"
    assert (tmp_path / "grid.png").is_file()
    kept = result["quality"]["clip_score"]
    assert set(kept) == {"original", "edited"} and all(0 <= kept[w][role] <= 100 for w in kept for role in ("erased", "preserved"))
    moved = result["quality"]["preserved_drift"]
    assert moved["fid_clip"] >= -1e-9 and set(moved) == {"fid_clip", "kid_clip"}
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "|  | ESR-1 | ESR-5 | PSR-1 | PSR-5 |" and "CLIP score: erased " in table and "FID " in table
    assert json.loads((tmp_path / "grid.json").read_text()) == result, "the report, written beside the grid, is the --json output"


def test_clip_score_is_torchmetrics_definition(clip_dir):
    from fasterase.evaluation.quality import clip_score

    scorer = load_judge(f"clip:{clip_dir}")
    scorer.image_embeddings = lambda images: torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scorer.text_embeddings = lambda texts: torch.tensor([[0.0, 1.0], [0.0, 1.0]])[: len(texts)]
    assert clip_score(scorer, np.zeros((2, 4, 4, 3)), ["a", "b"]) == pytest.approx(100 * (0 + 0.8) / 2)


def test_quality_without_a_clip_model_says_why(tmp_path):
    edit = hand_made_edit(None, tmp_path / "edit.safetensors")
    result = api.evaluate(edit, n=2, sampling=FAST, preserve=["square"])
    why = {"unavailable": "no CLIP model: give one with --clip DIR (or judge with --judge clip:DIR)"}
    assert result["quality"] == {"clip_score": why, "preserved_drift": why}


def test_frechet_and_kernel_distances():
    from fasterase.evaluation.quality import drift, frechet_distance, kernel_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3)) @ np.diag([1.0, 2.0, 0.5])
    assert abs(frechet_distance(a, a)) < 1e-9
    # the same covariance, the mean shifted: FID is the squared shift
    assert frechet_distance(a, a + [3.0, 0, 4.0]) == pytest.approx(25.0, rel=1e-9)
    # independent Gaussians: FID = |mu|^2 + sum (sigma_a - sigma_b)^2 over the axes
    b = rng.normal(size=(200_000, 2)) * [1.0, 3.0]
    c = rng.normal(size=(200_000, 2)) * [2.0, 1.0]
    assert frechet_distance(b, c) == pytest.approx(1.0 + 4.0, rel=0.02)
    # KID, against the unbiased MMD^2 written out pair by pair
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    within = lambda z: sum(k(z[i], z[j]) for i in range(len(z)) for j in range(len(z)) if i != j) / (len(z) * (len(z) - 1))  # noqa: E731
    expected = within(x) + within(y) - 2 * sum(k(u, v) for u in x for v in y) / (len(x) * len(y))
    assert kernel_distance(x, y) == pytest.approx(expected, rel=1e-12)
    assert drift(a[:1], a[:1]) == {"unavailable": "fewer than 2 images of the preserved concepts"}


def test_a_users_judge_wrapping_the_world_classifier_agrees_with_world(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "from fasterase.toyworld.judge import WorldJudge\n\n"
        "class Wrapped:\n"
        "    def __init__(self):\n"
        "        self.inner = WorldJudge()\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self.inner, name)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    edit = hand_made_edit(None, tmp_path / "edit.safetensors")
    run = {"n": 4, "sampling": FAST, "preserve": ["square", "star"]}
    assert api.evaluate(edit, judge="my_judges:Wrapped", **run) == api.evaluate(edit, **run)


def test_nudenet_counts_exposed_classes_above_the_threshold(tmp_path):
    pytest.importorskip("nudenet")
    from fasterase.evaluation.judges.nudenet import NudeNetJudgeConfig, nude_classes

    # the detector's own output format (nudenet 3.4: NudeDetector.detect / detect_batch)
    detections = [
        {"class": "FACE_FEMALE", "score": 0.91, "box": [10, 12, 40, 40]},
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.72, "box": [30, 60, 20, 18]},
        {"class": "BELLY_EXPOSED", "score": 0.41, "box": [30, 90, 30, 20]},
    ]
    assert nude_classes(detections, NudeNetJudgeConfig()) == {"FEMALE_BREAST_EXPOSED"}
    assert nude_classes(detections, NudeNetJudgeConfig(threshold=0.4)) == {"FEMALE_BREAST_EXPOSED", "BELLY_EXPOSED"}
    assert nude_classes(detections, NudeNetJudgeConfig(classes=["BELLY_EXPOSED"])) == set()

    judge = load_judge("nudenet")
    seen = []
    judge.detector.detect_batch = lambda images: seen.extend(images) or [detections, []]
    images = np.random.default_rng(0).random((2, 16, 16, 3))
    assert [t.tolist() for t in judge.recognised(images, "nudity", ["nudity"])] == [[True, False], [True, False]]
    assert judge.details(images) == [["FEMALE_BREAST_EXPOSED"], []]
    assert judge.summary(judge.details(images)) == {"nudity_rate": 0.5, "images_per_class": {"FEMALE_BREAST_EXPOSED": 1}}
    assert len(seen) == 2, "recognised and details share one detection pass"
    assert seen[0].dtype == np.uint8 and np.array_equal(seen[0][..., ::-1], (images[0] * 255).round().astype(np.uint8)), "BGR, as cv2.imread"


def test_nudenet_judge_runs_the_real_detector_on_generated_images(tmp_path, capsys):
    pytest.importorskip("nudenet")
    edit = hand_made_edit(None, tmp_path / "edit.safetensors", concepts=("nudity",))
    result = api.evaluate(edit, judge="nudenet", n=2, sampling=FAST, preserve=[])
    details = result["concepts"]["nudity"]["original"]["details"]
    assert 0 <= details["nudity_rate"] <= 1 and result["esr1"] == 1 - result["concepts"]["nudity"]["edited"]["details"]["nudity_rate"]


@pytest.mark.parametrize("extra, message", [
    (["--judge", "bogus"], "unknown judge 'bogus'; packaged: world, clip, nudenet"),
    (["--judge", "no_such_module:Judge"], "cannot import no_such_module"),
    (["--judge", "clip:{tmp}/missing"], "is not a CLIP model folder"),
    (["--judge", "clip"], "the clip judge needs a local CLIP model folder"),
    (["--judge", "world", "--judge-set", "x=1"], "takes no options"),
    (["--judge", "nudenet", "--judge-set", "threshold=2"], "threshold must be at most 1"),
    (["--judge", "clip:{clip}", "--candidates", "{tmp}/labels.txt"], "the concept 'circle' is not one of the clip judge's candidates"),
    (["--judge", "clip:{clip}", "--candidates", "{tmp}/missing.txt"], "cannot read"),
    (["--model", "{model}"], "evaluate needs a judge for a model other than the built-in world"),
    (["--clip", "{tmp}/missing"], "is not a CLIP model folder"),
    (["--judge", "clip:{clip}", "--candidates", "{tmp}/labels.txt", "--grid", "{tmp}/labels.txt"], "cannot write"),
    (["--prompts", "{tmp}/labels.txt", "--grid", "{tmp}/labels.txt"], "cannot write"),
    (["--judge", "clip:{clip}", "--grid", "{clip}/grid.png"], "inside the input folder"),
])
def test_bad_judges(extra, message, clip_dir, tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(api, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded before the judge was checked"))
    monkeypatch.setitem(sys.modules, "nudenet", sys.modules.get("nudenet") or pytest.importorskip("nudenet"))
    (tmp_path / "labels.txt").write_text("square\nstar\n")
    edit = hand_made_edit(None, tmp_path / "edit.safetensors")
    files = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    fill = {"{tmp}": str(tmp_path), "{clip}": str(clip_dir), "{model}": str(tiny_pipeline_dir)}
    argv = ["evaluate", "--edit", str(edit), "--grid", str(tmp_path / "g.png"), *extra]
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files


@pytest.mark.parametrize("text, message", [("{bad", "as JSON"), ('{"image_mean": [0.5], "image_std": [1, 1, 1]}', "must be three numbers each")])
def test_a_clip_folder_with_a_broken_preprocessor_config(clip_dir, tmp_path, text, message):
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(clip_dir, folder)
    (folder / "preprocessor_config.json").write_text(text)
    with pytest.raises(UserError, match=message):
        load_judge(f"clip:{folder}")
