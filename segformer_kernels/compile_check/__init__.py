"""Compile every registered Triton kernel for sm_80 and sm_90 without a GPU.

    python -m segformer_kernels.compile_check [--arch 80 90] [--only NAME] [--json PATH]

Each kernel module lists what its launchers can launch through
``compile_targets() -> list[CompileTarget]``, which ``build_targets`` makes from the
module's launches (``Launch``: a kernel at a launch config, ``launch.Tile``, from the same
tables and config functions its launchers use). This tool compiles every target for
each architecture with ``triton.compile`` (which needs ptxas, shipped in triton's
wheel, but no GPU and no driver), reads the cubin's resource usage with the
``cuobjdump`` from the same wheel, and prints one row per (kernel, config, arch):
registers, spill bytes, shared memory and, for sm_90, whether the SASS uses HGMMA
(Hopper's warpgroup tensor-core matmul). It exits non-zero when a target fails to
compile, spills, or needs more shared memory than one block may have.

Where targets come from: every module named in ``_backend.TRITON_IMPLEMENTATIONS``
(``segformer_kernels.triton.<op>``), plus this module's own two small kernels (a masked
axpy and an fp16 ``tl.dot`` tile) so the mechanism is checked on its own.
``--module M`` checks only the modules given (``--module
segformer_kernels.compile_check`` checks just the self-test kernels).

Kernels must be compiled from real ``JITFunction`` objects: with TRITON_INTERPRET=1,
``triton.jit`` returns interpreter objects, so the tool then re-runs itself in a
subprocess without that variable.

The triton API this relies on, the same in triton 3.6 and 3.9 (checked in both):
``ASTSource(fn, signature, constexprs, attrs)`` where ``signature`` names every
kernel argument ({"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}),
``constexprs`` maps a name (or an (index,) path) to its value, and ``attrs`` maps
(index,) to [["tt.divisibility", 16]]; then ``triton.compile(source,
target=GPUTarget("cuda", arch, 32), options={"num_warps", "num_stages"})``. Given a
target, compiling touches no driver. ``metadata.shared`` is the dynamic shared
memory; registers and spills are not in the metadata (triton only learns them when
a GPU loads the cubin), hence cuobjdump, or ``ptxas -v`` when there is none.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Collection, Iterable

import torch
import triton
import triton.language as tl

from ..triton.launch import TRITON_DTYPES, Tile

ARCHS = (80, 90)

# Most shared memory one block may use, static plus dynamic: the CUDA device
# attribute MAX_SHARED_MEMORY_PER_BLOCK_OPTIN of an A100 (163 KiB) and an H100
# (227 KiB). Triton refuses to load a kernel whose dynamic shared memory exceeds it,
# and the driver caps the dynamic part at this minus the static part.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

# The module that holds the self-test kernels.
SELF_MODULE = "segformer_kernels.compile_check"

# Below this many compiles, starting worker processes (each imports torch and
# triton) costs more than it saves.
MIN_TASKS_FOR_POOL = 8


# --------------------------------------------------------------------------- compile targets and the builder


@dataclass(frozen=True)
class CompileTarget:
    """One kernel at one launch configuration, as its launcher would launch it.

    ``signature`` maps every runtime argument to its Triton type ("*fp16", "*fp32",
    "i32", "fp32", ...); ``constexprs`` gives every tl.constexpr argument its value.
    """

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    config: str = ""


def kernel_signature(kernel, dtype: torch.dtype, *, pointers: Collection[str] | None = None,
                     fp32_pointers: Collection[str] = (), floats: Collection[str] = ()) -> dict[str, str]:
    """Triton types of ``kernel``'s runtime arguments for inputs of ``dtype``, as a compile
    target lists them: tensor pointers (``pointers``, by default the arguments named
    ``*_ptr``) to ``dtype`` except ``fp32_pointers``, ``floats`` fp32 scalars, everything
    else (sizes, strides) i32. tl.constexpr arguments are left out."""
    function = kernel
    while hasattr(function, "fn"):  # through autotuner, JITFunction or interpreter wrappers
        function = function.fn
    parameters = inspect.signature(function).parameters
    element = TRITON_DTYPES[dtype]
    signature = {}
    for name, parameter in parameters.items():
        if "constexpr" in str(parameter.annotation):
            continue
        if name in fp32_pointers:
            signature[name] = "*fp32"
        elif name in pointers if pointers is not None else name.endswith("_ptr"):
            signature[name] = f"*{element}"
        else:
            signature[name] = "fp32" if name in floats else "i32"
    return signature


@dataclass(frozen=True)
class Launch:
    """One launch a kernel module's launchers make for a shape the model runs: the
    kernel ``kernel`` (its key in the module's table of kernels) at ``tile`` on inputs of
    ``dtype``, with its other tl.constexpr arguments ``constexprs``. ``shape`` names the
    shape in the report; ``fp32_pointers``: pointers that are fp32 in this launch besides
    those every launch of the module has."""

    kernel: str
    dtype: torch.dtype
    tile: Tile
    constexprs: dict[str, object] = field(default_factory=dict)
    shape: str = ""
    fp32_pointers: frozenset[str] = frozenset()


def build_targets(op: str, kernels: dict[str, object], launches: Iterable[Launch], *,
                  pointers: Collection[str] | None = None, fp32_pointers: Collection[str] = (),
                  floats: Collection[str] = ()) -> list[CompileTarget]:
    """The compile targets of an op's launches, named ``<op>_<kernel>``: one per distinct
    compile, so the shapes that launch the same code share a target (its config lists
    them). Signatures as ``kernel_signature`` gives them for each launch's dtype."""
    targets: dict[tuple, CompileTarget] = {}
    shapes: dict[tuple, list[str]] = {}
    for launch in launches:
        kernel = kernels[launch.kernel]
        signature = kernel_signature(kernel, launch.dtype, pointers=pointers,
                                     fp32_pointers={*fp32_pointers, *launch.fp32_pointers}, floats=floats)
        constexprs = {**launch.constexprs, **launch.tile.constexprs()}
        key = (launch.kernel, *signature.items(), *sorted(constexprs.items()), launch.tile.num_warps,
               launch.tile.num_stages)
        shapes.setdefault(key, []).append(launch.shape)
        others = " ".join(f"{name}={value}" for name, value in launch.constexprs.items())
        targets[key] = CompileTarget(
            name=f"{op}_{launch.kernel}", kernel=kernel, signature=signature, constexprs=constexprs,
            num_warps=launch.tile.num_warps, num_stages=launch.tile.num_stages,
            config=" ".join(filter(None, (TRITON_DTYPES[launch.dtype], "/".join(filter(None, shapes[key])), others,
                                          str(launch.tile)))),
        )
    return list(targets.values())


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """What compiling one target for one architecture gave."""

    module: str
    name: str
    config: str
    arch: int | None  # None: the module could not list its targets
    num_warps: int
    num_stages: int
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    hgmma: bool | None = None
    resource_source: str = ""
    compile_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def spill_bytes(self) -> int | None:
        """Per-thread local memory: the stack frame ptxas spills into, plus local arrays."""
        if self.stack_bytes is None:
            return None
        return self.stack_bytes + (self.local_bytes or 0)


# --------------------------------------------------------------------------- self-test kernels
# Small, but shaped like the real ones (masks, constexpr tiles, an fp16 tensor-core
# matmul) so the whole path is exercised.


@triton.jit
def _self_test_axpy_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, alpha * x + y, mask=mask)


