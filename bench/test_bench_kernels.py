"""pytest-benchmark hooks for the kernel benchmarks (GPU only; skipped without CUDA).

    pytest bench/ --benchmark-only [-k mix_ffn_block] [--benchmark-json out.json]

The ops, inputs and providers of ``python -m bench`` (bench/ops.py) at the stage-1 and
stage-2 shapes of B0 and B2 at 512 x 512, bf16, batch 8. torch.compile (max-autotune)
joins only with SK_BENCH_COMPILE=1: its compilations take minutes. One round is one
call followed by torch.cuda.synchronize(), timed on the host by pytest-benchmark; the
suite's own numbers (CUDA events, L2 flushed) come from ``python -m bench``.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.core import CompileSpec, Context, Skip
from bench.ops import GPU_BATCH, KERNEL_OPS, KernelRun, Maker, benchmark_stages, provider_call
from bench.roofline import min_flops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel benchmarks need a CUDA GPU")

PROVIDERS = ("eager", "sdpa", "fused") + (("compile",) if os.environ.get("SK_BENCH_COMPILE") == "1" else ())
STAGES = [s for s in benchmark_stages(smoke=False) if s.image == (512, 512) and s.index <= 2]
CASES = [
    pytest.param(op, stage, provider, mode, id=f"{op.name}-{op.case(stage)}-{provider}-{mode}")
    for stage in STAGES
    for op in KERNEL_OPS
    if op.applies(stage)
    for provider in op.providers
    if provider in PROVIDERS
    for mode in op.modes
]


@pytest.mark.parametrize("op, stage, provider, mode", CASES)
def test_kernel(benchmark, op, stage, provider, mode):
    device, dtype = torch.device("cuda"), torch.bfloat16
    ctx = Context(device=device, dtype=dtype, timer=None, env={}, smoke=False, compile=CompileSpec())
    try:
        call, note = provider_call(op, provider, ctx)
    except Skip as skip:
        pytest.skip(str(skip))
    inputs = op.inputs(stage, GPU_BATCH, Maker(device, dtype, grad=not op.inference_only))
    run = KernelRun(call, inputs, op.inference_only, count_saved=False)
    if mode != "bwd":
        run.release()
    fn = run.timed(mode)

    def synchronized():
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(
        case=op.case(stage), provider=provider, mode=mode, note=note, shape=op.shape(stage, GPU_BATCH),
        min_bytes=run.min_bytes(mode), min_flops=min_flops(mode, op.forward_flops(stage, GPU_BATCH)),
    )
    benchmark.pedantic(synchronized, warmup_rounds=3, rounds=30, iterations=1)
