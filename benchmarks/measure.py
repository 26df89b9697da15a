"""What every benchmark measures, the same way on a GPU and on a CPU: the device, wall time that
waits for the device, and the peak memory of one call.

Peak memory: on CUDA, torch's allocator peak above what was allocated before the call; on a CPU
(Linux), the process's peak resident memory above its resident memory before the call, with the
kernel's high-water mark reset first (/proc/self/clear_refs), so that it is this call's. Memory the
process had freed but kept can be reused unseen, so a CPU peak is a lower bound; it is None where
/proc cannot reset it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
_STATUS = Path("/proc/self/status")
T = TypeVar("T")


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of `fn` over `runs` runs after one warm-up, each waiting for the device."""
    fn()
    times = []
    for _ in range(runs):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
    except OSError:
        return False
    return True


def measured(fn: Callable[[], T]) -> tuple[T, float, int | None]:
    """One call of `fn`: its result, its wall time (waiting for the device), and the peak memory it
    took above what was in use before it (see the module)."""
    if CUDA:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _status_kib("VmRSS") * 1024 if _reset_cpu_peak() else None
    start = time.perf_counter()
    result = fn()
    synchronize()
    seconds = time.perf_counter() - start
    if CUDA:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = None if before is None else max(0, _status_kib("VmHWM") * 1024 - before)
    return result, seconds, peak


def peak_bytes(fn: Callable[[], object]) -> int | None:
    """The peak memory one call of `fn` takes above what was in use before it."""
    return measured(fn)[2]


def megabytes(size: int | None) -> float | None:
    """A peak in MiB for the results files (None where it could not be measured)."""
    return None if size is None else round(size / 2**20, 1)