@triton.jit
def _self_test_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[M, N] = a[M, K] @ b[K, N], all row-major, fp32 accumulation."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * N + cols[None, :], mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def compile_targets() -> list[CompileTarget]:
    """The self-test kernels (this module is checked like any kernel module)."""
    return [
        CompileTarget(
            name="self_test_axpy",
            kernel=_self_test_axpy_kernel,
            signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "alpha": "fp32", "n": "i32"},
            constexprs={"BLOCK": 1024},
            num_warps=4,
            num_stages=1,
            config="BLOCK=1024 fp32",
        ),
        CompileTarget(
            name="self_test_matmul",
            kernel=_self_test_matmul_kernel,
            signature={"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32"},
            constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
            num_warps=4,
            num_stages=3,
            config="64x64x32 fp16",
        ),
    ]


# --------------------------------------------------------------------------- discovery


def registered_modules() -> list[str]:
    """This module, then every registered kernel module."""
    from segformer_kernels._backend import TRITON_IMPLEMENTATIONS

    modules = [SELF_MODULE]
    for module_name, _ in TRITON_IMPLEMENTATIONS.values():
        if module_name not in modules:
            modules.append(module_name)
    return modules


@functools.lru_cache(maxsize=None)
def module_targets(module_name: str) -> list[CompileTarget]:
    """The module's compile targets (cached: worker processes look them up by index)."""
    module = importlib.import_module(module_name)
    if not callable(getattr(module, "compile_targets", None)):
        raise TypeError(f"{module_name} has Triton kernels but no compile_targets() listing what it launches")
    return list(module.compile_targets())


