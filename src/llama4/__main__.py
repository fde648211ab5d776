"""`python -m llama4 ...` is the `llama4` command (so `torchrun -m llama4 ...` works)."""

import sys

from .cli import main

sys.exit(main())
