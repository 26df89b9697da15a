"""Every kind of bad input gets one line on stderr, exit status 2, no traceback, no partial file."""

from __future__ import annotations

import pytest

from fasterase.cli import main
from fasterase.edits import Edit, EditMetadata, save_edit


def run_failing(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("fasterase: error:"), err
    return err


def erase_argv(tmp_path, *extra: str) -> list[str]:
    return ["erase", "--method", "kpop", "--steps", "1", "--out", str(tmp_path / "edit.safetensors"), *extra]


def test_unknown_method(capsys, tmp_path):
    err = run_failing(capsys, ["erase", "--method", "nope", "--concept", "circle", "--out", str(tmp_path / "e.safetensors")])
    assert "unknown method 'nope'" in err and "kpop" in err
    assert not list(tmp_path.iterdir())


def test_missing_method_is_a_usage_error(capsys):
    run_failing(capsys, ["erase", "--concept", "circle"])


@pytest.mark.parametrize("concepts", [[], ["--concept", ""], ["--concept", "   "]])
def test_empty_concept(capsys, tmp_path, concepts):
    err = run_failing(capsys, erase_argv(tmp_path, *concepts))
    assert "concept" in err
    assert not list(tmp_path.iterdir())


def test_concept_the_tokenizer_cannot_represent(capsys, tmp_path):
    err = run_failing(capsys, erase_argv(tmp_path, "--concept", "日本"))
    assert "cannot represent" in err
    assert not list(tmp_path.iterdir())


def test_missing_model_path(capsys, tmp_path):
    err = run_failing(capsys, erase_argv(tmp_path, "--concept", "circle", "--model", str(tmp_path / "no-such-model")))
    assert "does not exist" in err
    assert not list(tmp_path.iterdir())


def test_unwritable_output_path(capsys, tmp_path):
    out = tmp_path / "no-such-folder" / "edit.safetensors"
    err = run_failing(capsys, ["erase", "--method", "kpop", "--concept", "circle", "--out", str(out)])
    assert "cannot write" in err
    assert not out.parent.exists()


@pytest.mark.parametrize("text", ["steps: [1, 2", "- just\n- a list\n", "no_such_option: 3\n", "lr: many\n"])
def test_bad_yaml_config(capsys, tmp_path, text):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    run_failing(capsys, erase_argv(tmp_path, "--concept", "circle", "--config", str(config)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_edit_made_for_another_model(capsys, tmp_path):
    edit = tmp_path / "foreign.safetensors"
    save_edit(edit, Edit(tensors={}, metadata=EditMetadata(
        method="kpop", concepts=["circle"], config={}, base_fingerprints={"unet": {"float16": "0" * 16}}, base_model="another-model")))
    grid = tmp_path / "grid.png"
    err = run_failing(capsys, ["generate", "--prompt", "a photo of a circle", "--edit", str(edit), "--out", str(grid)])
    assert "another-model" in err
    assert not grid.exists()
    err = run_failing(capsys, ["evaluate", "--edit", str(edit), "--n", "1", "--grid", str(tmp_path / "eval.png")])
    assert "another-model" in err
    assert not (tmp_path / "eval.png").exists()


def test_env_json(capsys):
    import json

    assert main(["env", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["backends"]["cross_attention"]["torch"] == "available"


def test_fp16_without_a_gpu_runs_in_float32_and_says_so(capsys, tmp_path):
    import json

    out = tmp_path / "e.safetensors"
    argv = ["erase", "--method", "kpop", "--concept", "circle", "--steps", "1", "--fp16", "--out", str(out), "--json"]
    assert main(argv + ["--config", str(_fast_config(tmp_path))]) == 0
    captured = capsys.readouterr()
    assert "no GPU here: float16 runs in float32" in captured.err
    facts = json.loads(captured.out)
    assert facts["edit"] == str(out) and out.exists() and facts["key"].endswith(".key.safetensors")


def _fast_config(tmp_path):
    config = tmp_path / "fast.yaml"
    config.write_text("trajectories: 2\nsample_steps: 4\nbatch_size: 2\n")
    return config


@pytest.mark.parametrize("item, expected", [("lr=oops", "option 'lr' must be a float"), ("steps", "--set takes OPTION=VALUE"), ("=3", "--set takes OPTION=VALUE"), ("nope=1", "unknown option 'nope'")])
def test_bad_set_options(capsys, tmp_path, item, expected):
    err = run_failing(capsys, erase_argv(tmp_path, "--concept", "circle", "--set", item))
    assert expected in err
    assert not list(tmp_path.iterdir())


def test_image_options_belong_to_image_methods(capsys, tmp_path):
    err = run_failing(capsys, erase_argv(tmp_path, "--concept", "circle", "--images", str(tmp_path)))
    assert "unknown option 'images'" in err


def test_set_reads_values_as_yaml(tmp_path):
    from fasterase.cli import _parse_set

    assert _parse_set("lr=1e-5") == ("lr", 1e-5)
    assert _parse_set("templates=['{}', 'a {}']") == ("templates", ["{}", "a {}"])
    assert _parse_set("include_end=false") == ("include_end", False)
    assert _parse_set("neutral=ring") == ("neutral", "ring")


def test_evaluate_compares_several_edits_in_one_table(capsys, tmp_path):
    """Edits of the built-in model made by hand (cheap): one table, a row per edit, same plan."""
    import json

    from fasterase.models.fingerprint import fingerprints
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline()
    name, weight = next((n, p) for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_v.weight"))
    edits = []
    for method, factor in (("kpop", 1.0), ("uce", 0.0)):
        path = tmp_path / f"{method}.safetensors"
        metadata = EditMetadata(method=method, concepts=["circle"], config={}, base_fingerprints=fingerprints(pipe, ("unet", "text_encoder")), base_model="builtin")
        save_edit(path, Edit(tensors={f"unet.{name}": weight.detach() * factor}, metadata=metadata))
        edits += ["--edit", str(path)]
    assert main(["evaluate", *edits, "--n", "2", "--sample-steps", "4", "--grid", str(tmp_path / "g.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [e["method"] for e in result["edits"]] == ["kpop", "uce"]
    assert all(e["sampling"] == {"steps": 4, "guidance": 5.0} for e in result["edits"])
    assert all(e["original"] == result["original"] for e in result["edits"]), "one base-model sampling for all"
    assert (tmp_path / "g.png").exists()
    assert main(["evaluate", *edits, "--n", "2", "--sample-steps", "4", "--grid", str(tmp_path / "g.png")]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[2].startswith("| original |") and "kpop" in table and "uce" in table and "ring" in table


def test_toyworld_images_writes_folders_that_erase_reads(capsys, tmp_path):
    import json

    assert main(["toyworld", "images", "--concept", "circle", "--out", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"), "--n", "3", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert len(facts["images"]) == 3 and len(list((tmp_path / "mask").iterdir())) == 3
    run_failing(capsys, ["toyworld", "images", "--concept", "nothing-here", "--out", str(tmp_path / "x")])


def _fmn_argv(tmp_path, *extra: str) -> list[str]:
    return ["erase", "--method", "fmn", "--concept", "circle", "--steps", "1", "--out", str(tmp_path / "out" / "edit.safetensors"), *extra]


def test_image_folder_without_a_readable_image(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    images = tmp_path / "images"
    images.mkdir()
    (images / "notes.txt").write_text("not an image")
    err = run_failing(capsys, _fmn_argv(tmp_path, "--images", str(images)))
    assert "no readable image in" in err
    assert not list((tmp_path / "out").iterdir())


def test_mask_folder_that_does_not_match_the_images(capsys, tmp_path):
    from fasterase.toyworld.folders import write_concept_folder

    (tmp_path / "out").mkdir()
    write_concept_folder("circle", tmp_path / "images", tmp_path / "masks", count=3)
    next((tmp_path / "masks").iterdir()).unlink()
    err = run_failing(capsys, _fmn_argv(tmp_path, "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")))
    assert "do not match the images" in err and "no mask for circle-0" in err
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("argv", [
    ["erase", "--method", "fmn", "--concept", "circle", "--masks", "/nonexistent"],
    ["erase", "--method", "fmn", "--concept", "circle", "--images", "/nonexistent"],
    ["erase", "--method", "uce"],
    ["erase", "--method", "mace"],
    ["erase", "--method", "mace", "--concept", "circle", "--images", "/nonexistent"],
])
def test_method_specific_bad_input(capsys, tmp_path, argv):
    run_failing(capsys, argv + ["--out", str(tmp_path / "e.safetensors")])
    assert not list(tmp_path.iterdir())
