"""Which implementation of an op runs here, and why the others cannot.

Each backend lists, for given inputs, the reasons it cannot run them (xformers' dispatch does the
same); `auto` takes the first backend with no reasons.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from fasterase.errors import UserError
from fasterase.names import BACKEND_NAMES

from .cross_attention_torch import cross_attention_torch
from .ridge_solve import ridge_solve_cuda, ridge_solve_reference


def _cross_attention_triton(*args):
    # Imported on first use: triton is optional, and it reads TRITON_INTERPRET when the kernels are defined.
    from .cross_attention_triton import cross_attention_triton

    return cross_attention_triton(*args)


# op name -> backend name -> implementation; an op missing from a backend is not written in it.
# A "cuda" implementation calls the op fasterase::<op name> that the extension (csrc/) registers.
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "cross_attention": {"torch": cross_attention_torch, "triton": _cross_attention_triton},
    "ridge_solve": {"torch": ridge_solve_reference, "cuda": ridge_solve_cuda},
}


class BackendUnavailable(UserError):
    """A forced backend cannot run the given inputs."""


# Every attention call asks whether the extension is there, and Python retries a failed import (a
# search of sys.path, ~35 us here) each time: the answer is kept, since what is installed does not
# change while the process runs. (Not functools.cache: torch.compile traces through this and warns
# about cache wrappers.)
_EXTENSION_REASON_UNKNOWN = object()
_extension_reason: str | None | object = _EXTENSION_REASON_UNKNOWN
# Whether triton can be imported, without importing it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _cuda_extension_reason() -> str | None:
    global _extension_reason
    if _extension_reason is _EXTENSION_REASON_UNKNOWN:
        try:
            import fasterase._C  # noqa: F401
        except ImportError as exc:
            _extension_reason = f"the CUDA extension is not built ({exc})"
        else:
            _extension_reason = None
    return _extension_reason


def _reasons(op: str, backend: str, example: torch.Tensor | None, inputs: tuple | None = None, auto: bool = False) -> list[str]:
    """Why `backend` cannot run `op` on tensors like `example` (and, when given, on the op's
    arguments `inputs`); `auto`: for the automatic choice, which leaves the Triton interpreter alone."""
    reasons = []
    if backend not in _IMPLEMENTATIONS[op]:
        reasons.append(f"{op} is not written in {backend} (a run forced to {backend} runs it on torch)")
    if backend == "triton":
        if not _TRITON_INSTALLED:
            reasons.append("triton is not installed")
        elif op == "cross_attention" and inputs is not None:
            from .cross_attention_triton import unsupported_reasons

            reasons += unsupported_reasons(*inputs)
        if example is not None and example.device.type != "cuda":
            if os.environ.get("TRITON_INTERPRET") != "1":
                reasons.append(f"triton kernels run on CUDA tensors, these are on {example.device.type} (TRITON_INTERPRET=1 runs them on the CPU, slowly)")
            elif auto:
                reasons.append(f"auto leaves {example.device.type} tensors to torch: the Triton interpreter (TRITON_INTERPRET=1) runs only when forced")
    if backend == "cuda":
        if example is not None and example.device.type != "cuda":
            reasons.append(f"the CUDA extension needs CUDA tensors, these are on {example.device.type}")
        reason = _cuda_extension_reason()
        if reason:
            reasons.append(reason)
        elif backend in _IMPLEMENTATIONS[op] and not getattr(torch.ops.fasterase, op).default.has_kernel_for_dispatch_key("CUDA"):
            reasons.append(f"the CUDA extension was built without fasterase::{op} (rebuild it)")
    return reasons


def implementation(op: str, backend: str, example: torch.Tensor | None = None, inputs: tuple | None = None) -> Callable:
    """The implementation of `op` for `backend` ("auto" or one of BACKEND_NAMES); `inputs`, the
    op's arguments, let a backend refuse shapes it does not support."""
    if backend == "auto":
        for name in ("cuda", "triton", "torch"):
            if not _reasons(op, name, example, inputs, auto=True):
                return _IMPLEMENTATIONS[op][name]
        raise AssertionError("the torch backend always runs")
    if backend not in BACKEND_NAMES:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose auto, {', '.join(BACKEND_NAMES)}")
    reasons = _reasons(op, backend, example, inputs)
    if reasons:
        raise BackendUnavailable(f"backend {backend!r} cannot run {op}: {'; '.join(reasons)}")
    return _IMPLEMENTATIONS[op][backend]


def backend_for(op: str, backend: str) -> str:
    """The backend that a run-wide choice (a method's `backend`, the CLI's --backend) gives `op`:
    the choice itself where `op` has an implementation in it, else torch.

    A forced backend picks the implementation of the ops written in it; an op it lacks by design
    (no Triton Cholesky for ridge_solve, no CUDA C++ cross_attention yet) is not a reason to refuse
    the run, so it runs on torch. Whether the chosen implementation can run the inputs is
    still checked when the op is called: a backend that cannot run there raises, as before.
    """
    if backend == "auto" or backend in _IMPLEMENTATIONS[op]:
        return backend
    return "torch"


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