# --------------------------------------------------------------------------- compiling one target


def jit_function(kernel):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def full_signature(target: CompileTarget) -> dict[str, str]:
    """The signature triton.compile expects: every kernel argument in order, runtime
    arguments by type, tl.constexpr arguments as "constexpr"."""
    kernel = jit_function(target.kernel)
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        why = ""
        if type(kernel).__name__ == "InterpretedFunction":
            why = " (it was decorated under TRITON_INTERPRET=1; run without it)"
        raise TypeError(f"kernel must be a @triton.jit function, got {type(kernel).__name__}{why}")
    constexpr_names = {param.name for param in kernel.params if param.is_constexpr}
    problems = []
    for name in target.constexprs:
        if name not in constexpr_names:
            problems.append(f"{name!r} is in constexprs but is not a tl.constexpr argument of {kernel.__name__}")
    for name in target.signature:
        if name not in kernel.arg_names:
            problems.append(f"{name!r} is in the signature but is not an argument of {kernel.__name__}")
        elif name in constexpr_names:
            problems.append(f"{name!r} is a tl.constexpr argument: give its value in constexprs, not a type")
    signature = {}
    for name in kernel.arg_names:
        if name in constexpr_names:
            signature[name] = "constexpr"
        elif name in target.signature:
            signature[name] = target.signature[name]
        else:
            problems.append(f"runtime argument {name!r} has no type in the signature")
    if problems:
        raise ValueError("; ".join(problems))
    return signature


def constexpr_values(target: CompileTarget) -> dict[str, object]:
    """Every tl.constexpr argument's value: the target's, else the kernel's default."""
    values = {}
    for param in jit_function(target.kernel).params:
        if not param.is_constexpr:
            continue
        if param.name in target.constexprs:
            values[param.name] = target.constexprs[param.name]
        elif param.has_default:
            values[param.name] = param.default
        else:
            raise ValueError(f"tl.constexpr argument {param.name!r} has no value in constexprs")
    return values


