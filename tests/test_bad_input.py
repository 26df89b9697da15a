"""Bad input, table-driven: each row a command or an API call, its one-line error, exit status 2,
and no file created, changed or removed. Options and arguments are refused before any model loads
(and usage errors before torch is imported); models, edits and keys when they are read; faults and
interruptions leave the earlier outputs as they were."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import fasterase
from fasterase import api
from fasterase.cli import main
from fasterase.errors import UserError

ERASE = ["erase", "--method", "uce", "--concept", "circle", "--out", "{tmp}/edit.safetensors"]
GENERATE = ["generate", "--prompt", "a circle", "--out", "{tmp}/grid.png"]

COMMANDS = [
    (ERASE + ["--set", "lam=inf"], "lam must be a finite number"),
    (ERASE + ["--set", "lam=.nan"], "lam must be a finite number"),
    (ERASE + ["--set", "lam=-1"], "lam must be at least 0"),
    (ERASE + ["--set", "pairing=tail"], "pairing must be one of position, tails, last"),
    (ERASE + ["--set", "preserve_gram=a.safetensors:-2"], "preserve_gram entries must be 'path' or 'path:weight'"),
    (ERASE + ["--set", "batch_size=0"], "batch_size must be at least 1"),
    (ERASE + ["--seed", "99999999999"], "seed must be at most"),
    (ERASE + ["--set", "sample_batch=-2"], "sample_batch must be at least 0"),
    (ERASE + ["--set", "templates=['a {name}']"], "must contain exactly one {}"),
    (ERASE + ["--set", "templates=['a {} and a {}']"], "must contain exactly one {}"),
    (ERASE + ["--set", "guide=ring"], "option 'guide' must be a list of strings"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "guidance=-inf", "--out", "{tmp}/e.safetensors"], "guidance must be a finite number"),
    (["erase", "--method", "kpop", "--concept", "circle", "--set", "prompt_lr=1e400", "--out", "{tmp}/e.safetensors"], "prompt_lr must be a finite number"),
    (GENERATE + ["--n", "0"], "n must be a whole number of at least 1"),
    (GENERATE + ["--sample-steps", "-1"], "steps must be at least 0"),
    (GENERATE + ["--guidance", "nan"], "guidance must be a finite number"),
    (GENERATE + ["--guidance", "1e300"], "guidance must be a finite number (within float32's range)"),
    (["toyworld", "report", "--n", "0"], "n must be a whole number of at least 1"),
    (["toyworld", "report", "--sample-steps", "-1"], "steps must be at least 0"),
    (GENERATE + ["--seed", "-1"], "seed must be at least 0"),
    (["evaluate", "--edit", "{tmp}/missing.safetensors", "--n", "0", "--grid", "{tmp}/g.png"], "n must be a whole number of at least 1"),
]


def no_model(monkeypatch):
    monkeypatch.setattr(api, "load_pipeline", lambda *args, **kwargs: pytest.fail("a model was loaded before the input was checked"))


@pytest.mark.parametrize("argv, message", COMMANDS, ids=lambda row: " ".join(row) if isinstance(row, list) else None)
def test_bad_commands(argv, message, tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fasterase: error:") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert not list(tmp_path.iterdir())


USAGE_ERRORS = [
    ["erase", "--method", "kpop", "--concept", "circle", "--stesp", "3"],
    ["erase", "--method", "nope", "--concept", "circle"],
    ["erase", "--method", "kpop", "--concept", "circle", "--set", "lr=-1"],
    ["erase", "--method", "kpop", "--concept", "circle", "--set", "inject=nowhere"],
    ["erase", "--method", "fmn", "--concept", "circle", "--set", "templates=['no braces']"],
    ["erase", "--method", "kpop", "--concept", "circle", "--preset", "sd99"],
    ["erase", "--method", "uce"],
    ["generate", "--prompt", "a circle", "--n", "0"],
    ["generate", "--prompt", "a circle", "--sample-steps", "-1"],
    ["evaluate", "--edit", "e.safetensors", "--guidance", "nan"],
]


def test_usage_errors_come_before_the_heavy_imports():
    """Options are parsed and checked whole before torch, diffusers or transformers is imported,
    so a mistake is answered at once (a fresh interpreter, since this one has them loaded)."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from fasterase.cli import main\n"
        f"codes = [main(argv) for argv in {json.dumps(USAGE_ERRORS)}]\n"
        "print(json.dumps([codes, sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    codes, heavy = json.loads(result.stdout.splitlines()[-1])
    assert codes == [2] * len(USAGE_ERRORS) and heavy == [], (codes, heavy, result.stderr)
    assert len(result.stderr.splitlines()) == len(USAGE_ERRORS) and "Traceback" not in result.stderr


