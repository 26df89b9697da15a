"""Loaded first by every pytest run in the checkout (tests/ and benchmarks/): importing fasterase
takes the checkout's root off sys.path before anything imports transformers (see
fasterase/__init__.py)."""

import fasterase  # noqa: F401
