"""Which implementation of an op runs here, and why the others cannot.

Each backend lists, for given inputs, the reasons it cannot run them (xformers' dispatch does the
same); `auto` takes the first backend with no reasons.
"""

from __future__ import annotations

from typing import Callable

import torch

from fasterase.errors import UserError

from .reference import cross_attention_reference

BACKEND_NAMES = ("torch", "triton", "cuda")

# op name -> backend name -> implementation; an op missing from a backend is not written yet.
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "cross_attention": {"torch": cross_attention_reference},
}


class BackendUnavailable(UserError):
    """A forced backend cannot run the given inputs."""


def _cuda_extension_reason() -> str | None:
    try:
        import fasterase._C  # noqa: F401
    except ImportError as exc:
        return f"the CUDA extension is not built ({exc})"
    return None


def _reasons(op: str, backend: str, example: torch.Tensor | None) -> list[str]:
    reasons = []
    if backend not in _IMPLEMENTATIONS[op]:
        reasons.append(f"no {backend} implementation of {op} yet")
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            reasons.append("triton is not installed")
        if example is not None and example.device.type != "cuda":
            reasons.append(f"triton kernels run on CUDA tensors, these are on {example.device.type}")
    if backend == "cuda":
        if example is not None and example.device.type != "cuda":
            reasons.append(f"the CUDA extension needs CUDA tensors, these are on {example.device.type}")
        reason = _cuda_extension_reason()
        if reason:
            reasons.append(reason)
    return reasons


def implementation(op: str, backend: str, example: torch.Tensor | None = None) -> Callable:
    """The implementation of `op` for `backend` ("auto" or one of BACKEND_NAMES)."""
    if backend == "auto":
        for name in ("cuda", "triton", "torch"):
            if not _reasons(op, name, example):
                return _IMPLEMENTATIONS[op][name]
        raise AssertionError("the torch backend always runs")
    if backend not in BACKEND_NAMES:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose auto, {', '.join(BACKEND_NAMES)}")
    reasons = _reasons(op, backend, example)
    if reasons:
        raise BackendUnavailable(f"backend {backend!r} cannot run {op}: {'; '.join(reasons)}")
    return _IMPLEMENTATIONS[op][backend]


def backend_status() -> dict[str, dict[str, str]]:
    """op -> backend -> "available" or "unavailable, because ...", for inputs on this machine's
    default device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    example = torch.empty(0, device=device)
    return {
        op: {
            name: "available" if not (r := _reasons(op, name, example)) else "unavailable, because " + "; ".join(r)
            for name in BACKEND_NAMES
        }
        for op in _IMPLEMENTATIONS
    }
