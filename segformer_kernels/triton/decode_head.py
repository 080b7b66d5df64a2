"""The folded SegFormer decoder's inference tail in one pass over the output.

logits = classifier(ReLU(scale * sum_i up(z_i) + shift)), with z_i the stage
maps (four in every SegFormer variant; the kernel reads one to four) after their composed projections (docs/design.md, "What is fused, and why"), still at their own low
resolution in token layout [B, h_i*w_i, D], and up = bilinear resize to the output
grid with align_corners=False.

A program owns one batch element and BLOCK_P output pixels (and BLOCK_K classes).
For each chunk of BLOCK_C channels it gathers the four bilinear taps of every stage
map (rows of D contiguous values in token layout), sums them in fp32 registers,
applies the folded BatchNorm and ReLU there, and feeds the tile straight into a
tensor-core dot with the classifier weight chunk. Neither the upsampled maps nor
their D-channel sum at the output resolution (1.7x the logits' size for B0 on
ADE20K, 40x for B2-B5 on Cityscapes) ever reach memory: the kernel reads the four
maps and writes the logits, NCHW and contiguous along pixels.

Inference only: there is no backward (the decoder trains through the reference
path, which autograd differentiates).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ..compile_check import CompileTarget, Launch, build_targets
from .launch import DTYPE_PRECISIONS, Tile, kernel_launcher, launch_tile, resolve_input_precision

# --------------------------------------------------------------------------- kernels


@triton.jit
def _bilinear_taps(out_pos, in_size, in_per_out):
    """The two source indices and the weight of the second, along one axis, as
    F.interpolate(mode="bilinear", align_corners=False) computes them."""
    src = tl.maximum((out_pos.to(tl.float32) + 0.5) * in_per_out - 0.5, 0.0)
    low = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    high = tl.where(low < in_size - 1, low + 1, low)
    return low, high, src - low.to(tl.float32)


@triton.jit
def _gather_plan(out_y, out_x, in_h, in_w, h_per_out, w_per_out, CHANNELS: tl.constexpr):
    """For each output pixel: the element offsets of its four source tokens in a
    [h*w, CHANNELS] map and its fractional position (fx, fy) between them."""
    y0, y1, fy = _bilinear_taps(out_y, in_h, h_per_out)
    x0, x1, fx = _bilinear_taps(out_x, in_w, w_per_out)
    row0 = y0 * in_w
    row1 = y1 * in_w
    return (row0 + x0) * CHANNELS, (row0 + x1) * CHANNELS, (row1 + x0) * CHANNELS, (row1 + x1) * CHANNELS, fx, fy


@triton.jit
def _interpolate(chunk_ptr, top_left, top_right, bottom_left, bottom_right, fx, fy, mask, BLOCK_C: tl.constexpr):
    """[BLOCK_P, BLOCK_C] fp32 tile of one map resized to the output pixels.
    ``chunk_ptr`` already points at the chunk's first channel, so the 2-D pointer
    tiles are formed inside the channel loop rather than hoisted out of it."""
    channel = tl.arange(0, BLOCK_C)[None, :]
    top_left = tl.load(chunk_ptr + top_left[:, None] + channel, mask=mask, other=0.0).to(tl.float32)
    top_right = tl.load(chunk_ptr + top_right[:, None] + channel, mask=mask, other=0.0).to(tl.float32)
    bottom_left = tl.load(chunk_ptr + bottom_left[:, None] + channel, mask=mask, other=0.0).to(tl.float32)
    bottom_right = tl.load(chunk_ptr + bottom_right[:, None] + channel, mask=mask, other=0.0).to(tl.float32)
    fx = fx[:, None]
    fy = fy[:, None]
    top = top_left + (top_right - top_left) * fx
    bottom = bottom_left + (bottom_right - bottom_left) * fx
    return top + (bottom - top) * fy


@triton.jit
def _decode_head_forward_kernel(
    map1_ptr,
    map2_ptr,
    map3_ptr,
    map4_ptr,
    scale_ptr,
    shift_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    h1, w1, h2, w2, h3, w3, h4, w4,
    h1_per_out, w1_per_out, h2_per_out, w2_per_out, h3_per_out, w3_per_out, h4_per_out, w4_per_out,
    out_h,
    out_w,
    classes,
    CHANNELS: tl.constexpr,
    NUM_MAPS: tl.constexpr,
    FIRST_AT_OUTPUT_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pixel_block = tl.program_id(0)
    class_block = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    pixels_out = out_h * out_w

    pixel = pixel_block * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = pixel < pixels_out
    out_y = pixel // out_w
    out_x = pixel % out_w
    klass = class_block * BLOCK_K + tl.arange(0, BLOCK_K)
    class_mask = klass < classes

    # Maps are contiguous [B, h*w, CHANNELS]; per image, offsets fit in int32.
    map1_ptr += batch * (h1 * w1 * CHANNELS)
    map2_ptr += batch * (h2 * w2 * CHANNELS)
    map3_ptr += batch * (h3 * w3 * CHANNELS)
    map4_ptr += batch * (h4 * w4 * CHANNELS)
    if FIRST_AT_OUTPUT_SIZE:  # the stage-1 map needs no resizing: one tap per pixel
        m1_tl = pixel * CHANNELS
    else:
        m1_tl, m1_tr, m1_bl, m1_br, m1_fx, m1_fy = _gather_plan(out_y, out_x, h1, w1, h1_per_out, w1_per_out, CHANNELS)
    # maps past NUM_MAPS (a model with fewer stages) are compiled out
    if NUM_MAPS >= 2:
        m2_tl, m2_tr, m2_bl, m2_br, m2_fx, m2_fy = _gather_plan(out_y, out_x, h2, w2, h2_per_out, w2_per_out, CHANNELS)
    if NUM_MAPS >= 3:
        m3_tl, m3_tr, m3_bl, m3_br, m3_fx, m3_fy = _gather_plan(out_y, out_x, h3, w3, h3_per_out, w3_per_out, CHANNELS)
    if NUM_MAPS >= 4:
        m4_tl, m4_tr, m4_bl, m4_br, m4_fx, m4_fy = _gather_plan(out_y, out_x, h4, w4, h4_per_out, w4_per_out, CHANNELS)

    acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    for start in range(0, CHANNELS, BLOCK_C):
        channel = start + tl.arange(0, BLOCK_C)
        channel_mask = channel < CHANNELS
        mask = pixel_mask[:, None] & channel_mask[None, :]
        if FIRST_AT_OUTPUT_SIZE:
            fused = tl.load(map1_ptr + start + m1_tl[:, None] + tl.arange(0, BLOCK_C)[None, :], mask=mask, other=0.0)
            fused = fused.to(tl.float32)
        else:
            fused = _interpolate(map1_ptr + start, m1_tl, m1_tr, m1_bl, m1_br, m1_fx, m1_fy, mask, BLOCK_C)
        if NUM_MAPS >= 2:
            fused += _interpolate(map2_ptr + start, m2_tl, m2_tr, m2_bl, m2_br, m2_fx, m2_fy, mask, BLOCK_C)
        if NUM_MAPS >= 3:
            fused += _interpolate(map3_ptr + start, m3_tl, m3_tr, m3_bl, m3_br, m3_fx, m3_fy, mask, BLOCK_C)
        if NUM_MAPS >= 4:
            fused += _interpolate(map4_ptr + start, m4_tl, m4_tr, m4_bl, m4_br, m4_fx, m4_fy, mask, BLOCK_C)
        scale = tl.load(scale_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
        activated = tl.maximum(fused * scale[None, :] + shift[None, :], 0.0)
        weight = tl.load(
            weight_ptr + klass[None, :] * CHANNELS + channel[:, None],
            mask=channel_mask[:, None] & class_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(activated.to(weight.dtype), weight, acc, input_precision=INPUT_PRECISION)

    bias = tl.load(bias_ptr + klass, mask=class_mask, other=0.0).to(tl.float32)
    logits = acc + bias[None, :]
    out_ptr += batch * classes * pixels_out
    out_mask = pixel_mask[:, None] & class_mask[None, :]
    tl.store(out_ptr + klass[None, :] * pixels_out + pixel[:, None], logits.to(out_ptr.dtype.element_ty), mask=out_mask)


KERNELS = {"forward": _decode_head_forward_kernel}


# --------------------------------------------------------------------------- launch configurations

# tl.dot needs every dimension >= 16. Beyond 256 classes the grid splits the
# classes (each class block re-gathers the features, mostly from L2).
_MIN_DOT = 16
_MAX_BLOCK_K = 256
_BLOCK_P = 64
# Channels per step: the smallest dot depth. Every step keeps the thirteen gathered
# [BLOCK_P, BLOCK_C] tiles in flight at once, so a deeper step costs registers
# (32 fp16 channels take ~220 registers per thread, 16 take ~130).
_BLOCK_C = 16
# No software pipelining: it would stage every gathered tile in shared memory.
_NUM_STAGES = 1
_INT32_LIMIT = 2**31
# Stage maps the kernel reads (SegFormer's four stages); models with more stages run
# the reference (see decode_head).
MAX_KERNEL_MAPS = 4


def tile(classes: int) -> Tile:
    """BLOCK_P output pixels, BLOCK_C channels a step, BLOCK_K classes. Eight warps for
    wide class blocks keep the [BLOCK_P, BLOCK_K] fp32 accumulator at <= 64 registers
    per thread."""
    block_k = min(max(_MIN_DOT, triton.next_power_of_2(classes)), _MAX_BLOCK_K)
    return Tile.of(BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, BLOCK_K=block_k, num_warps=4 if block_k <= 64 else 8,
                   num_stages=_NUM_STAGES)


# --------------------------------------------------------------------------- launchers


def launch_forward(maps: list[Tensor], hws: list[int], out_hw: list[int], scale: Tensor, shift: Tensor,
                   cls_weight: Tensor, cls_bias: Tensor, input_precision: str) -> Tensor:
    """Logits [B, K, H, W]; ``hws`` is the (h_i, w_i) of the 1-4 maps, flattened."""
    # The kernel indexes every tensor as contiguous; the model's maps (Linear
    # outputs) and parameters already are, so these copy nothing there.
    maps = [z.contiguous() for z in maps]
    # the folded BatchNorm in fp32 whatever its dtype (the kernel applies it in fp32)
    scale, shift = (t.to(torch.float32).contiguous() for t in (scale, shift))
    cls_weight, cls_bias = cls_weight.contiguous(), cls_bias.contiguous()
    batch, _, channels = maps[0].shape
    classes = cls_weight.shape[0]
    out_h, out_w = out_hw
    # Offsets within one image are int32.
    for index, z in enumerate(maps):
        if z[0].numel() >= _INT32_LIMIT:
            raise ValueError(f"decode_head: maps[{index}] has {z[0].numel()} elements per image; the kernel needs < 2**31")
    if classes * out_h * out_w >= _INT32_LIMIT:
        raise ValueError(f"decode_head: {classes} x {out_h} x {out_w} logits per image; the kernel needs < 2**31")
    out = torch.empty((batch, classes, out_h, out_w), dtype=maps[0].dtype, device=maps[0].device)
    num_maps = len(maps)
    # the kernel's unused map arguments: any valid pointer and a 1x1 grid, never read
    unused = MAX_KERNEL_MAPS - num_maps
    maps = maps + [maps[0]] * unused
    hws = list(hws) + [1, 1] * unused
    in_per_out = [hws[i] / out_hw[i % 2] for i in range(len(hws))]
    config = tile(classes)
    grid = (triton.cdiv(out_h * out_w, config["BLOCK_P"]), triton.cdiv(classes, config["BLOCK_K"]), batch)
    constexprs = {
        "CHANNELS": channels, "NUM_MAPS": num_maps, "FIRST_AT_OUTPUT_SIZE": (hws[0], hws[1]) == (out_h, out_w),
        "INPUT_PRECISION": input_precision,
    }
    args = (*maps, scale, shift, cls_weight, cls_bias, out, *hws, *in_per_out, out_h, out_w, classes)
    launch_tile(KERNELS["forward"], grid, args, constexprs, config)
    return out


# --------------------------------------------------------------------------- autograd op
# Inference only: a custom op (opaque to torch.compile) without a backward.


@torch.library.custom_op("segformer::decode_head", mutates_args=())
@kernel_launcher
def _decode_head_op(
    maps: list[Tensor],
    hws: list[int],
    out_hw: list[int],
    scale: Tensor,
    shift: Tensor,
    cls_weight: Tensor,
    cls_bias: Tensor,
    input_precision: str,
) -> Tensor:
    """Logits [B, K, H, W]; ``hws`` is the (h_i, w_i) of the 1-4 maps, flattened."""
    return launch_forward(maps, hws, out_hw, scale, shift, cls_weight, cls_bias, input_precision)


@_decode_head_op.register_fake
def _(maps, hws, out_hw, scale, shift, cls_weight, cls_bias, input_precision):
    return maps[0].new_empty((maps[0].shape[0], cls_weight.shape[0], out_hw[0], out_hw[1]))


# --------------------------------------------------------------------------- public function


def decode_head(
    maps: Sequence[Tensor],
    hws: Sequence[tuple[int, int]],
    out_hw: tuple[int, int],
    scale: Tensor,
    shift: Tensor,
    cls_weight: Tensor,
    cls_bias: Tensor,
    *,
    input_precision: str | None = None,
) -> Tensor:
    """The Triton implementation of ``reference.decode_head`` (same arguments, assumed
    checked by ``segformer_kernels.decode_head``); no-grad inference only. One to
    MAX_KERNEL_MAPS maps run the kernel, more the reference.

    ``input_precision``: how fp32 inputs meet the tensor cores in the classifier dot
    (see launch.resolve_input_precision); it does not apply to fp16/bf16.
    """
    input_precision = resolve_input_precision(maps[0].dtype, input_precision)
    tensors = (*maps, scale, shift, cls_weight, cls_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "decode_head: the Triton kernel is inference-only and has no backward; call it under "
            "torch.no_grad() or torch.inference_mode(), or use kernels='torch' (differentiable)"
        )
    if len(maps) > MAX_KERNEL_MAPS:
        # a model with more stages than any SegFormer variant: correct, not fused
        return reference.decode_head(maps, hws, out_hw, scale, shift, cls_weight, cls_bias)
    flat_hws = [size for hw in hws for size in hw]
    return _decode_head_op(list(maps), flat_hws, list(out_hw), scale, shift, cls_weight, cls_bias, input_precision)


# --------------------------------------------------------------------------- compile targets

# Decoder widths (B0/B1: 256, B2-B5: 768) and class counts (Cityscapes 19, ADE20K 150).
_MODEL_CHANNELS = (256, 768)
_MODEL_CLASSES = (19, 150)
# the source-per-output-pixel ratios of the bilinear resize
_RATIO_ARGUMENTS = tuple(f"{axis}{i}_per_out" for i in range(1, MAX_KERNEL_MAPS + 1) for axis in "hw")


def _launches():
    """Every (config, dtype) the launcher launches for the model's decoders: the
    stage-1 map at the output size; fp32 dots in both precisions."""
    for channels, classes, (dtype, precision) in itertools.product(_MODEL_CHANNELS, _MODEL_CLASSES, DTYPE_PRECISIONS):
        constexprs = {"CHANNELS": channels, "NUM_MAPS": MAX_KERNEL_MAPS, "FIRST_AT_OUTPUT_SIZE": True,
                      "INPUT_PRECISION": precision}
        yield Launch("forward", dtype, tile(classes), constexprs, shape=f"D={channels} K={classes}")


def compile_targets() -> list[CompileTarget]:
    return build_targets("decode_head", KERNELS, _launches(), fp32_pointers=("scale_ptr", "shift_ptr"),
                         floats=_RATIO_ARGUMENTS)