def compile_target(target: CompileTarget, arch: int):
    """triton.compile the target for sm_<arch>; returns the CompiledKernel.

    Pointer arguments carry the 16-byte divisibility hint that the JIT attaches to
    every pointer from a PyTorch allocation, so the code is the code a launch gets.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = full_signature(target)
    # Keyed by (argument index,), the form triton >= 3.3 takes (3.6 and 3.9 alike).
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, ty in enumerate(signature.values())
        if ty.startswith("*")
    }
    source = ASTSource(jit_function(target.kernel), signature, constexpr_values(target), attrs)
    options = {"num_warps": target.num_warps, "num_stages": target.num_stages}
    # On a ptxas failure triton prints the whole PTX to stdout; the exception
    # carries ptxas's message, so keep stdout for the table.
    with contextlib.redirect_stdout(io.StringIO()):
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def nvidia_tool(name: str) -> str | None:
    """Path of a CUDA tool triton uses (its wheel ships ptxas and cuobjdump;
    TRITON_<NAME>_PATH overrides), or None when it has none."""
    try:
        return getattr(triton.knobs.nvidia, name).path
    except (AttributeError, RuntimeError):
        return None


def ptxas_for(arch: int) -> str:
    """The ptxas triton compiles sm_<arch> with (the choice moved between releases:
    3.9 takes its newer ptxas from sm_90 on, 3.6 from sm_100 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def resources_from_cuobjdump(cuobjdump: str, cubin: bytes, kernel_name: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{kernel_name}.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        usage = _run_tool([cuobjdump, "--dump-resource-usage", path])
        # "Function <name>:\n  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:392 ..."
        match = re.search(rf"Function {re.escape(kernel_name)}:\s*\n(.*)", usage)
        if match is None:
            raise RuntimeError(f"no resource usage for {kernel_name} in cuobjdump's output:\n{usage}")
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", match.group(1)))
        resources = {
            "registers": int(fields["REG"]),
            "stack_bytes": int(fields["STACK"]),
            "local_bytes": int(fields["LOCAL"]),
            "static_shared_bytes": int(fields["SHARED"]),
        }
        if arch >= 90:
            resources["hgmma"] = re.search(r"\bHGMMA\.", _run_tool([cuobjdump, "-sass", path])) is not None
    return resources


def resources_from_ptxas(ptxas: str, ptx: str, arch: int) -> dict:
    """Fallback without cuobjdump: ptxas's own report (-v) on the kernel's PTX.

    Same PTX and same ptxas binary, but not necessarily triton's exact ptxas flags,
    so the register count can differ a little from the cubin triton built."""
    gpu_name = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as file:
            file.write(ptx)
        report = _run_tool([ptxas, "-v", f"--gpu-name={gpu_name}", path, "-o", os.path.join(tmp, "kernel.cubin")])
    # "... 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    # "... Used 40 registers, ..., 0 bytes smem, ..." (smem only when static shared is used)
    stack = re.search(r"(\d+) bytes stack frame", report)
    static_shared = re.search(r"(\d+) bytes smem", report)
    resources = {
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "stack_bytes": int(stack.group(1)) if stack else 0,
        "local_bytes": 0,
        "static_shared_bytes": int(static_shared.group(1)) if static_shared else 0,
    }
    if arch >= 90:
        # wgmma in the PTX is what ptxas turns into HGMMA.
        resources["hgmma"] = "wgmma.mma_async" in ptx
    return resources


def _run_tool(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout + done.stderr


def check(module_name: str, target: CompileTarget, arch: int) -> Row:
    """Compile one target for one architecture and judge the result."""
    row = Row(
        module=module_name, name=target.name, config=target.config, arch=arch,
        num_warps=target.num_warps, num_stages=target.num_stages, shared_limit=SHARED_MEMORY_LIMIT[arch],
    )
    start = time.perf_counter()
    try:
        compiled = compile_target(target, arch)
    except Exception as error:  # every compile failure is a result to report, not a crash
        row.compile_seconds = time.perf_counter() - start
        row.problems.append(f"compile error: {type(error).__name__}: {str(error).strip()}")
        return row
    row.compile_seconds = time.perf_counter() - start

    cuobjdump = nvidia_tool("cuobjdump")
    try:
        if cuobjdump is not None:
            row.resource_source = "cuobjdump"
            resources = resources_from_cuobjdump(cuobjdump, compiled.asm["cubin"], compiled.metadata.name, arch)
        else:
            row.resource_source = "ptxas -v"
            resources = resources_from_ptxas(ptxas_for(arch), compiled.asm["ptx"], arch)
    except Exception as error:  # unknown resources must not pass as "no spills"
        row.problems.append(f"cannot read resource usage: {type(error).__name__}: {error}")
        return row
    row.registers = resources["registers"]
    row.stack_bytes = resources["stack_bytes"]
    row.local_bytes = resources["local_bytes"]
    row.hgmma = resources.get("hgmma")
    # Triton's shared memory is dynamic (metadata.shared); ptxas may add a static part.
    row.shared_bytes = compiled.metadata.shared + resources["static_shared_bytes"]

    if row.spill_bytes:
        row.problems.append(
            f"spills: {row.stack_bytes} B stack frame + {row.local_bytes} B local memory per thread"
        )
    if row.shared_bytes > row.shared_limit:
        row.problems.append(f"shared memory {row.shared_bytes} B > sm_{arch} limit {row.shared_limit} B")
    return row


def check_by_index(module_name: str, index: int, arch: int) -> Row:
    """Worker entry point: targets travel as (module, index), kernels stay put."""
    return check(module_name, module_targets(module_name)[index], arch)


# --------------------------------------------------------------------------- command line


def arch_label(arch: int | None) -> str:
    return "-" if arch is None else f"sm_{arch}"


def describe(row: Row) -> str:
    config = f" [{row.config}]" if row.config else ""
    return f"{row.name}{config} {arch_label(row.arch)}"


def run_checks(tasks: list[tuple[str, int, int]], jobs: int | None) -> list[Row]:
    """Run every (module, target index, arch) task, in order, with progress on stderr."""
    rows: list[Row | None] = [None] * len(tasks)

    def progress(done: int, row: Row) -> None:
        status = "ok" if not row.problems else "FAILED: " + row.problems[0].splitlines()[0][:120]
        print(f"[{done}/{len(tasks)}] {describe(row)}: {status} ({row.compile_seconds:.1f} s)",
              file=sys.stderr, flush=True)

    if jobs is None:
        jobs = min(2, os.cpu_count() or 1) if len(tasks) >= MIN_TASKS_FOR_POOL else 1
    if jobs <= 1:
        for position, task in enumerate(tasks):
            rows[position] = check_by_index(*task)
            progress(position + 1, rows[position])
        return rows

    # spawn, not fork: the parent holds torch and triton state that a fork would
    # copy mid-flight; a fresh worker imports the modules itself.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(check_by_index, *task): position for position, task in enumerate(tasks)}
        for done, future in enumerate(as_completed(futures), start=1):
            rows[futures[future]] = future.result()
            progress(done, rows[futures[future]])
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("kernel", "config", "arch", "warps", "stages", "regs", "spill B", "smem B", "HGMMA", "status")

    def cells(row: Row) -> tuple[str, ...]:
        def number(value):
            return "-" if value is None else str(value)

        hgmma = "-" if row.hgmma is None else ("yes" if row.hgmma else "no")
        status = "ok" if not row.problems else "FAIL: " + "; ".join(p.splitlines()[0][:90] for p in row.problems)
        return (
            row.name, row.config, arch_label(row.arch), str(row.num_warps), str(row.num_stages), number(row.registers),
            number(row.spill_bytes), number(row.shared_bytes), hgmma, status,
        )

    table = [header] + [cells(row) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1] for line in table
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segformer_kernels.compile_check",
        description="Compile every registered Triton kernel at every launch config for sm_80/sm_90 (no GPU needed) "
        "and report registers, spills, shared memory and HGMMA use. Exits 1 on a compile error, a spill, "
        "or shared memory over the architecture's per-block limit.",
    )
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS),
                        help="architectures to compile for (default: 80 90)")
    parser.add_argument("--only", metavar="SUBSTRING", help="only targets whose kernel name contains SUBSTRING")
    parser.add_argument("--module", action="append", metavar="MODULE",
                        help="check only this module's compile_targets() (repeatable); default: every registered "
                        f"kernel module plus {SELF_MODULE}'s self-test kernels")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--jobs", type=int,
                        help="compile in this many worker processes (default: min(2, CPUs), or 1 for fewer than "
                        f"{MIN_TASKS_FOR_POOL} compiles)")
    return parser.parse_args(argv)


