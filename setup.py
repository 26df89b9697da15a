"""Build script: package layout and the optional CUDA extension.

Metadata and dependencies are in pyproject.toml. `kernels/` is installed as `fasterase.kernels`.
The extension `fasterase._C` (csrc/) is built only where it can be; otherwise the package is
pure Python and the `cuda` backend reports itself unavailable.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup


def cuda_build_plan():
    """Return (sources, None) when the CUDA extension can be built, else ([], reason)."""
    if os.environ.get("FASTERASE_SKIP_CUDA_BUILD") == "1":
        return [], "FASTERASE_SKIP_CUDA_BUILD=1"
    # setuptools wants source paths relative to this file's directory.
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.relpath(p, here)
        for ext in ("cpp", "cu")
        for p in glob.glob(os.path.join(here, "csrc", f"*.{ext}"))
    )
    if not sources:
        return [], "csrc/ has no .cpp or .cu sources"
    try:
        import torch
    except ImportError:
        return [], "torch is not importable (install torch first, then pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return [], "torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not (os.path.isfile(nvcc) or os.path.isfile(nvcc + ".exe")):
        return [], "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return sources, None


def extension_kwargs():
    sources, reason = cuda_build_plan()
    if reason is not None:
        print(f"fasterase: skipping the CUDA extension: {reason}")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    return {
        "ext_modules": [
            CUDAExtension(
                "fasterase._C",
                sources,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        ],
        "cmdclass": {"build_ext": BuildExtension},
    }


setup(
    packages=find_packages(include=["fasterase", "fasterase.*"])
    + ["fasterase.kernels"]
    + [f"fasterase.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"fasterase.kernels": "kernels"},
    **extension_kwargs(),
)
