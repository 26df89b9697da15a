"""Every method on real-size SD1.5 and SDXL architectures (random weights), a couple of steps each:
seconds and peak memory per method and family, written to benchmarks/results/.

    python benchmarks/real_size.py                      # sd1 and sdxl, every method, 256 px
    python benchmarks/real_size.py --families sd1 --methods kpop uce --image-size 512

Nothing is downloaded: each family's pipeline is built from the released model's config with random
weights (`fasterase.models.random_init`) into a temporary folder. Each erasure runs in a process of
its own, so that its peak memory is its own: on a GPU the peak of torch's allocator; on a CPU the
process's peak resident memory (with the loaded model, reported on its own as "load") and the peak
of the memory the run allocated itself ("peak_anon_mb", sampled every 10 ms): under memory pressure
the kernel drops pages of the memory-mapped weights from the resident set, so the first can
understate a large model's run, and the second never counts them.
A CPU runs float32; a GPU float32 and bfloat16 (frozen weights in that dtype, trained tensors in
float32). The settings are the methods' defaults with the amounts of work cut to a couple of steps
(TINY below), so the numbers show what a run holds, not how long a real erasure takes. Not part of
the test suite: a CPU run of both families takes about half an hour and most of 24 GB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
METHODS = ("kpop", "esd", "ca", "fmn", "mace", "fewshot", "uce")
# the amounts of work cut to a couple of steps; every other option is the method's default
TINY = {
    "kpop": {"steps": 2, "trajectories": 1, "sample_steps": 2, "batch_size": 1},
    "esd": {"steps": 2, "trajectories": 1, "sample_steps": 2, "batch_size": 1},
    "ca": {"steps": 2, "trajectories": 1, "sample_steps": 2, "batch_size": 1},
    "fmn": {"steps": 2, "image_count": 1, "sample_steps": 2, "batch_size": 1},
    "mace": {"steps": 2, "image_count": 1, "sample_steps": 2, "batch_size": 1},
    "fewshot": {"steps": 2, "image_count": 1, "sample_steps": 2, "batch_size": 1},
    "uce": {},
}
CONCEPTS = ["circle", "square"]


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class AnonymousPeak:
    """The peak of the process's anonymous resident memory (Linux: RssAnon in /proc/self/status),
    sampled every 10 ms in a thread while the block runs."""

    def __enter__(self) -> "AnonymousPeak":
        self.peak_kib, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def child(folder: str, method: str, dtype: str) -> dict:
    """One measurement in this process: loading alone (method "load") or one erasure."""
    from fasterase import api
    from fasterase.models.loading import load_pipeline

    device = api.default_device()
    start = time.time()
    with AnonymousPeak() as anonymous:
        if method == "load":
            pipe = load_pipeline(folder, dtype=dtype if device.type == "cuda" else "float32", device=device)
            parameters = sum(
                p.numel() for name in ("unet", "text_encoder", "text_encoder_2", "vae") if getattr(pipe, name, None) is not None
                for p in getattr(pipe, name).parameters()
            )
            row = {"seconds": round(time.time() - start, 2), "peak_memory_mb": round(_peak_bytes(device) / 2**20), "parameters": parameters}
        else:
            with tempfile.TemporaryDirectory() as out:
                summary = api.erase(method, CONCEPTS, model=folder, out=Path(out) / "edit.safetensors", dtype=dtype, **TINY[method])
                edit_mb = sum(p.stat().st_size for p in Path(out).iterdir()) / 2**20
            row = {
                "seconds": round(time.time() - start, 2), "erase_seconds": round(summary.seconds, 2),
                "peak_memory_mb": round(summary.peak_memory_bytes / 2**20), "edit_mb": round(edit_mb, 1),
            }
    return row | ({"peak_anon_mb": round(anonymous.peak_kib / 1024)} if device.type == "cpu" else {})


def measure(folder: Path, method: str, dtype: str) -> dict:
    """`child` in a fresh process; a process that fails (out of memory, say) is recorded with why."""
    run = subprocess.run([sys.executable, __file__, "--child", str(folder), method, dtype], capture_output=True, text=True)
    if run.returncode < 0:
        return {"failed": f"killed by signal {-run.returncode}" + (" (out of memory)" if run.returncode == -9 else "")}
    if run.returncode != 0:
        lines = (run.stderr or "").strip().splitlines()
        return {"failed": f"exit status {run.returncode}" + (f": {lines[-1]}" if lines else "")}
    return json.loads(run.stdout.strip().splitlines()[-1])


def environment() -> dict:
    import diffusers
    import transformers

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sd2", "sdxl"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--image-size", type=int, default=256, help="pixels (256 keeps a CPU run to minutes)")
    parser.add_argument("--dtypes", nargs="+", help="default: float32 on a CPU, float32 and bfloat16 on a GPU")
    parser.add_argument("--out", help="the JSON to write (default: benchmarks/results/real_size-<gpu or cpu>-<date>.json)")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "METHOD", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    from fasterase.models.random_init import save_random_pipeline

    env = environment()
    dtypes = args.dtypes or (["float32", "bfloat16"] if env["gpu"] else ["float32"])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for family in args.families:
            start = time.time()
            folder = save_random_pipeline(Path(scratch) / family, family, "real", image_size=args.image_size)
            print(f"{family}: built in {time.time() - start:.0f} s", file=sys.stderr)
            for dtype in dtypes:
                for method in ("load", *args.methods):
                    row = {"family": family, "method": method, "dtype": dtype, "image_size": args.image_size, **measure(folder, method, dtype)}
                    print(json.dumps(row), file=sys.stderr)
                    rows.append(row)
    name = re.sub(r"[^A-Za-z0-9.]+", "-", env["gpu"] or "cpu").strip("-")
    out = Path(args.out) if args.out else RESULTS / f"real_size-{name}-{env['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "real_size", **env, "settings": TINY, "concepts": CONCEPTS, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
