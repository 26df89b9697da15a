"""torchrun: two gloo processes give exactly what one gives (each draws and judges its share)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hand_made_edits import hand_made_edit

import fasterase
from fasterase.errors import UserError

# one thread per process in both runs: thread counts change float sums in the last bit
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(argv: list[str], processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m", "fasterase"] if processes > 1 else [sys.executable, "-m", "fasterase"]
    return subprocess.run([*launcher, *argv], capture_output=True, text=True, timeout=600, env=ENV)


def test_evaluate_and_generate_on_two_processes_match_one(tmp_path):
    edit = hand_made_edit(None, tmp_path / "edit.safetensors")
    # as the README writes it: --count, since torchrun reads --n as an abbreviation of its options
    evaluate = ["evaluate", "--edit", str(edit), "--count", "5", "--sample-steps", "2", "--sample-batch", "4", "--preserve", "square", "--json"]
    generate = ["generate", "--prompt", "a photo of a circle", "--prompt", "a photo of a star", "--count", "3", "--sample-steps", "2", "--sample-batch", "2"]
    results = {}
    for processes in (1, 2):
        done = run([*evaluate, "--grid", str(tmp_path / f"eval{processes}.png")], processes)
        assert done.returncode == 0, done.stderr[-2000:]
        results[processes] = json.loads(done.stdout.strip().splitlines()[-1])
        results[processes].pop("grid"), results[processes].pop("report")
        done = run([*generate, "--out", str(tmp_path / f"grid{processes}.png")], processes)
        assert done.returncode == 0, done.stderr[-2000:]
    assert results[2] == results[1]
    for name in ("eval", "grid"):
        assert (tmp_path / f"{name}2.png").read_bytes() == (tmp_path / f"{name}1.png").read_bytes()


def test_mace_on_two_processes_makes_the_one_process_edit(tmp_path):
    """Concept k trains in process k mod 2 on the items one process would give it: the fused edit
    is the one-process edit."""
    from fasterase.edits import load_edit

    erase = ["erase", "--method", "mace", "--concept", "circle", "--concept", "square", "--set", "steps=3", "--set", "image_count=2",
             "--set", "sample_steps=2", "--set", "batch_size=1", "--set", "templates=['a photo of a {}']"]
    for processes in (1, 2):
        done = run([*erase, "--out", str(tmp_path / f"mace{processes}.safetensors")], processes)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = (load_edit(tmp_path / f"mace{p}.safetensors").tensors for p in (1, 2))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


def test_commands_that_do_not_share_their_work_refuse_torchrun(tmp_path, monkeypatch):
    """Every process would erase alone and write its own edit over the others' (and a key that
    belongs to another process's edit)."""
    done = run(["erase", "--method", "uce", "--concept", "circle", "--out", str(tmp_path / "e.safetensors")], 2)
    assert done.returncode != 0 and "uce does not share its work under torchrun (each process would write its own edit); methods that do: mace" in done.stderr
    done = run(["cache", "build", "--prompts", str(tmp_path / "captions.txt"), "--out", str(tmp_path / "g.safetensors")], 2)
    assert done.returncode != 0 and "cache runs in one process; under torchrun, evaluate, generate and erase share their work" in done.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="kpop does not share its work under torchrun"):
        fasterase.erase("kpop", ["circle"], out=tmp_path / "e.safetensors")
    assert not list(tmp_path.iterdir())
