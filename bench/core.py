"""What the kernel and end-to-end benchmarks share: the run context, a planned
measurement (Item), and the JSON row every measurement becomes.

Row schema (one JSON object per line of rows.jsonl; fields a measurement has no value
for are null):
  id                   "suite/op/case/provider/mode", unique in a run
  suite                "ceiling" | "kernel" | "e2e"
  op                   kernel op ("mix_ffn", "attention_block", ...), "segformer-b2", "copy", "gemm"
  case                 shape case: "b2-512x512-s1" (variant, image, stage), "512x512-bs16", ...
  provider             "eager" | "sdpa" | "compile" | "fused" | "transformers" | "torch" (ceilings)
  mode                 "fwd" | "bwd" | "fwd+bwd" | "inference" | "train_step" | "copy" | "matmul"
  dtype, batch, shape  benchmark dtype, batch size, the sizes that define the case
  status, note         "ok" | "skipped" | "error", and why (or what ran: which ops used Triton)
  ms_p20/ms_p50/ms_p80 quantiles of the time per call in ms
  images_per_s         batch / median time (end-to-end rows)
  peak_mb              torch.cuda.max_memory_allocated over one call, after reset_peak_memory_stats
  peak_over_start_mb   that peak minus what was allocated just before the call
  min_bytes, min_flops the floor of the work (formulas: bench/roofline.py, bench/README.md)
  achieved_gbps, achieved_tflops             min_bytes and min_flops over the median time
  frac_copy_bandwidth, frac_gemm_rate        those over the ceilings measured in this run
  roofline_floor_ms, frac_roofline, bound    max of the two floor times; floor / median; which term
  saved_bytes, saved_activation_bytes        bytes of the storages autograd saves in one forward
                                             (all / excluding the inputs and weights)
  ceiling_copy_gbps, ceiling_gemm_tflops     this run's ceilings
  device, gpu, timer, timings_meaningful, torch, triton, cuda, python, git_commit, timestamp
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .measure import Memory, Timing
from .roofline import Ceilings, throughput

ROW_FIELDS = (
    "id", "suite", "op", "case", "provider", "mode", "dtype", "batch", "shape", "status", "note",
    "ms_p20", "ms_p50", "ms_p80", "images_per_s", "peak_mb", "peak_over_start_mb",
    "min_bytes", "min_flops", "achieved_gbps", "achieved_tflops", "frac_copy_bandwidth", "frac_gemm_rate",
    "roofline_floor_ms", "frac_roofline", "bound", "saved_bytes", "saved_activation_bytes",
    "ceiling_copy_gbps", "ceiling_gemm_tflops",
    "device", "gpu", "timer", "timings_meaningful", "torch", "triton", "cuda", "python", "git_commit", "timestamp",
)

# Priorities: lower runs first. The measurements behind the targets in docs/design.md
# come first, then everything cheap; torch.compile's max-autotune compilations, which
# take tens of seconds to minutes each, fill whatever time is left.
PRIORITY_TARGET = 1
PRIORITY_COMPILE_TARGET_KERNEL = 2
PRIORITY_KERNEL = 3
PRIORITY_E2E = 4
PRIORITY_COMPILE_TARGET_E2E = 5
PRIORITY_COMPILE_KERNEL = 6
PRIORITY_COMPILE_E2E = 7


# Where the docs/design.md targets are read: the two blocks at stage 1 of B0 and B2 at
# 512^2 (where they move the most bytes), and the end-to-end (variant, mode, batch) pairs.
TARGET_KERNEL_CASES = ("b0-512x512-s1", "b2-512x512-s1")
TARGET_E2E = (("b0", "inference", 16), ("b2", "train_step", 8))


class Skip(Exception):
    """A measurement that cannot run here; the message says why and goes into the row."""


@dataclass(frozen=True)
class CompileSpec:
    """How the ``compile`` provider calls torch.compile."""

    backend: str = "inductor"
    mode: str | None = "max-autotune"

    def describe(self) -> str:
        return f"torch.compile(backend={self.backend!r}" + (f", mode={self.mode!r})" if self.mode else ")")


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    timer: object
    env: dict
    smoke: bool
    compile: CompileSpec
    ceilings: Ceilings | None = None


@dataclass
class Item:
    """One planned measurement: an op (or model) at one case with one provider,
    producing a row for each of ``modes``."""

    suite: str
    op: str
    case: str
    provider: str
    modes: tuple[str, ...]
    priority: int
    est_s: float
    run: Callable[[Context], list[dict]] = field(repr=False)
    dtype: str = ""
    batch: int | None = None
    shape: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.op}/{self.case}/{self.provider}"

    def rows(self, ctx: Context, status: str, note: str) -> list[dict]:
        """Rows that record this item as skipped or failed."""
        return [
            make_row(ctx, suite=self.suite, op=self.op, case=self.case, provider=self.provider, mode=mode,
                     dtype=self.dtype, batch=self.batch, shape=self.shape, status=status, note=note)
            for mode in self.modes
        ]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_row(
    ctx: Context,
    *,
    timing: Timing | None = None,
    memory: Memory | None = None,
    images: int | None = None,
    status: str = "ok",
    **fields,
) -> dict:
    """A full row: the given fields, the timing quantiles, throughput against the
    minimum work and this run's ceilings, and the environment."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update(fields, status=status)
    row["id"] = "/".join(str(row[k]) for k in ("suite", "op", "case", "provider", "mode"))
    if timing is not None:
        row.update(ms_p20=timing.ms_p20, ms_p50=timing.ms_p50, ms_p80=timing.ms_p80)
        if images is not None:
            row["images_per_s"] = images / (timing.ms_p50 * 1e-3)
        if row["min_bytes"] is not None:
            row.update(throughput(timing.ms_p50, row["min_bytes"], row["min_flops"] or 0, ctx.ceilings))
    if memory is not None:
        row.update(peak_mb=memory.peak_mb, peak_over_start_mb=memory.peak_over_start_mb)
    if ctx.ceilings is not None:
        row.update(ceiling_copy_gbps=ctx.ceilings.copy_gbps, ceiling_gemm_tflops=ctx.ceilings.gemm_tflops)
    row.update(ctx.env)
    return row


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of an earlier run, with every id measured again replaced by the new row
    (each row keeps its own timestamp and commit)."""
    replaced = {row["id"] for row in new}
    return [row for row in old if row["id"] not in replaced] + new


def matches(pattern: str | None, key: str) -> bool:
    return pattern is None or re.search(pattern, key) is not None


def as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
