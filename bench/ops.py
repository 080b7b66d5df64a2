"""Kernel benchmarks: every fused op and the two blocks the targets name, at the stage
shapes of SegFormer B0 and B2 (docs/design.md, "The numbers"), forward, backward and both.

Cases are named ``<variant>-<H>x<W>-s<stage>``: the token grid of that stage for an
H x W image (patch embeds of stride 4, 2, 2, 2, each rounding up), C channels,
heads of 32 (B0) or 64 (B2) dims, sr = 8, 4, 2, 1, Mix-FFN hidden width 4C.
Every tensor, weights included, is in the benchmark dtype and gets a gradient (except
for ``decode_head``, whose kernel is inference-only and runs under no_grad).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .core import (
    PRIORITY_COMPILE_KERNEL, PRIORITY_COMPILE_TARGET_KERNEL, PRIORITY_KERNEL, PRIORITY_TARGET,
    TARGET_KERNEL_CASES, Context, Item, Skip, as_tuple, dtype_name, make_row,
)
from .providers import EAGER, SDPA, OpTable, compiled, fused_table
from .roofline import MODES, min_bytes, min_flops, tensor_bytes

# (channels, heads) per stage; "tiny" is the smoke test's stand-in.
VARIANT_STAGES = {
    "b0": ((32, 1), (64, 2), (160, 5), (256, 8)),
    "b2": ((64, 1), (128, 2), (320, 5), (512, 8)),
    "tiny": ((16, 1), (32, 2), (32, 2), (64, 4)),
}
DECODER_WIDTH = {"b0": 256, "b2": 768, "tiny": 32}
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
BLOCK_EPS = 1e-6
NUM_CLASSES = 150

GPU_IMAGES = ((512, 512), (1024, 1024))
GPU_BATCH = 8
SMOKE_BATCH = 1

# Rough seconds per item on an H100, for the time budget: the fused provider autotunes
# its kernels on the first call of every shape; compile is max-autotune.
EST_S = {"eager": 1.0, "sdpa": 1.0, "fused": 3.0, "compile": 45.0}


@dataclass(frozen=True)
class Stage:
    variant: str
    image: tuple[int, int]
    index: int  # 1..4
    channels: int
    heads: int
    sr: int

    @property
    def grid(self) -> tuple[int, int]:
        height, width = (math.ceil(s / 4) for s in self.image)
        for _ in range(self.index - 1):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        return height, width

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def keys(self) -> int:
        height, width = self.grid
        return (height // self.sr) * (width // self.sr)

    @property
    def hidden(self) -> int:
        return MLP_RATIO * self.channels

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.image[0]}x{self.image[1]}-s{self.index}"

    def shape(self, batch: int) -> dict:
        return {"B": batch, "H": self.grid[0], "W": self.grid[1], "N": self.tokens, "M": self.keys,
                "C": self.channels, "heads": self.heads, "sr": self.sr, "hidden": self.hidden}


def encoder_stages(variant: str, image: tuple[int, int]) -> list[Stage]:
    return [
        Stage(variant, image, index, channels, heads, sr)
        for index, ((channels, heads), sr) in enumerate(zip(VARIANT_STAGES[variant], SR_RATIOS), start=1)
    ]


def benchmark_stages(smoke: bool) -> list[Stage]:
    if smoke:
        # One 4 x 4 grid with sr = 2 (so M = 4): every Triton call costs a fraction of
        # a second under the interpreter, and the smoke run must stay short.
        return [dataclasses.replace(encoder_stages("tiny", (16, 16))[0], sr=2)]
    return [s for image in GPU_IMAGES for variant in ("b0", "b2") for s in encoder_stages(variant, image)]


# ---- inputs -------------------------------------------------------------------------


class Maker:
    """Random tensors on one device in one dtype; leaves that require grad unless
    ``grad`` is False (inference-only ops)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, grad: bool = True):
        self.device, self.dtype, self.grad = device, dtype, grad

    def __call__(self, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, device=self.device, dtype=torch.float32) * scale + shift
        return t.to(self.dtype).requires_grad_(self.grad)

    def linear(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self(out_features, in_features, scale=in_features**-0.5), self(out_features, scale=0.1)

    def norm(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self(channels, scale=0.1, shift=1.0), self(channels, scale=0.1)

    def tokens(self, stage: Stage, batch: int, channels: int) -> torch.Tensor:
        return self(batch, stage.tokens, channels)


def tensors_in(values) -> list[torch.Tensor]:
    """The tensors among positional arguments, including those inside lists."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += tensors_in(value)
    return found


def attention_inputs(stage, batch, make):
    head_dim = stage.channels // stage.heads
    return (
        make(batch, stage.tokens, stage.heads, head_dim),
        make(batch, stage.keys, stage.heads, head_dim),
        make(batch, stage.keys, stage.heads, head_dim),
    )


def kv_views(kv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v [B, M, heads, d] as strided views of the kv projection's [B, M, 2C] output,
    as the model takes them (docs/design.md, "Data flow and layouts"): no copy before the attention core."""
    batch, keys, width = kv.shape
    kv = kv.view(batch, keys, 2, heads, width // (2 * heads))
    return kv[:, :, 0], kv[:, :, 1]


def fused_attention_inputs(stage, batch, make):
    """LN1'd tokens x, q_proj, k and v (views of one [B, M, 2C] tensor laid out as the kv
    GEMM writes it; their gradients are the views' own), o_proj."""
    c = stage.channels
    k, v = kv_views(make(batch, stage.keys, 2 * c), stage.heads)
    return (make.tokens(stage, batch, c), *make.linear(c, c), k, v, *make.linear(c, c))


def spatial_reduction_inputs(stage, batch, make):
    c, sr = stage.channels, stage.sr
    return (
        make.tokens(stage, batch, c), stage.grid,
        make(c, c, sr, sr, scale=(c * sr * sr) ** -0.5), make(c, scale=0.1), *make.norm(c), BLOCK_EPS,
    )


def dwconv_gelu_inputs(stage, batch, make):
    return make.tokens(stage, batch, stage.hidden), stage.grid, make(stage.hidden, 1, 3, 3, scale=1 / 3), make(stage.hidden, scale=0.1)


def mix_ffn_weights(stage, make):
    c, hidden = stage.channels, stage.hidden
    return (*make.linear(hidden, c), make(hidden, 1, 3, 3, scale=1 / 3), make(hidden, scale=0.1), *make.linear(c, hidden))


def mix_ffn_inputs(stage, batch, make):
    return (make.tokens(stage, batch, stage.channels), stage.grid, *mix_ffn_weights(stage, make))


def layer_norm_inputs(stage, batch, make):
    return (make.tokens(stage, batch, stage.channels), *make.norm(stage.channels), BLOCK_EPS)


def add_layer_norm_inputs(stage, batch, make):
    return (*layer_norm_inputs(stage, batch, make), make.tokens(stage, batch, stage.channels))


def attention_block_inputs(stage, batch, make):
    c, sr = stage.channels, stage.sr
    reduction = (
        (make(c, c, sr, sr, scale=(c * sr * sr) ** -0.5), make(c, scale=0.1), *make.norm(c))
        if sr > 1 else (None, None, None, None)
    )
    return (
        make.tokens(stage, batch, c), stage.grid, stage.heads, *make.norm(c),
        *make.linear(c, c), *make.linear(2 * c, c), *make.linear(c, c), *reduction,
    )


def mix_ffn_block_inputs(stage, batch, make):
    return (make.tokens(stage, batch, stage.channels), stage.grid, *make.norm(stage.channels), *mix_ffn_weights(stage, make))


def decoder_grids(stage: Stage) -> list[tuple[int, int]]:
    return [s.grid for s in encoder_stages(stage.variant, stage.image)]


def decode_head_inputs(stage, batch, make):
    """The folded decoder's four stage maps [B, h_i*w_i, D], their grids, the output
    (stage-1) grid, the folded BatchNorm scale and shift, and the classifier."""
    grids, width = decoder_grids(stage), DECODER_WIDTH[stage.variant]
    maps = [make(batch, h * w, width) for h, w in grids]
    return (maps, grids, grids[0], *make.norm(width), *make.linear(NUM_CLASSES, width))


# ---- the blocks -----------------------------------------------------------------------


def attention_half_block(t: OpTable, x, hw, heads, ln_w, ln_b, q_w, q_b, kv_w, kv_b, o_w, o_b,
                         sr_w=None, sr_b=None, sr_ln_w=None, sr_ln_b=None):
    """x + o_proj(attention(q_proj(LN1(x)), kv(SR(LN1(x))))): the attention half of a
    SegFormer block (drop-path off), written once and run with each provider's ops.
    k and v come from one C -> 2C GEMM as strided views; q_proj, the core and o_proj
    are one fused_attention call, as in the model."""
    normed = t.layer_norm(x, ln_w, ln_b, BLOCK_EPS)
    reduced = normed if sr_w is None else t.spatial_reduction(normed, hw, sr_w, sr_b, sr_ln_w, sr_ln_b, BLOCK_EPS)
    k, v = kv_views(F.linear(reduced, kv_w, kv_b), heads)
    return x + t.fused_attention(normed, q_w, q_b, k, v, o_w, o_b)


def mix_ffn_block(t: OpTable, x, hw, ln_w, ln_b, fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b):
    """x + MixFFN(LN2(x)): the feed-forward half of a SegFormer block (drop-path off)."""
    return x + t.mix_ffn(t.layer_norm(x, ln_w, ln_b, BLOCK_EPS), hw, fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b)


# ---- forward flops (2 x multiply-adds of GEMMs and convolutions; see roofline.py) ------


def attention_flops(s: Stage, b: int) -> int:
    return 4 * b * s.tokens * s.keys * s.channels  # q k^T and p v


def reduction_flops(s: Stage, b: int) -> int:
    return 2 * b * s.keys * s.channels * s.sr**2 * s.channels if s.sr > 1 else 0


def dwconv_flops(s: Stage, b: int) -> int:
    return 2 * 9 * b * s.tokens * s.hidden


def mix_ffn_flops(s: Stage, b: int) -> int:
    return 2 * 2 * b * s.tokens * s.channels * s.hidden + dwconv_flops(s, b)


def decode_head_flops(s: Stage, b: int) -> int:
    return 2 * b * s.tokens * DECODER_WIDTH[s.variant] * NUM_CLASSES  # the 1x1 classifier at stage-1 size


def fused_attention_flops(s: Stage, b: int) -> int:
    return 2 * 2 * b * s.tokens * s.channels**2 + attention_flops(s, b)  # q_proj and o_proj around the core


def attention_block_flops(s: Stage, b: int) -> int:
    kv_projection = 2 * b * s.keys * s.channels * 2 * s.channels
    return kv_projection + reduction_flops(s, b) + fused_attention_flops(s, b)


@dataclass(frozen=True)
class KernelOp:
    name: str
    kernels: tuple[str, ...]  # the public ops whose Triton kernels the fused provider runs
    inputs: Callable  # (stage, batch, Maker) -> positional arguments
    call: Callable  # (OpTable, *arguments) -> output(s)
    forward_flops: Callable[[Stage, int], int]
    uses_attention: bool = False  # only then does the sdpa provider differ from eager
    needs_reduction: bool = False  # only stages with sr > 1
    inference_only: bool = False  # forward under no_grad only (the decode-head kernel has no backward)
    per_image: bool = False  # one case per (variant, image), not per stage

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd",) if self.inference_only else MODES

    def applies(self, stage: Stage) -> bool:
        if self.per_image:
            return stage.index == 1
        return stage.sr > 1 or not self.needs_reduction

    def case(self, stage: Stage) -> str:
        return f"{stage.variant}-{stage.image[0]}x{stage.image[1]}" if self.per_image else stage.name

    def shape(self, stage: Stage, batch: int) -> dict:
        if self.per_image:
            return {"B": batch, "grids": decoder_grids(stage), "D": DECODER_WIDTH[stage.variant], "K": NUM_CLASSES}
        return stage.shape(batch)

    @property
    def providers(self) -> tuple[str, ...]:
        return ("eager", "sdpa", "compile", "fused") if self.uses_attention else ("eager", "compile", "fused")


KERNEL_OPS = (
    KernelOp("efficient_attention", ("efficient_attention",), attention_inputs,
             lambda t, *a: t.efficient_attention(*a), attention_flops, uses_attention=True),
    KernelOp("fused_attention", ("fused_attention",), fused_attention_inputs,
             lambda t, *a: t.fused_attention(*a), fused_attention_flops, uses_attention=True),
    KernelOp("spatial_reduction", ("spatial_reduction",), spatial_reduction_inputs,
             lambda t, *a: t.spatial_reduction(*a), reduction_flops, needs_reduction=True),
    KernelOp("dwconv_gelu", ("dwconv_gelu",), dwconv_gelu_inputs, lambda t, *a: t.dwconv_gelu(*a), dwconv_flops),
    KernelOp("mix_ffn", ("mix_ffn",), mix_ffn_inputs, lambda t, *a: t.mix_ffn(*a), mix_ffn_flops),
    KernelOp("layer_norm", ("layer_norm",), layer_norm_inputs, lambda t, *a: t.layer_norm(*a), lambda s, b: 0),
    KernelOp("add_layer_norm", ("layer_norm",), add_layer_norm_inputs, lambda t, *a: t.layer_norm(*a), lambda s, b: 0),
    KernelOp("decode_head", ("decode_head",), decode_head_inputs, lambda t, *a: t.decode_head(*a), decode_head_flops,
             inference_only=True, per_image=True),
    KernelOp("attention_block", ("layer_norm", "spatial_reduction", "fused_attention"), attention_block_inputs,
             attention_half_block, attention_block_flops, uses_attention=True),
    KernelOp("mix_ffn_block", ("layer_norm", "mix_ffn"), mix_ffn_block_inputs, mix_ffn_block, mix_ffn_flops),
)


# ---- running one (op, stage, provider) ------------------------------------------------


def provider_call(op: KernelOp, provider: str, ctx: Context) -> tuple[Callable, str]:
    """The callable that runs ``op`` for ``provider``, and a note for its rows."""
    if provider == "eager":
        return functools.partial(op.call, EAGER), ""
    if provider == "sdpa":
        return functools.partial(op.call, SDPA), ""
    if provider == "compile":
        return compiled(functools.partial(op.call, EAGER), ctx.compile, ctx.device, fullgraph=True), ctx.compile.describe()
    if provider == "fused":
        table, note = fused_table(op.kernels, ctx.device)
        return functools.partial(op.call, table), note
    raise ValueError(f"unknown kernel provider {provider!r}")


class KernelRun:
    """The timed callables of one op on one set of inputs. The first forward (which
    also counts the bytes autograd saves) is kept for the backward-only timing, which
    therefore runs first; ``release`` drops it so later peaks do not include it."""

    def __init__(self, call: Callable, inputs: tuple, inference_only: bool, count_saved: bool):
        self.call, self.inputs = call, inputs
        self.grad_enabled = not inference_only
        self.leaves = [t for t in tensors_in(inputs) if t.requires_grad]
        with torch.set_grad_enabled(self.grad_enabled):
            if count_saved:
                outputs, *self.saved = saved_tensor_bytes(call, inputs)
            else:
                outputs, self.saved = call(*inputs), (None, None)
        self.retained = as_tuple(outputs)
        self.upstream = [torch.randn_like(o) for o in self.retained] if self.grad_enabled else []
        self.output_bytes = tensor_bytes(self.retained)

    def forward(self):
        with torch.set_grad_enabled(self.grad_enabled):
            return self.call(*self.inputs)

    def forward_backward(self):
        return torch.autograd.grad(as_tuple(self.call(*self.inputs)), self.leaves, self.upstream)

    def backward(self):
        return torch.autograd.grad(self.retained, self.leaves, self.upstream, retain_graph=True)

    def release(self) -> None:
        self.retained = ()

    def timed(self, mode: str) -> Callable:
        return {"fwd": self.forward, "fwd+bwd": self.forward_backward, "bwd": self.backward}[mode]

    def min_bytes(self, mode: str) -> int:
        return min_bytes(mode, tensor_bytes(tensors_in(self.inputs)), self.output_bytes, tensor_bytes(self.leaves))


def saved_tensor_bytes(call: Callable, inputs: tuple) -> tuple[object, int, int]:
    """One forward of ``call``, and the bytes of the distinct storages autograd saves
    in it: all of them, and those that are not storages of the inputs and weights."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(*inputs)
    own = {t.untyped_storage().data_ptr() for t in tensors_in(inputs)}
    return out, sum(saved.values()), sum(n for ptr, n in saved.items() if ptr not in own)


def run_kernel_item(op: KernelOp, stage: Stage, provider: str, batch: int, ctx: Context) -> list[dict]:
    inputs = op.inputs(stage, batch, Maker(ctx.device, ctx.dtype, grad=not op.inference_only))
    call, note = provider_call(op, provider, ctx)
    # saved_tensors_hooks and torch.compile do not mix; the compiled graph's saved set is its own business
    run = KernelRun(call, inputs, op.inference_only, count_saved=provider != "compile" and not op.inference_only)
    common = dict(suite="kernel", op=op.name, case=op.case(stage), provider=provider, dtype=dtype_name(ctx.dtype),
                  batch=batch, shape=op.shape(stage, batch))
    rows = []
    for mode in sorted(op.modes, key=("bwd", "fwd", "fwd+bwd").index):
        bytes_, flops = run.min_bytes(mode), min_flops(mode, op.forward_flops(stage, batch))
        try:
            fn = run.timed(mode)
            timing, memory = ctx.timer.time(fn), ctx.timer.memory(fn)
        except Exception as error:  # noqa: BLE001 - one failed mode is a row, not the end of the item
            rows.append(make_row(ctx, **common, mode=mode, status="error", min_bytes=bytes_, min_flops=flops,
                                 note=f"{note} {type(error).__name__}: {error}".strip()[:500]))
            continue
        finally:
            if mode == "bwd":
                run.release()
        extra = dict(saved_bytes=run.saved[0], saved_activation_bytes=run.saved[1]) if mode == "fwd" else {}
        rows.append(make_row(ctx, **common, mode=mode, note=note, timing=timing, memory=memory,
                             min_bytes=bytes_, min_flops=flops, **extra))
    return sorted(rows, key=lambda r: MODES.index(r["mode"]))


def skip_item(reason: str, ctx: Context) -> list[dict]:
    raise Skip(reason)


def kernel_items(smoke: bool, providers: tuple[str, ...], dtype: torch.dtype) -> list[Item]:
    """Every (op, case, provider) to measure, with its priority and cost estimate.
    In smoke mode torch.compile (backend aot_eager) runs for the two blocks only: CPU
    compilation is slow and its timing means nothing there."""
    batch = SMOKE_BATCH if smoke else GPU_BATCH
    items = []
    for stage in benchmark_stages(smoke):
        for op in KERNEL_OPS:
            if not op.applies(stage):
                continue
            for provider in op.providers:
                if provider not in providers:
                    continue
                run = functools.partial(run_kernel_item, op, stage, provider, batch)
                if provider == "compile" and smoke and not op.name.endswith("_block"):
                    run = functools.partial(skip_item, "smoke: torch.compile runs for the two blocks only (CPU compiles are slow)")
                target = stage.name in TARGET_KERNEL_CASES and op.name.endswith("_block")
                if provider == "compile":
                    priority = PRIORITY_COMPILE_TARGET_KERNEL if target else PRIORITY_COMPILE_KERNEL
                else:
                    priority = PRIORITY_TARGET if target else PRIORITY_KERNEL
                items.append(Item(
                    suite="kernel", op=op.name, case=op.case(stage), provider=provider, modes=op.modes,
                    priority=priority, est_s=0.0 if smoke else EST_S[provider], dtype=dtype_name(dtype), batch=batch,
                    shape=op.shape(stage, batch), run=run,
                ))
    return items
