"""The fused decoder tail (bilinear upsample-and-sum of four stage maps, folded
BatchNorm, ReLU, classifier) against the fp64 reference, which resizes with
F.interpolate(mode="bilinear", align_corners=False)."""

import pytest
import torch

import segformer_kernels as sk
from helpers import assert_close, kernel_dtypes
from segformer_kernels import reference
from segformer_kernels.triton.decode_head import decode_head as triton_decode_head

# (batch, D, K, one (h_i, w_i) per stage map, output (H, W)).
CASES = {
    # a 84x120 image's stage grids: stage 1 at the output size, ratios that are not integers
    "stages-21x30": (3, 20, 19, [(21, 30), (11, 15), (6, 8), (3, 4)], (21, 30)),
    # 1x1 and 1xN maps upsampled; K=150 runs the wide (8-warp) class block
    "tiny-maps-K150": (1, 40, 150, [(7, 5), (4, 3), (2, 2), (1, 1)], (7, 5)),
    # no map at the output size, one map larger than it (downsampling), prime sizes
    "any-sizes": (2, 16, 5, [(5, 9), (1, 1), (3, 2), (17, 4)], (13, 11)),
    # more classes than one class block holds: the grid splits the classes
    "K300-split": (1, 24, 300, [(3, 5), (2, 3), (1, 2), (1, 1)], (3, 5)),
    # a single output pixel and a single output row
    "out-1x1": (2, 16, 3, [(1, 1), (1, 1), (1, 1), (1, 1)], (1, 1)),
    "out-1x17": (1, 16, 7, [(1, 17), (1, 9), (1, 5), (1, 3)], (1, 17)),
    # models with other stage counts: the kernel reads one to four maps; five run the
    # reference inside the Triton implementation
    "one-stage": (1, 16, 5, [(6, 7)], (6, 7)),
    "three-stages": (2, 16, 5, [(9, 8), (5, 4), (3, 2)], (9, 8)),
    "five-stages": (1, 16, 5, [(9, 8), (5, 4), (3, 2), (2, 1), (1, 1)], (9, 8)),
}


def _inputs(case, dtype, device):
    batch, channels, classes, hws, out_hw = CASES[case]
    maps = [torch.randn(batch, h * w, channels, dtype=dtype, device=device) for h, w in hws]
    # A shift around zero so that ReLU clips part of the features, not all or none.
    scale = (1 + 0.5 * torch.randn(channels, device=device)).to(dtype)
    shift = (0.5 * torch.randn(channels, device=device)).to(dtype)
    cls_weight = (torch.randn(classes, channels, device=device) / channels**0.5).to(dtype)
    cls_bias = torch.randn(classes, device=device).to(dtype)
    return maps, hws, out_hw, scale, shift, cls_weight, cls_bias


def _fp64_reference(maps, hws, out_hw, *params):
    return reference.decode_head([z.double() for z in maps], hws, out_hw, *(p.double() for p in params))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@torch.no_grad()
def test_matches_fp64_reference(dtype, case, device, poisoned_allocations):
    maps, hws, out_hw, *params = _inputs(case, dtype, device)
    out = triton_decode_head(maps, hws, out_hw, *params, input_precision="ieee")
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, _fp64_reference(maps, hws, out_hw, *params), dtype, "logits")


def test_relu_clips_part_of_the_features():
    """The inputs above exercise both sides of the ReLU (else a missing ReLU would pass)."""
    maps, hws, out_hw, scale, shift, _, _ = _inputs("stages-21x30", torch.float64, "cpu")
    fused = sum(
        torch.nn.functional.interpolate(
            z.transpose(1, 2).reshape(z.shape[0], -1, h, w), size=out_hw, mode="bilinear", align_corners=False
        )
        for z, (h, w) in zip(maps, hws)
    )
    negative = (fused * scale[:, None, None] + shift[:, None, None] < 0).double().mean().item()
    assert 0.2 < negative < 0.8


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@torch.no_grad()
def test_public_op_runs_the_kernel(dtype, device, poisoned_allocations):
    """sk.decode_head(kernels="triton") validates, then runs the kernel (fp32 products
    in tf32 on a GPU by default)."""
    maps, hws, out_hw, *params = _inputs("tiny-maps-K150", dtype, device)
    out = sk.decode_head(tuple(maps), hws, out_hw, *params, kernels="triton")
    tf32 = dtype == torch.float32 and device.type == "cuda"
    assert_close(out, _fp64_reference(maps, hws, out_hw, *params), dtype, "logits", scale=100 if tf32 else 1)


def test_strided_maps_and_classifier_weight(device, poisoned_allocations):
    """Maps and weights that are views with other strides give the same logits."""
    maps, hws, out_hw, scale, shift, cls_weight, cls_bias = _inputs("any-sizes", torch.float32, device)
    strided_maps = [torch.stack([z, -z], dim=-1)[..., 0] for z in maps]  # channel stride 2
    strided_weight = cls_weight.t().contiguous().t()  # column-major [K, D]
    with torch.no_grad():
        out = triton_decode_head(strided_maps, hws, out_hw, scale, shift, strided_weight, cls_bias, input_precision="ieee")
    assert_close(out, _fp64_reference(maps, hws, out_hw, scale, shift, cls_weight, cls_bias), torch.float32, "logits")


