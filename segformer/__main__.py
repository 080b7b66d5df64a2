"""``python -m segformer ...`` (and ``torchrun -m segformer train ...``): the segformer command."""

import sys

from .cli import main

sys.exit(main())