def rerun_without_interpreter(argv: list[str]) -> int:
    """Run this tool again in a fresh interpreter with TRITON_INTERPRET unset.

    triton.jit consults TRITON_INTERPRET when each kernel is decorated, which has
    happened by now in this process; only a new process gets compilable kernels."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    print("compile_check: TRITON_INTERPRET is set, which makes kernels interpreter objects; "
          "re-running without it", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", SELF_MODULE, *argv], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "TRITON_INTERPRET" in os.environ:
        return rerun_without_interpreter(argv)
    args = parse_args(argv)

    tasks = []
    rows: list[Row] = []
    for module_name in args.module or registered_modules():
        try:
            targets = module_targets(module_name)
        except Exception as error:  # a module that cannot list its targets fails the check
            rows.append(Row(module=module_name, name=module_name, config="compile_targets()", arch=None,
                            num_warps=0, num_stages=0, problems=[f"{type(error).__name__}: {error}"]))
            continue
        for index, target in enumerate(targets):
            if args.only and args.only not in target.name:
                continue
            tasks.extend((module_name, index, arch) for arch in args.arch)
    if not tasks and not rows:
        print("compile_check: no targets to compile", file=sys.stderr)
        return 1

    start = time.perf_counter()
    rows += run_checks(tasks, args.jobs)
    failed = [row for row in rows if row.problems]

    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {
                    "triton_version": triton.__version__,
                    "shared_memory_limit": {f"sm_{arch}": limit for arch, limit in SHARED_MEMORY_LIMIT.items()},
                    "rows": [dict(asdict(row), spill_bytes=row.spill_bytes) for row in rows],
                },
                file, indent=2,
            )
    for row in failed:
        print(f"\n{describe(row)} ({row.module}):", file=sys.stderr)
        for problem in row.problems:
            print("  " + problem.replace("\n", "\n  "), file=sys.stderr)
    print(f"\ncompile_check: {len(rows) - len(failed)} passed, {len(failed)} failed "
          f"({len(tasks)} compiles, triton {triton.__version__}, {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 1 if failed else 0

