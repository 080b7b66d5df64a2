"""The public op layer: backend choice and the errors users get on bad arguments."""

import pytest
import torch

import segformer_kernels as sk
from segformer_kernels import _backend


def _tokens(hw=(5, 7), channels=8, batch=2):
    return torch.randn(batch, hw[0] * hw[1], channels)


def _dw(channels=8):
    return torch.randn(channels, 1, 3, 3), torch.randn(channels)


def test_kernels_torch_runs_the_reference_exactly():
    x = _tokens()
    weight, bias = _dw()
    out = sk.dwconv_gelu(x, (5, 7), weight, bias, kernels="torch")
    torch.testing.assert_close(out, sk.reference.dwconv_gelu(x, (5, 7), weight, bias), rtol=0, atol=0)


def test_unknown_kernels_value_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of"):
        sk.layer_norm(_tokens(), torch.ones(8), torch.zeros(8), kernels="cuda")


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(_backend, "INTERPRET", False)
    monkeypatch.setitem(_backend._loaded, "dwconv_gelu", lambda *args: None)
    assert not _backend.use_triton("dwconv_gelu", "auto", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sk.dwconv_gelu(_tokens(), (5, 7), *_dw(), kernels="triton")


def test_float64_runs_the_reference_under_auto_and_is_refused_by_triton():
    x = _tokens().double()
    weight, bias = (t.double() for t in _dw())
    assert sk.dwconv_gelu(x, (5, 7), weight, bias).dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        sk.dwconv_gelu(x, (5, 7), weight, bias, kernels="triton")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: sk.dwconv_gelu(_tokens(), (5, 6), *_dw()), ValueError, "hw=.5, 6. gives 30 tokens"),
        (lambda: sk.dwconv_gelu(_tokens(), [5.0, 7], *_dw()), TypeError, "hw must be"),
        (lambda: sk.dwconv_gelu(_tokens()[0], (5, 7), *_dw()), ValueError, "x must be 3-D"),
        (lambda: sk.dwconv_gelu(_tokens().long(), (5, 7), *_dw()), TypeError, "x must be float32"),
        (lambda: sk.dwconv_gelu(_tokens(), (5, 7), torch.randn(8, 3, 3), torch.randn(8)), ValueError, r"weight must have shape \[8, 1, 3, 3\]"),
        (lambda: sk.dwconv_gelu(_tokens(), (5, 7), torch.randn(8, 1, 3, 3).half(), torch.randn(8)), TypeError, "weight is torch.float16"),
        (lambda: sk.dwconv_gelu(_tokens(batch=0), (5, 7), *_dw()), ValueError, "non-empty"),
        (lambda: sk.efficient_attention(torch.randn(2, 9, 2, 16), torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16)), ValueError, "k must have shape"),
        (lambda: sk.efficient_attention(torch.randn(2, 9, 2, 16), torch.randn(2, 4, 2, 16), torch.randn(2, 5, 2, 16)), ValueError, "v must have shape"),
        (lambda: sk.efficient_attention(torch.randn(2, 9, 2, 16), torch.randn(2, 0, 2, 16), torch.randn(2, 0, 2, 16)), ValueError, "non-empty"),
        (lambda: sk.efficient_attention("q", torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2, 16)), TypeError, "q must be a torch.Tensor"),
        (lambda: sk.spatial_reduction(_tokens((3, 9)), (3, 9), torch.randn(8, 8, 4, 4), *[torch.randn(8)] * 3), ValueError, "smaller than the reduction ratio sr=4"),
        (lambda: sk.spatial_reduction(_tokens(), (5, 7), torch.randn(8, 6, 2, 2), *[torch.randn(8)] * 3), ValueError, r"weight must have shape \[\*, 8, 2, 2\]"),
        (lambda: sk.spatial_reduction(_tokens(), (5, 7), torch.randn(4, 8, 2, 2), torch.randn(8), torch.randn(4), torch.randn(4)), ValueError, r"bias must have shape \[4\]"),
        (lambda: sk.mix_ffn(_tokens(), (5, 7), torch.randn(32, 8), torch.randn(32), torch.randn(16, 1, 3, 3), torch.randn(32), torch.randn(8, 32), torch.randn(8)), ValueError, r"dw_weight must have shape \[32, 1, 3, 3\]"),
        (lambda: sk.layer_norm(_tokens(), torch.ones(7), torch.zeros(8)), ValueError, r"weight must have shape \[8\]"),
        (lambda: sk.layer_norm(_tokens(), torch.ones(8), torch.zeros(8), residual=_tokens(channels=4)), ValueError, "residual must have shape"),
    ],
)
def test_bad_arguments_get_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_autocast_casts_matmul_ops_and_keeps_layer_norm_dtype():
    x = _tokens()
    weight, bias = _dw()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sk.dwconv_gelu(x, (5, 7), weight, bias, kernels="torch").dtype == torch.bfloat16
        assert sk.layer_norm(x, torch.ones(8), torch.zeros(8), kernels="torch").dtype == torch.float32


def test_auto_keeps_bf16_cpu_tensors_off_the_interpreter(monkeypatch):
    """The Triton interpreter's bf16 arithmetic is wrong, so "auto" runs the reference
    for bf16 CPU tensors even where the interpreter is on."""
    monkeypatch.setattr(_backend, "INTERPRET", True)
    called = []
    monkeypatch.setitem(_backend._loaded, "dwconv_gelu", lambda *args: called.append(args))
    x = _tokens().bfloat16()
    weight, bias = (t.bfloat16() for t in _dw())
    out = sk.dwconv_gelu(x, (5, 7), weight, bias)
    assert not called
    torch.testing.assert_close(out, sk.reference.dwconv_gelu(x, (5, 7), weight, bias), rtol=0, atol=0)
    sk.dwconv_gelu(x, (5, 7), weight, bias, kernels="triton")
    assert len(called) == 1