CALLS = [
    (lambda tmp: fasterase.erase("uce", "circle", out=tmp / "e.safetensors"), "concepts must be a list of strings, not 'circle'"),
    (lambda tmp: fasterase.erase(3, ["circle"], out=tmp / "e.safetensors"), "method must be a method's name"),
    (lambda tmp: fasterase.erase("uce", [3], out=tmp / "e.safetensors"), "concepts must be a list of strings"),
    (lambda tmp: fasterase.erase("uce", ["circle"], out=tmp / "e.safetensors", lam=float("nan")), "lam must be a finite number"),
    (lambda tmp: fasterase.generate("a circle", out=tmp / "g.png"), "prompts must be a list of strings, not 'a circle'"),
    (lambda tmp: fasterase.generate(["a circle"], n="2", out=tmp / "g.png"), "n must be a whole number"),
    (lambda tmp: fasterase.evaluate(tmp / "e.safetensors", "circle"), "concepts must be a list of strings"),
    (lambda tmp: fasterase.evaluate(tmp / "e.safetensors", preserve="square"), "preserve must be a list of strings"),
    (lambda tmp: api.compare(str(tmp / "e.safetensors")), "edits must be a list of edit files"),
    (lambda tmp: api.compare([3]), "edits must be a list of edit files"),
    (lambda tmp: fasterase.erase("uce", ["circle"], out=3), "out must be a path, not 3"),
    (lambda tmp: fasterase.erase("uce", ["circle"], config=3, out=tmp / "e.safetensors"), "config must be a path, not 3"),
    (lambda tmp: fasterase.erase("uce", ["circle"], preset=["sd14"], out=tmp / "e.safetensors"), "preset must be a preset's name"),
    (lambda tmp: fasterase.erase("uce", ["circle"], progress=3, out=tmp / "e.safetensors"), "progress must be a function, not 3"),
    (lambda tmp: fasterase.generate(["a circle"], edit=3, out=tmp / "g.png"), "edit must be a path, not 3"),
    (lambda tmp: fasterase.generate(["a circle"], key=b"k", out=tmp / "g.png"), "key must be a path"),
    (lambda tmp: fasterase.generate(["a circle"], sampling="fast", out=tmp / "g.png"), "sampling must be a SamplingConfig, not 'fast'"),
    (lambda tmp: fasterase.generate([], out=tmp / "g.png"), "prompts must hold at least one prompt"),
    (lambda tmp: fasterase.generate(["a circle"], sampling=fasterase.SamplingConfig(steps="3"), out=tmp / "g.png"), "option 'steps' must be an int"),
    (lambda tmp: fasterase.evaluate(None), "edit must be an edit file's path, not None"),
    (lambda tmp: fasterase.load_edited(edit=7), "edit must be a path, not 7"),
]


@pytest.mark.parametrize("call, message", CALLS)
def test_bad_api_calls(call, message, tmp_path, monkeypatch):
    no_model(monkeypatch)
    with pytest.raises(UserError) as err:
        call(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def _edit_json(path, **changes):
    import json

    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _pickled_unet(folder):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # its bytes are never read: refused by name


def _custom_code(folder):
    _edit_json(folder / "model_index.json", unet=["my_unet", "MyUNet"])
    (folder / "unet" / "my_unet.py").write_text("raise SystemExit('custom code ran')\n")


def _pndm_with_runge_kutta(folder):
    _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="PNDMScheduler", skip_prk_steps=False)
    _edit_json(folder / "model_index.json", scheduler=["diffusers", "PNDMScheduler"])


