"""How a callable is timed and its memory measured, and what machine a row came from.

On a GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run,
warm-up first) asked for the 20/50/80 % quantiles, and the peak of
``torch.cuda.max_memory_allocated`` over one run after ``reset_peak_memory_stats``.
On CPU (the smoke test): a wall-clock stand-in that exists only so the pipeline runs
end to end; its numbers mean nothing and every row says so.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    ms_p20: float
    ms_p50: float
    ms_p80: float


@dataclass(frozen=True)
class Memory:
    """Peak bytes allocated during one run, and that peak minus what was allocated
    just before the run (inputs, weights, a retained graph), both in MB."""

    peak_mb: float | None
    peak_over_start_mb: float | None


class GpuTimer:
    name = "triton.testing.do_bench (CUDA events, L2 flushed before each run), quantiles 0.2/0.5/0.8"
    meaningful = True

    def __init__(self, warmup_ms: float = 5.0, rep_ms: float = 30.0, min_runs: int = 10, max_rep_ms: float = 3000.0):
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.min_runs = min_runs
        self.max_rep_ms = max_rep_ms

    def time(self, fn: Callable[[], object]) -> Timing:
        import triton.testing

        # First call outside any timing: compilation, autotuning, allocator growth.
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end)
        # do_bench runs rep / estimate times: ask for at least min_runs of a slow callable.
        rep_ms = min(max(self.rep_ms, self.min_runs * estimate_ms), self.max_rep_ms)
        p20, p50, p80 = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(p20, p50, p80)

    def memory(self, fn: Callable[[], object]) -> Memory:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return Memory(peak / 2**20, (peak - start) / 2**20)


class CpuTimer:
    """One call per measurement, no warm-up: the smoke run only proves the pipeline
    works, and under the Triton interpreter every call costs seconds."""

    name = "wall clock on CPU, one call (smoke test only: these timings mean nothing)"
    meaningful = False

    def time(self, fn: Callable[[], object]) -> Timing:
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return Timing(ms, ms, ms)

    def memory(self, fn: Callable[[], object]) -> Memory:
        return Memory(None, None)


def git_commit() -> str:
    """SK_GIT_COMMIT when set (the device machine may get the tree without .git),
    else ``git rev-parse HEAD`` with ``-dirty`` for uncommitted tracked changes."""
    if os.environ.get("SK_GIT_COMMIT"):
        return os.environ["SK_GIT_COMMIT"]
    from . import IN_CHECKOUT

    if not IN_CHECKOUT:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"installed segformer-kernels {version('segformer-kernels')}"
        except PackageNotFoundError:
            return "unknown"
    try:
        run = lambda *args: subprocess.run(  # noqa: E731
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "HEAD")
        return commit + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, timer) -> dict:
    """The fields every row carries about where and how it was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"none (CPU: {platform.processor() or platform.machine()})"
    return {
        "device": device.type,
        "gpu": gpu,
        "timer": timer.name,
        "timings_meaningful": timer.meaningful,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def results_dir_name(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    cleaned = "".join(c if c.isalnum() else "-" for c in gpu.lower())
    return "-".join(part for part in cleaned.split("-") if part)
