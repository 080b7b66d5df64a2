"""What every kernel module's launchers share: the launch config type (``Tile``), dot
precision, alignment hints, the device guard, dtype names, and autotuning (the one place
every autotuned launch goes through)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from .._backend import INTERPRET

INPUT_PRECISIONS = ("tf32", "ieee")

# Triton's name of each dtype the kernels take, as compile targets' signatures write it.
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Every (dtype, INPUT_PRECISION) a kernel with dots is launched with: fp32 in both
# precisions, 16-bit inputs always as "tf32" (see resolve_input_precision).
DTYPE_PRECISIONS = tuple(
    (dtype, precision)
    for dtype in TRITON_DTYPES
    for precision in (INPUT_PRECISIONS if dtype == torch.float32 else ("tf32",))
)


# What an fp32 op passes to its custom op when no precision was asked for: the kernel
# launchers read torch's setting when they run (inside the op, so torch.compile does not
# freeze it at trace time: the setting cannot be traced, only read while running).
FOLLOW_TORCH = "torch"


def resolve_input_precision(dtype: torch.dtype, input_precision: str | None) -> str:
    """How fp32 operands meet the tensor cores in tl.dot: "tf32" (fast, ~5e-4 relative
    error) or "ieee" (exact fp32). None follows torch's own setting for fp32 matmuls
    (``torch.backends.cuda.matmul.fp32_precision`` or ``torch.set_float32_matmul_precision``:
    torch's default means exact), so the fp32 model gives what a torch fp32 model gives;
    it comes back as FOLLOW_TORCH, which ``dot_precision`` turns into the setting at
    launch. 16-bit dots are exact either way, so they always get "tf32": one compiled
    variant, not two."""
    if input_precision is not None and input_precision not in (*INPUT_PRECISIONS, FOLLOW_TORCH):
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS} or None, got {input_precision!r}")
    if dtype != torch.float32:
        return "tf32"
    return FOLLOW_TORCH if input_precision is None else input_precision


def dot_precision(input_precision: str) -> str:
    """The INPUT_PRECISION a launcher compiles with, from what resolve_input_precision gave."""
    return _torch_fp32_matmul_precision() if input_precision == FOLLOW_TORCH else input_precision


def _torch_fp32_matmul_precision() -> str:
    """"tf32" or "ieee", as torch's own fp32 CUDA matmuls run now. torch >= 2.9 has a new
    setting, ``torch.backends.cuda.matmul.fp32_precision`` (which shows
    ``torch.backends.fp32_precision`` while it is "none", and the legacy setting too);
    once either is set through the new API the legacy getter raises, so the new one is
    read first and the legacy one only where there is no new one or it says "none".
    torch.compile cannot trace either getter, which is why this runs inside the custom
    ops (kernel_launcher), when they run."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision == "none":
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32" if precision == "tf32" else "ieee"


@triton.jit
def multiple_of(value, ALIGN: tl.constexpr):
    """``value``, which the launcher checked is a multiple of ALIGN, written so that the
    compiler knows it too: rows of ALIGN-aligned channels load as wide vectors."""
    return value // ALIGN * ALIGN


def alignment(*values: int) -> int:
    """ALIGN for the kernels: the largest power of two up to 16 (the divisibility Triton
    itself specialises integer arguments on) that divides every value."""
    align = 16
    while any(value % align for value in values):
        align //= 2
    return align


def _device_guard(device: torch.device):
    """Makes ``device`` current while Triton launches (it launches on the current CUDA
    device's stream, whatever device the tensors are on). Nothing to do off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _first_tensor(values) -> torch.Tensor:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0]
    raise TypeError("a kernel launcher needs a tensor argument")


def kernel_launcher(body):
    """For a custom op's body, which launches the kernels: run it on its first tensor's
    device (cheap, CUDA-graph safe), and turn an ``input_precision`` argument that says
    FOLLOW_TORCH into torch's setting now (see dot_precision)."""
    # evaluated here, where the body's module names its annotations' types, for
    # custom_op's schema inference (which would look them up in this module)
    signature = inspect.signature(body, eval_str=True)
    parameters = signature.parameters
    precision_index = list(parameters).index("input_precision") if "input_precision" in parameters else None

    @functools.wraps(body)
    def launch(*args, **kwargs):
        if precision_index is not None:
            if "input_precision" in kwargs:
                kwargs["input_precision"] = dot_precision(kwargs["input_precision"])
            else:
                args = (*args[:precision_index], dot_precision(args[precision_index]), *args[precision_index + 1:])
        with _device_guard(_first_tensor((*args, *kwargs.values())).device):
            return body(*args, **kwargs)

    launch.__signature__ = signature
    return launch


# --------------------------------------------------------------------------- tiles and autotuning


@dataclass(frozen=True)
class Tile:
    """One launch configuration of a kernel: its block sizes (the BLOCK_* tl.constexpr
    arguments, by name, in the order the kernel takes them), warps and pipeline stages.
    Every op's launch configs are Tiles, whether autotuned over or launched as they are."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, *, num_warps: int, num_stages: int, **blocks: int) -> Tile:
        """``Tile.of(BLOCK_M=64, BLOCK_C=32, num_warps=4, num_stages=3)``."""
        return cls(tuple(blocks.items()), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def constexprs(self) -> dict[str, int]:
        return dict(self.blocks)

    def options(self) -> dict[str, int]:
        """The launch options a kernel takes besides its arguments."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def triton_config(self) -> triton.Config:
        return triton.Config(self.constexprs(), **self.options())

    def __str__(self) -> str:
        blocks = " ".join(f"{name}={value}" for name, value in self.blocks)
        return f"{blocks} warps={self.num_warps} stages={self.num_stages}"


def launch_tile(kernel, grid, args, constexprs: dict, tile: Tile) -> None:
    """Launch ``kernel`` at one config: ``constexprs`` are its other tl.constexpr arguments."""
    kernel[grid](*args, **constexprs, **tile.constexprs(), **tile.options())


# The interpreter runs one config of the attention kernels unless SK_INTERPRET_AUTOTUNE=1.
# Blocks of 32 keep the tiny test shapes multi-block in both N and M.
INTERPRETER_TILE = Tile.of(BLOCK_N=32, BLOCK_M=32, num_warps=4, num_stages=1)

# SK_INTERPRET_AUTOTUNE=1 makes the interpreter autotune as a GPU does: every autotuned
# launch runs each candidate config on the live buffers (with the autotuner's own
# reset_to_zero hooks) and then the winner, which SK_AUTOTUNE_WINNER picks: "largest"
# (the most elements per tile, the default), "smallest" or a candidate's index. Without
# it the interpreter runs one small tile (INTERPRETER_TILE): fast, one code path.
INTERPRET_AUTOTUNE = INTERPRET and os.environ.get("SK_INTERPRET_AUTOTUNE", "0") == "1"
WINNER_CHOICES = ("largest", "smallest")


def _tile_size(config: triton.Config) -> tuple:
    """How large a candidate is: elements per tile, then its block sizes in order (the
    first, query rows, decides partial-buffer rows), then warps."""
    block_sizes = tuple(value for name, value in config.kwargs.items() if name.startswith("BLOCK"))
    return functools.reduce(lambda a, b: a * b, block_sizes, 1), block_sizes, config.num_warps


def autotune_winner(configs: Sequence[triton.Config]) -> int:
    """Index of the candidate the interpreter's autotuner makes win (SK_AUTOTUNE_WINNER)."""
    choice = os.environ.get("SK_AUTOTUNE_WINNER", "largest")
    if choice in WINNER_CHOICES:
        sizes = [_tile_size(c) for c in configs]
        return sizes.index(max(sizes) if choice == "largest" else min(sizes))
    if not choice.isdigit():
        raise ValueError(f"SK_AUTOTUNE_WINNER must be one of {WINNER_CHOICES} or a config index, got {choice!r}")
    return min(int(choice), len(configs) - 1)


class _InterpreterBenchmark:
    """The autotuner's ``do_bench`` under the interpreter: runs the candidate once and
    reports a time that makes the chosen winner the fastest. The autotuner benchmarks
    its candidates in order, so the n-th call of a launch is candidate n."""

    def __init__(self, configs: Sequence[triton.Config]):
        self.configs = configs
        self.start_launch()

    def start_launch(self) -> None:
        self.winner = autotune_winner(self.configs)
        self.calls = itertools.count()

    def __call__(self, kernel_call, quantiles=None, **_):
        kernel_call()
        time = 0.0 if next(self.calls) == self.winner else 1.0
        return [time] * len(quantiles) if quantiles else time


@functools.cache
def _autotuner(kernel, configs: tuple[triton.Config, ...], key: tuple[str, ...], reset_to_zero: tuple[str, ...],
               size_bucket: int):
    """``kernel`` autotuned over ``configs`` and keyed on ``key`` (the autotuner adds the
    tensor dtypes itself); one autotuner per size bucket, so sizes that vary per image
    (the reduced sequence length) choose a config once per power of two. The choice is
    cached for the process, so repeated calls are bitwise reproducible."""
    del size_bucket  # part of the cache key only
    benchmark = _InterpreterBenchmark(configs) if INTERPRET else None
    tuner = triton.autotune(configs=list(configs), key=list(key), reset_to_zero=list(reset_to_zero) or None,
                            do_bench=benchmark)(kernel)
    return tuner, benchmark


def launch_autotuned(kernel, grid, args, constexprs: dict, configs: Sequence[triton.Config], key: Sequence[str],
                     size: int, reset_to_zero: Sequence[str] = ()) -> None:
    """Launch ``kernel`` with the one config given, or autotuned over several.

    ``key``: the arguments a config choice depends on besides ``size`` (a size that
    changes per image, keyed by its power-of-two bucket). ``reset_to_zero``: the output
    buffers a launch accumulates into; the autotuner zeroes them before every candidate's
    benchmark run and before the winner's run, so what the benchmark runs wrote never
    reaches the result. Under SK_INTERPRET_AUTOTUNE=1 every launch benchmarks anew."""
    if len(configs) == 1:
        (config,) = configs
        kernel[grid](*args, **constexprs, **config.all_kwargs())
        return
    tuner, benchmark = _autotuner(
        kernel, tuple(configs), tuple(key), tuple(reset_to_zero), triton.next_power_of_2(max(size, 1))
    )
    if benchmark is not None:  # the interpreter: benchmark on every launch, as if each were the first
        tuner.cache.clear()
        benchmark.start_launch()
    tuner[grid](*args, **constexprs)


def launch_configs(configs: tuple[Tile, ...]) -> tuple[Tile, ...]:
    """The configs a launch may use here: ``configs`` on a GPU and when the interpreter
    autotunes (SK_INTERPRET_AUTOTUNE=1), INTERPRETER_TILE in the plain interpreter."""
    return (INTERPRETER_TILE,) if INTERPRET and not INTERPRET_AUTOTUNE else configs


def launch_tiled(kernel, grid, args, constexprs: dict, configs: tuple[Tile, ...], key: tuple[str, ...], m: int,
                 reset_to_zero: tuple[str, ...] = ()) -> None:
    """Launch a kernel taking BLOCK_N/BLOCK_M tiles over ``configs`` (from launch_configs),
    autotuned on ``key`` and the bucket of the key count ``m`` (it changes with the image's
    aspect ratio; see launch_autotuned)."""
    launch_autotuned(kernel, grid, args, constexprs, [t.triton_config() for t in configs], key, m, reset_to_zero)
