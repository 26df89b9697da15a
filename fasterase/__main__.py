"""`python -m fasterase ...`, which torchrun starts once per process: `torchrun --nproc-per-node N -m fasterase evaluate ...`."""

import sys

from .cli import main

sys.exit(main())
