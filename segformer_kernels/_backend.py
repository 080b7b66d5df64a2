"""Which implementation an op runs: its Triton kernel or its PyTorch path (``torch_ops``).

The rule, for every op: ``kernels="auto"`` runs the Triton kernel whenever Triton
can run it (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was imported), and the PyTorch path otherwise. ``"triton"`` insists on the
kernel and says why when it cannot run; ``"torch"`` always runs the PyTorch path.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

KERNEL_CHOICES = ("auto", "triton", "torch")
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")

# op name -> (module, function) of its Triton implementation.
TRITON_IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "efficient_attention": ("segformer_kernels.triton.attention", "efficient_attention"),
    "fused_attention": ("segformer_kernels.triton.fused_attention", "fused_attention"),
    "spatial_reduction": ("segformer_kernels.triton.spatial_reduction", "spatial_reduction"),
    "dwconv_gelu": ("segformer_kernels.triton.dwconv_gelu", "dwconv_gelu"),
    "mix_ffn": ("segformer_kernels.triton.mix_ffn", "mix_ffn"),
    "layer_norm": ("segformer_kernels.triton.layer_norm", "layer_norm"),
    "decode_head": ("segformer_kernels.triton.decode_head", "decode_head"),
}

# Read once, like triton itself does: the interpreter is chosen when the
# kernels are decorated, so changing the variable later changes nothing.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    TRITON_IMPORTABLE = True
except ImportError:
    TRITON_IMPORTABLE = False

_loaded: dict[str, Callable | None] = {}


def check_kernels(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    return kernels


def triton_runs_on(device: torch.device) -> bool:
    """True when Triton can run kernels on tensors of this device."""
    if not TRITON_IMPORTABLE:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def triton_implementation(op: str) -> Callable | None:
    """The op's Triton function, or None where triton is not installed."""
    if op not in _loaded:
        module_name, function_name = TRITON_IMPLEMENTATIONS[op]
        _loaded[op] = getattr(importlib.import_module(module_name), function_name) if TRITON_IMPORTABLE else None
    return _loaded[op]


def load_kernels() -> None:
    """Import every kernel module up front so custom ops are registered before
    anything (torch.compile in particular) traces a call to them."""
    for op in TRITON_IMPLEMENTATIONS:
        triton_implementation(op)


def use_triton(op: str, kernels: str, device: torch.device) -> bool:
    """Decide, for one call of ``op`` on tensors of ``device``, whether to run
    the Triton kernel (True) or the PyTorch path (False)."""
    check_kernels(kernels)
    if kernels == "torch":
        return False
    runnable = triton_runs_on(device)
    if kernels == "auto":
        return runnable
    if not runnable:
        why = "triton is not installed" if not TRITON_IMPORTABLE else (
            f"tensors are on {device.type}; Triton needs CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported"
        )
        raise RuntimeError(f"{op}: kernels='triton' cannot run here: {why}")
    return True


def autocast_inputs(device: torch.device, *tensors: torch.Tensor | None):
    """Under autocast, cast floating inputs to the autocast dtype, as autocast
    does for the matmuls and convolutions these ops are made of. Outside
    autocast, return them unchanged."""
    device_type = device.type
    # meta and other devices without an autocast state: nothing to cast (asking raises)
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
