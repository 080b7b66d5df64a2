"""Where the benchmark suite lives: the package ``segformer_bench`` once segformer-kernels is
installed (pip ships the repository's bench/ folder under that name), or ``bench`` in a
source checkout. It runs in a fresh interpreter: ``--smoke`` sets TRITON_INTERPRET before
triton is imported, which this process has done already."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

SUITE_MODULES = ("segformer_bench", "bench")


def _has_suite(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None and importlib.util.find_spec(f"{name}.suite") is not None
    except (ImportError, ValueError):
        return False


def suite_module() -> str | None:
    """The importable name of the benchmark suite, or None."""
    return next((name for name in SUITE_MODULES if _has_suite(name)), None)


def run_suite(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python -m <suite> ARGS`` with this interpreter; kwargs go to subprocess.run."""
    module = suite_module()
    if module is None:
        raise ModuleNotFoundError("the benchmark suite is not installed (segformer_bench) nor importable (bench)")
    return subprocess.run([sys.executable, "-m", module, *args], **kwargs)