def test_traces_under_torch_compile_without_graph_breaks(device):
    maps, hws, out_hw, *params = _inputs("tiny-maps-K150", torch.float32, device)

    def head(maps, *params):
        return sk.decode_head(maps, hws, out_hw, *params, kernels="triton").softmax(dim=1)

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, traced = head(maps, *params), compiled(maps, *params)
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)


def test_gradients_need_the_reference(device):
    """The kernel has no backward: under autograd, "triton" refuses with a clear
    message and "auto" runs the differentiable reference."""
    maps, hws, out_hw, scale, shift, cls_weight, cls_bias = _inputs("out-1x17", torch.float32, device)
    cls_weight.requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        sk.decode_head(maps, hws, out_hw, scale, shift, cls_weight, cls_bias, kernels="triton")
    out = sk.decode_head(maps, hws, out_hw, scale, shift, cls_weight, cls_bias)
    assert out.grad_fn is not None
    (grad_weight,) = torch.autograd.grad(out.sum(), cls_weight)
    assert torch.isfinite(grad_weight).all()


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda a: a.update(maps=[], hws=[]), ValueError, "maps must hold at least one tensor"),
        (lambda a: a.update(maps=a["maps"][0]), TypeError, "maps must be a list"),
        (lambda a: a.update(hws=[(21, 30), (11, 15), (6, 8), (4, 3)][:3]), TypeError, "hws must be a list"),
        (lambda a: a.update(hws=[(21, 30), (11, 15), (6, 8), (4, 4)]), ValueError, r"maps\[3\] has 12 tokens"),
        (lambda a: a.update(out_hw=(21, 0)), ValueError, "out_hw must be positive"),
        (lambda a: a.update(out_hw=(21.0, 30)), TypeError, "out_hw must be"),
        (lambda a: a["maps"].__setitem__(1, a["maps"][1][..., :5]), ValueError, r"maps\[1\] must have shape"),
        (lambda a: a.update(shift=a["shift"][:3]), ValueError, "shift must have shape"),
        (lambda a: a.update(cls_weight=a["cls_weight"][:, :3]), ValueError, r"cls_weight must have shape \[\*, 20\]"),
        (lambda a: a.update(cls_bias=a["cls_bias"][:3]), ValueError, r"cls_bias must have shape \[19\]"),
        (lambda a: a.update(scale=a["scale"].half()), TypeError, "scale is torch.float16"),
    ],
)
def test_bad_arguments_are_refused_by_name(mutate, error, message):
    maps, hws, out_hw, scale, shift, cls_weight, cls_bias = _inputs("stages-21x30", torch.float32, "cpu")
    args = dict(maps=list(maps), hws=hws, out_hw=out_hw, scale=scale, shift=shift, cls_weight=cls_weight, cls_bias=cls_bias)
    mutate(args)
    with pytest.raises(error, match=message):
        sk.decode_head(**args, kernels="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("channels, classes", [(256, 19), (256, 150), (768, 150)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@torch.no_grad()
def test_model_sized_decoders_on_gpu(dtype, channels, classes, poisoned_allocations):
    """The decoder at a 512x512 image's stage grids, the model's widths and class counts."""
    device = torch.device("cuda")
    hws = [(128, 128), (64, 64), (32, 32), (16, 16)]
    maps = [torch.randn(2, h * w, channels, dtype=dtype, device=device) for h, w in hws]
    scale = (1 + 0.5 * torch.randn(channels, device=device)).to(dtype)
    shift = (0.5 * torch.randn(channels, device=device)).to(dtype)
    cls_weight = (torch.randn(classes, channels, device=device) / channels**0.5).to(dtype)
    cls_bias = torch.randn(classes, device=device).to(dtype)
    params = (scale, shift, cls_weight, cls_bias)
    out = triton_decode_head(maps, hws, (128, 128), *params, input_precision="ieee")
    assert_close(out, _fp64_reference(maps, hws, (128, 128), *params), dtype, "logits")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@torch.no_grad()
def test_folded_batch_norm_stays_fp32_under_autocast(kernels, device, monkeypatch):
    """Autocast casts the maps and the classifier, not the folded BatchNorm: its scale and
    shift reach the implementation in fp32 (a shift far from the features' size would
    lose bits in 16), and the logits match the fp64 reference of the cast maps."""
    from segformer_kernels import ops

    seen = {}
    dispatch = ops._dispatch

    def recording_dispatch(op, kernels, device, dtype):
        implementation = dispatch(op, kernels, device, dtype)

        def run(maps, hws, out_hw, scale, shift, *rest):
            seen.update(maps=maps[0].dtype, scale=scale.dtype, shift=shift.dtype)
            return implementation(maps, hws, out_hw, scale, shift, *rest)

        return run

    monkeypatch.setattr(ops, "_dispatch", recording_dispatch)
    maps, hws, out_hw, scale, shift, cls_weight, cls_bias = _inputs("three-stages", torch.float32, device)
    shift = shift * 1000 + 1000.3
    with torch.autocast(device.type, dtype=torch.float16):
        out = sk.decode_head(maps, hws, out_hw, scale, shift, cls_weight, cls_bias, kernels=kernels)
    assert seen == {"maps": torch.float16, "scale": torch.float32, "shift": torch.float32}
    expected = _fp64_reference([z.half() for z in maps], hws, out_hw, scale, shift, cls_weight.half(), cls_bias.half())
    assert_close(out, expected, torch.float16, "logits")
