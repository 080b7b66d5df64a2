"""Comparison helpers shared by the kernel tests (docs/design.md, "Testing conventions")."""

from __future__ import annotations

import functools

import torch

# ||out - ref|| / ||ref|| allowed per dtype, against an fp64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# The interpreter's bf16 arithmetic is wrong: bf16 is a GPU check.
CPU_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Token grids that are not multiples of anything: 1x1, a single row, primes.
ODD_GRIDS = [(1, 1), (1, 17), (7, 5), (13, 29)]


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    return GPU_DTYPES if torch.cuda.is_available() else CPU_DTYPES


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (the plain norm of out when ref is zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denominator = ref.norm().item() or 1.0
    return (out - ref).norm().item() / denominator


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output", scale: float = 1.0):
    """Fail unless out is finite, has ref's shape, and is within the dtype's
    relative-norm tolerance (times ``scale``, for ops whose error grows with depth)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: {(~torch.isfinite(out)).sum().item()} non-finite elements"
    err = rel_err(out, ref)
    tolerance = TOLERANCE[dtype] * scale
    assert err <= tolerance, f"{what}: relative error {err:.3e} > {tolerance:.1e} ({dtype})"


def nan_filled(allocate):
    """Wrap an allocator so float results come back filled with NaN."""

    @functools.wraps(allocate)
    def wrapper(*args, **kwargs):
        t = allocate(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    return wrapper


def grads(outputs: torch.Tensor, inputs, upstream: torch.Tensor | None = None):
    """Gradients of ``(outputs * upstream).sum()`` for each input (a fresh random
    upstream gradient when none is given): returns (grads, upstream)."""
    if upstream is None:
        upstream = torch.randn_like(outputs)
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=False), upstream


def run_every_op(device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """One small forward and backward of every op on its Triton kernels (the decode head
    forward only: it has no backward kernel), for tests and tools that must see every
    kernel launch once. Returns the ops run."""
    import segformer_kernels as sk

    batch, height, width, channels, hidden, sr = 1, 5, 6, 32, 64, 2
    tokens, keys = height * width, (height // sr) * (width // sr)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    def backward(out, inputs):
        outputs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outputs, inputs, [torch.randn_like(o) for o in outputs])

    x = make(batch, tokens, channels)
    vector = functools.partial(make, channels, scale=0.5)
    square = functools.partial(make, channels, channels, scale=channels**-0.5)
    runs = {
        "layer_norm": (lambda *a: sk.layer_norm(a[0], a[1], a[2], 1e-5, a[3], kernels="triton"),
                       (x, vector(), vector(), make(batch, tokens, channels))),
        "spatial_reduction": (lambda *a: sk.spatial_reduction(a[0], (height, width), *a[1:], 1e-5, kernels="triton"),
                              (x, make(channels, channels, sr, sr, scale=0.1), vector(), vector(), vector())),
        "efficient_attention": (lambda *a: sk.efficient_attention(*a, kernels="triton"),
                                (make(batch, tokens, 1, channels), make(batch, keys, 1, channels),
                                 make(batch, keys, 1, channels))),
        "fused_attention": (lambda *a: sk.fused_attention(*a, kernels="triton"),
                            (x, square(), vector(), make(batch, keys, 1, channels), make(batch, keys, 1, channels),
                             square(), vector())),
        "dwconv_gelu": (lambda *a: sk.dwconv_gelu(a[0], (height, width), *a[1:], kernels="triton"),
                        (x, make(channels, 1, 3, 3, scale=0.3), vector())),
        "mix_ffn": (lambda *a: sk.mix_ffn(a[0], (height, width), *a[1:], kernels="triton"),
                    (x, make(hidden, channels, scale=0.2), make(hidden, scale=0.5), make(hidden, 1, 3, 3, scale=0.3),
                     make(hidden, scale=0.5), make(channels, hidden, scale=0.1), vector())),
    }
    for op, inputs in runs.values():
        backward(op(*inputs), inputs)
    grids = [(height, width), (3, 3), (2, 2), (1, 1)]
    with torch.no_grad():
        maps = [make(batch, h * w, channels) for h, w in grids]
        sk.decode_head(maps, grids, grids[0], vector(), vector(), make(19, channels, scale=0.2), make(19),
                       kernels="triton")
    return [*runs, "decode_head"]


def tiny_segformer(num_labels: int = 4, kernels: str = "torch", **changes):
    """A seeded SegFormer with B0's structure, one block per stage and narrow stages: fast on CPU."""
    from segformer import SegFormer, SegFormerConfig

    torch.manual_seed(0)
    settings = dict(num_labels=num_labels, hidden_sizes=(16, 32, 32, 64), decoder_hidden_size=32, depths=(1, 1, 1, 1),
                    num_attention_heads=(1, 2, 2, 4))
    settings.update(changes)
    return SegFormer(SegFormerConfig.preset("b0").replace(**settings), kernels=kernels)
