"""Test harness: interpreter mode without a GPU, fresh seeds, the gpu marker.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when a
kernel is decorated), so it is set here, before any test module imports the library.
"""

import os
import random

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs on every run; the seed is printed so a failure can be
    replayed with SK_TEST_SEED=<seed>."""
    seed = int(os.environ.get("SK_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    print(f"SK_TEST_SEED={seed}")
    yield seed


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every float tensor the code under test allocates with torch.empty /
    empty_like / new_empty starts as NaN, so an element a kernel forgot to write
    shows up as NaN in the result instead of as stale memory that looks right."""
    from helpers import nan_filled

    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, nan_filled(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled(torch.Tensor.new_empty))