MODEL_FOLDERS = [
    (_pickled_unet, "has its weights only as a pickle (diffusion_pytorch_model.bin), which fasterase never reads"),
    (lambda f: shutil.rmtree(f / "vae"), "lacks its vae: model_index.json names one, but there is no folder vae/"),
    (lambda f: shutil.rmtree(f / "tokenizer"), "lacks its tokenizer"),
    (_custom_code, "contains custom code"),
    (lambda f: (f / "model_index.json").write_text("{not json"), "model_index.json as JSON"),
    (lambda f: (f / "unet" / "config.json").write_text("[1, 2]"), "unet/config.json is not a JSON object"),
    (lambda f: _edit_json(f / "unet" / "config.json", sample_size="abc"), "the UNet's sample_size is 'abc'"),
    (lambda f: _edit_json(f / "unet" / "config.json", cross_attention_dim=48), "could not load the pipeline"),
    (lambda f: _edit_json(f / "vae" / "config.json", scaling_factor="x"), "the VAE's scaling_factor ('x') must be a positive number"),
    (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", prediction_type="bogus"), "prediction type 'bogus' is not supported"),
    (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", num_train_timesteps=-5), "could not load the pipeline"),
    (_pndm_with_runge_kutta, "the model's PNDMScheduler cannot draw images in 2 steps"),
    (lambda f: (f / "text_encoder" / "model.safetensors").write_bytes(b"\x08" * 64), "could not load the pipeline"),
]


@pytest.mark.parametrize("spoil, message", MODEL_FOLDERS, ids=[m[:40] for _, m in MODEL_FOLDERS])
def test_model_folders_that_cannot_be_used(tiny_pipeline_dir, tmp_path, capsys, spoil, message):
    """Folders diffusers cannot load, or loads but could not draw with: one line, before any image."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, folder)
    spoil(folder)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    argv = ["generate", "--model", str(folder), "--prompt", "a circle", "--n", "1", "--sample-steps", "2", "--out", str(tmp_path / "g.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "custom code ran" not in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == files


def test_images_that_overflow_are_refused_not_written(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Weights or a guidance that overflow in the model's dtype give nan pixels, which a PNG would
    show as black and a judge would score: the sampler refuses them."""
    import types

    from fasterase.config import SamplingConfig
    from fasterase.evaluation.sampling import generate
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    monkeypatch.setattr(type(pipe), "__call__", lambda self, prompt, **kw: types.SimpleNamespace(images=np.full((len(prompt), 8, 8, 3), np.nan)))
    with pytest.raises(UserError, match="sampling produced nan or inf pixels"):
        generate(pipe, ["a circle"], SamplingConfig(steps=2))


def test_more_sampling_steps_than_the_scheduler_has(tmp_path, capsys):
    assert main(["generate", "--prompt", "a circle", "--n", "1", "--sample-steps", "5000", "--out", str(tmp_path / "g.png")]) == 2
    assert "DDIMScheduler cannot draw images in 5000 steps" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def base_edit(tmp_path_factory):
    """A real UCE edit of the built-in world, to be spoilt."""
    folder = tmp_path_factory.mktemp("edit")
    return api.erase("uce", ["circle"], out=folder / "uce.safetensors").edit


def spoilt(base_edit, tmp_path, change):
    from fasterase.edits import load_edit, save_edit

    edit = load_edit(base_edit)
    name = next(iter(edit.tensors))
    edit.tensors[name] = change(edit.tensors[name])
    save_edit(tmp_path / "spoilt.safetensors", edit)
    return tmp_path / "spoilt.safetensors"


@pytest.mark.parametrize("change, message", [
    (lambda t: t.clone().fill_(float("nan")), "holds nan or inf"),
    (lambda t: torch.full_like(t, float("inf")), "holds nan or inf"),
    (lambda t: t.to(torch.int8), "is torch.int8"),
    (lambda t: t > 0, "is torch.bool"),
])
def test_spoilt_edits_are_refused_before_sampling(base_edit, tmp_path, capsys, change, message):
    edit = spoilt(base_edit, tmp_path, change)
    grid = tmp_path / "grid.png"
    assert main(["generate", "--prompt", "a circle", "--edit", str(edit), "--n", "1", "--out", str(grid)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not grid.exists()


def test_edits_apply_only_to_the_weights_they_were_made_for(base_edit, tmp_path, capsys):
    """A copy of the base model with one attention weight scaled by 1.5 refuses the original's
    edit; an edit that also changes the VAE, which no fingerprint binds, is refused everywhere."""
    import safetensors.torch

    from fasterase.edits import load_edit, save_edit
    from fasterase.models.loading import builtin_model_dir

    model = tmp_path / "model"
    shutil.copytree(builtin_model_dir(), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    name = next(k for k in tensors if k.endswith("attn1.to_q.weight"))
    tensors[name] = tensors[name] * 1.5
    safetensors.torch.save_file(tensors, str(weights))
    edit = load_edit(base_edit)
    edit.tensors["vae.decoder.conv_out.bias"] = torch.zeros(3)
    save_edit(tmp_path / "with-vae.safetensors", edit)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for argv, message in [
        (["--model", str(model), "--edit", str(base_edit)], "its unet differs from this model's"),
        (["--edit", str(tmp_path / "with-vae.safetensors")], "this edit changes 'vae.decoder.conv_out.bias': edits change only the unet and text_encoder"),
    ]:
        assert main(["generate", "--prompt", "a circle", "--n", "1", "--out", str(tmp_path / "g.png"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == files


def test_outputs_never_overwrite_inputs(base_edit, tmp_path, capsys):
    """The same file by any name, a file inside the model's folder, or anything not a regular file."""
    import os

    from fasterase.models.loading import builtin_model_dir

    edit_copy = tmp_path / "edit.safetensors"
    edit_copy.write_bytes(base_edit.read_bytes())
    os.link(edit_copy, tmp_path / "hardlink.safetensors")
    (tmp_path / "captions.txt").write_text("a circle\n")
    os.mkfifo(tmp_path / "fifo")
    weights = builtin_model_dir() / "unet" / "diffusion_pytorch_model.safetensors"
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} | {"weights": weights.stat().st_mtime_ns}
    cases = [
        (["generate", "--prompt", "a circle", "--edit", str(edit_copy), "--out", str(edit_copy)], "is an input"),
        (["generate", "--prompt", "a circle", "--edit", str(edit_copy), "--out", str(tmp_path / "hardlink.safetensors")], "is an input"),
        (["evaluate", "--edit", str(edit_copy), "--grid", str(edit_copy)], "is an input"),
        (["erase", "--method", "uce", "--concept", "circle", "--out", str(weights)], "inside the input folder"),
        (["cache", "build", "--prompts", str(tmp_path / "captions.txt"), "--out", str(tmp_path / "captions.txt")], "is an input"),
        (["erase", "--method", "uce", "--concept", "circle", "--out", str(tmp_path / "fifo")], "not a regular file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} | {"weights": weights.stat().st_mtime_ns} == before


def test_untrusted_text_reaches_the_terminal_safe_and_short(tmp_path, capsys):
    """Metadata from a file is shown without control characters; a long concept is quoted cut short."""
    from fasterase.edits import Edit, EditMetadata, save_edit

    edit = tmp_path / "foreign.safetensors"
    save_edit(edit, Edit({}, EditMetadata("uce", ["circle"], {}, {"unet": {"float16": "0" * 16}}, "\x1b[2J\x1b]0;owned\x07 model\nsecond line")))
    assert main(["generate", "--prompt", "a circle", "--edit", str(edit), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and err.count("\n") == 1 and "\\x1b[2J" in err
    assert main(["erase", "--method", "uce", "--concept", "circle " * 500, "--out", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err
    assert len(err) < 300 and "circle circle" in err and "..." in err


@pytest.mark.parametrize("metadata, message", [
    ({"concepts": "circle"}, "'concepts' of the wrong type"),
    ({"config": [1]}, "'config' of the wrong type"),
    ({"method": 3}, "'method' of the wrong type"),
    ({"base_fingerprints": None}, "'base_fingerprints' of the wrong type"),
    ({"base_fingerprints": {"unet": {"float8": "0"}}}, "has malformed fingerprints"),
])
def test_malformed_edit_metadata(base_edit, tmp_path, metadata, message):
    import json

    import safetensors.torch

    from fasterase.edits import load_edit

    tensors = safetensors.torch.load_file(str(base_edit))
    with safetensors.safe_open(str(base_edit), "pt") as reader:
        values = reader.metadata()
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={**values, **{k: json.dumps(v) for k, v in metadata.items()}})
    with pytest.raises(UserError, match=message):
        load_edit(path)
    deep = {**values, "config": "[" * 100000 + "]" * 100000}
    safetensors.torch.save_file(tensors, str(path), metadata=deep)
    with pytest.raises(UserError, match="nested too deep"):
        load_edit(path)


def test_binary_yaml(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    assert main(["erase", "--method", "uce", "--concept", "circle", "--config", str(config), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize("content, message", [
    (None, "cannot read {path}: No such file or directory"),
    (b"\n  \n", "anchor_prompts {path} has no captions (one a line)"),
    (bytes(range(256)) * 4, "{path} is not UTF-8 text"),
    (b"a photo of a square\n", "is an input"),
])
def test_unusable_anchor_prompts(tmp_path, capsys, monkeypatch, content, message):
    """CA's caption file is read when the options are checked: one line, before any model loads,
    and never written over."""
    no_model(monkeypatch)
    captions = tmp_path / "captions.txt"
    if content is not None:
        captions.write_bytes(content)
    out = captions if message == "is an input" else tmp_path / "e.safetensors"
    argv = ["erase", "--method", "ca", "--concept", "circle", "--set", "anchor=square", "--set", f"anchor_prompts={captions}", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(path=captions) in err and "\n" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ([] if content is None else ["captions.txt"])
    assert content is None or captions.read_bytes() == content


@pytest.fixture(scope="module")
def two_kpop_edits(tiny_pipeline_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kpop")
    options = {"steps": 1, "trajectories": 1, "sample_steps": 2, "batch_size": 1, "prompt_length": 1}
    return [api.erase("kpop", ["circle"], model=tiny_pipeline_dir, out=folder / f"{n}.safetensors", seed=n, **options) for n in (1, 2)]


def test_a_key_works_with_its_own_edit_alone(tiny_pipeline_dir, two_kpop_edits, tmp_path):
    first, second = two_kpop_edits
    grid = tmp_path / "g.png"
    from fasterase.config import SamplingConfig

    run = {"model": tiny_pipeline_dir, "n": 1, "out": grid, "sampling": SamplingConfig(steps=2)}
    api.generate(["a circle"], edit=first.edit, key=first.key, **run)
    grid.unlink()
    with pytest.raises(UserError, match="belongs to another edit"):
        api.generate(["a circle"], edit=first.edit, key=second.key, **run)
    with pytest.raises(UserError, match="pass that edit too"):
        api.generate(["a circle"], key=first.key, **run)
    assert not grid.exists()


@pytest.mark.parametrize("tensors, metadata, message", [
    ({}, {}, "this key is malformed"),
    ({"prompt": torch.zeros(3, 5)}, {}, "this key is malformed"),
    ({"prompt": torch.full((1, 32), float("nan"))}, {}, "this key is malformed"),
    ({"prompt": torch.zeros(1, 32, dtype=torch.int8)}, {}, "this key is malformed"),
    ({"prompt": torch.zeros(2, 32)}, {"prompt_mode": "additive"}, "this key is malformed"),
    (None, {"inject": ["mid"]}, "this key is malformed"),
    (None, {"method": ["kpop"]}, "this key names no method"),
    (None, {"method": "uce"}, "uce edits have no key"),
])
def test_malformed_keys_of_the_right_edit(tiny_pipeline_dir, two_kpop_edits, tmp_path, tensors, metadata, message):
    """A key that names its edit but whose prompt or metadata do not fit the model."""
    from fasterase.edits import KEY_FORMAT, encode_metadata, load_key, save_atomically
    from fasterase.config import SamplingConfig

    first = two_kpop_edits[0]
    key_tensors, key_metadata = load_key(first.key)
    key = tmp_path / "spoilt.key.safetensors"
    spoilt_tensors = key_tensors if tensors is None else tensors
    save_atomically(key, spoilt_tensors, encode_metadata(KEY_FORMAT, {**key_metadata, **metadata}))
    grid = tmp_path / "g.png"
    with pytest.raises(UserError, match=message):
        api.generate(["a circle"], model=tiny_pipeline_dir, edit=first.edit, key=key, n=1, out=grid, sampling=SamplingConfig(steps=2))
    assert not grid.exists()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt(), SystemExit(143)])
def test_the_edit_and_its_key_are_written_together_or_not_at_all(two_kpop_edits, tmp_path, monkeypatch, failure):
    """A full disk or an interruption while the second file is written leaves neither new file,
    no temporary file, and the earlier outputs as they were."""
    import safetensors.torch

    from fasterase.edits import Edit, load_edit, load_key, save_edit

    first = two_kpop_edits[0]
    edit_path, key_path = tmp_path / "edit.safetensors", tmp_path / "edit.key.safetensors"
    edit_path.write_bytes(b"earlier edit")
    key_path.write_bytes(b"earlier key")
    write = safetensors.torch.save_file
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        write(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    edit, (tensors, metadata) = load_edit(first.edit), load_key(first.key)
    with pytest.raises((UserError, KeyboardInterrupt, SystemExit)):
        save_edit(edit_path, Edit(edit.tensors, edit.metadata), (key_path, tensors, metadata))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.key.safetensors", "edit.safetensors"]
    assert edit_path.read_bytes() == b"earlier edit" and key_path.read_bytes() == b"earlier key"


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)])
def test_a_signal_during_training_writes_nothing(tiny_pipeline_dir, tmp_path, capsys, monkeypatch, signum, status):
    """SIGINT or SIGTERM in the middle of training: the command ends with its status, the earlier
    edit is as it was, and nothing else is left."""
    import os

    from fasterase.methods.training import Optimization

    step = Optimization.step

    def interrupted(self, loss):
        step(self, loss)
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(Optimization, "step", interrupted)
    out = tmp_path / "edit.safetensors"
    out.write_bytes(b"earlier edit")
    argv = ["erase", "--method", "esd", "--concept", "circle", "--model", str(tiny_pipeline_dir), "--out", str(out), "--steps", "3",
            "--set", "trajectories=1", "--set", "sample_steps=2", "--set", "batch_size=1"]
    assert main(argv) == status
    assert "Traceback" not in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"] and out.read_bytes() == b"earlier edit"
