"""Where and how the kernels launch: on the inputs' device (not the current one), and
with torch's fp32 matmul setting read through its new API."""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import run_every_op
from segformer_kernels import _backend
from segformer_kernels.triton import launch

pytestmark = pytest.mark.skipif(not _backend.INTERPRET, reason="records launches of the Triton interpreter")


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch as (kernel name, device guards open at launch, the device of
    its first tensor argument, its INPUT_PRECISION)."""
    from triton.runtime.interpreter import InterpretedFunction

    open_guards = []
    recorded = []

    @contextlib.contextmanager
    def recording_guard(device):
        open_guards.append(device)
        try:
            yield
        finally:
            open_guards.pop()

    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        recorded.append((self.fn.__name__, list(open_guards), tensor.device, kwargs.get("INPUT_PRECISION")))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(launch, "_device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return recorded


def test_every_launch_is_guarded_by_its_tensors_device(launches, device):
    """Triton launches on the current CUDA device; an op on cuda:1 tensors in a process
    whose current device is cuda:0 must make cuda:1 current around its launches."""
    ops = run_every_op(device)
    launched = {name for name, *_ in launches}
    assert len(launched) >= len(ops), f"expected a launch per op at least, got {sorted(launched)}"
    for name, guards, tensor_device, _ in launches:
        assert guards, f"{name} launched outside a device guard"
        assert guards[-1] == tensor_device, f"{name} launched under a guard for {guards[-1]}, tensors on {tensor_device}"


@contextlib.contextmanager
def _fp32_precision(**settings):
    """Set torch's new-API precision attributes ("generic" is torch.backends itself) and
    restore both afterwards (the generic one first: the matmul one shows it while "none")."""
    owners = {"generic": torch.backends, "matmul": torch.backends.cuda.matmul}
    if not hasattr(owners["matmul"], "fp32_precision"):  # torch < 2.9: nothing to set or restore
        yield
        return
    previous = {name: owner.fp32_precision for name, owner in owners.items()}
    try:
        for name, value in settings.items():
            owners[name].fp32_precision = value
        yield
    finally:
        for name, value in previous.items():
            owners[name].fp32_precision = value


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no new API")
@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"matmul": "tf32"}, "tf32"),
        ({"generic": "tf32"}, "tf32"),
        ({"generic": "tf32", "matmul": "ieee"}, "ieee"),
    ],
    ids=["matmul_tf32", "generic_tf32", "matmul_overrides_generic"],
)
def test_fp32_ops_follow_the_new_precision_api(settings, expected, launches, device):
    """Once TF32 is set through the new API, torch's legacy getter raises; the fp32 ops
    must still run, with the dots torch's own matmuls would use."""
    with _fp32_precision(**settings):
        run_every_op(device, torch.float32)
    precisions = {precision for *_, precision in launches if precision is not None}
    assert precisions == {expected}


def test_fp32_ops_follow_the_legacy_setting(launches, device):
    legacy = torch.get_float32_matmul_precision()
    with _fp32_precision():  # the legacy setter writes the new API's state too
        torch.set_float32_matmul_precision("high")
        try:
            run_every_op(device, torch.float32)
        finally:
            torch.set_float32_matmul_precision(legacy)
    assert {precision for *_, precision in launches if precision is not None} == {"tf32"}


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no new API")
def test_compiled_ops_read_the_precision_when_they_run(launches, device):
    """torch.compile must not freeze the setting it saw when it traced."""
    import segformer_kernels as sk

    compiled = torch.compile(lambda q, k, v: sk.efficient_attention(q, k, v, kernels="triton"), fullgraph=True,
                             backend="aot_eager")
    q, k, v = (torch.randn(1, tokens, 1, 32, device=device) for tokens in (30, 6, 6))
    with _fp32_precision(matmul="ieee"):
        compiled(q, k, v)
    with _fp32_precision(matmul="tf32"):
        compiled(q, k, v)
    assert [precision for *_, precision in launches] == ["ieee", "tf32"]
