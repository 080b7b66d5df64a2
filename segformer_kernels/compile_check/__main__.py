"""python -m segformer_kernels.compile_check (see the package docstring).

A package with __main__ rather than a module run as __main__: the package
``segformer_kernels`` imports the kernel modules, which import compile_check, so
running the module itself as __main__ would execute a second copy of it.
"""

import sys

from segformer_kernels.compile_check import main

sys.exit(main())
