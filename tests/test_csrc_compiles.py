"""Every csrc/ source compiles with nvcc against the installed torch's headers (compile only: where
torch is a CPU build, nothing built here could run). Skipped where there is no nvcc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(p for ext in ("cpp", "cu") for p in CSRC.glob(f"*.{ext}"))


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.is_file() else shutil.which("nvcc")


def cxx_standard() -> str:
    """The C++ standard that this torch's extension builder compiles with (C++20 in recent
    releases, C++17 in older ones); its own source is the only place that says which."""
    return "c++20" if "c++20" in Path(cpp_extension.__file__).read_text() else "c++17"


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_source_compiles(source, tmp_path):
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    command = [
        nvcc(), "-c", str(source), "-o", str(tmp_path / (source.name + ".o")),
        f"-std={cxx_standard()}", "-Xcompiler", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        *(f"-I{path}" for path in includes),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"
    assert (tmp_path / (source.name + ".o")).stat().st_size > 0


def test_there_are_sources():
    assert any(p.name == "ridge_solve.cpp" for p in SOURCES)
