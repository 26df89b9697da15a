"""fasterase: fast concept erasure for text-to-image diffusion models.

    import fasterase
    pipe = fasterase.load_pipeline()          # the built-in world
    fasterase.erase("kpop", ["circle"], out="circle.safetensors")
"""

from __future__ import annotations

import importlib
import os
import sys

# A source checkout's root holds kernels/, which setup.py installs as fasterase.kernels. Run from
# the root (`python -m fasterase`, `python -m pytest`), Python puts the root on sys.path, and that
# folder shadows Hugging Face's `kernels` package, which transformers imports where it is
# installed. The installed package never needs the root on the path; setup.py marks a checkout.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "setup.py")):
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _CHECKOUT]

__version__ = "0.1.0"

_EXPORTS = {
    "load_pipeline": "fasterase.models.loading",
    "erase": "fasterase.api",
    "generate": "fasterase.api",
    "evaluate": "fasterase.api",
    "load_edited": "fasterase.api",
    "SamplingConfig": "fasterase.config",
    "UserError": "fasterase.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Imported on first use, so `import fasterase` (and the CLI's --help) stays fast.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fasterase' has no attribute {name!r}")
