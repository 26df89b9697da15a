"""torchrun: two gloo processes give exactly what one gives (each draws and judges its share)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hand_made_edits import hand_made_edit

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
        results[processes].pop("grid")
        done = run([*generate, "--out", str(tmp_path / f"grid{processes}.png")], processes)
        assert done.returncode == 0, done.stderr[-2000:]
    assert results[2] == results[1]
    for name in ("eval", "grid"):
        assert (tmp_path / f"{name}2.png").read_bytes() == (tmp_path / f"{name}1.png").read_bytes()
