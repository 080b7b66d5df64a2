"""The interpreter's autotuner (SK_INTERPRET_AUTOTUNE=1): every candidate config runs on
the live buffers, with the autotuner's reset hooks, before the winner; and the kernels'
results do not depend on which candidate wins or on what the benchmark runs wrote."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import test_fused_attention

from segformer_kernels.triton import attention, launch


pytestmark = pytest.mark.skipif(not launch.INTERPRET, reason="the interpreter's autotuner; a GPU runs the real one")


@triton.jit
def _count_runs(runs, total, chosen, n, ID: tl.constexpr, BLOCK: tl.constexpr):
    """Counts its runs per candidate (runs[ID]) and accumulates n into ``total`` over its
    programs, the pattern that needs reset_to_zero."""
    program = tl.program_id(0)
    offsets = program * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(total, tl.sum((offsets < n).to(tl.float32), 0))
    if program == 0:
        tl.store(runs + ID, tl.load(runs + ID) + 1)
        tl.store(chosen, ID)


CONFIGS = [triton.Config({"ID": i, "BLOCK": block}) for i, block in enumerate((32, 128, 16))]


def _launch(n=100):
    runs = torch.zeros(len(CONFIGS), dtype=torch.int32)
    total = torch.zeros(1)
    chosen = torch.full((1,), -1, dtype=torch.int32)
    launch.launch_autotuned(
        _count_runs, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), (runs, total, chosen, n), {}, CONFIGS, (), n,
        reset_to_zero=("total",),
    )
    return runs.tolist(), total.item(), chosen.item()


@pytest.mark.parametrize("winner, index", [("largest", 1), ("smallest", 2), ("0", 0), ("2", 2)])
def test_every_candidate_runs_then_the_winner(winner, index, monkeypatch):
    monkeypatch.setenv("SK_AUTOTUNE_WINNER", winner)
    runs, total, chosen = _launch()
    assert chosen == index
    assert runs == [2 if i == index else 1 for i in range(len(CONFIGS))]
    assert total == 100, "the winner's run must start from zeroed accumulators"


def test_bad_winner_raises(monkeypatch):
    monkeypatch.setenv("SK_AUTOTUNE_WINNER", "fastest")
    with pytest.raises(ValueError, match="SK_AUTOTUNE_WINNER"):
        _launch()


def test_per_image_sizes_share_an_autotuner_per_power_of_two(monkeypatch):
    """Sizes that change with the image (the reduced sequence length) must not make a new
    tuning key each: one autotuner per power-of-two bucket, none keyed on N or M."""
    monkeypatch.setenv("SK_AUTOTUNE_WINNER", "0")
    launch._autotuner.cache_clear()
    for n in (65, 100, 128):
        _launch(n)
    assert launch._autotuner.cache_info().currsize == 1
    _launch(129)
    assert launch._autotuner.cache_info().currsize == 2


def test_kernel_autotune_keys_leave_out_per_image_sizes(monkeypatch):
    keys = []
    autotune = triton.autotune

    def recording_autotune(*args, key, **kwargs):
        keys.append(tuple(key))
        return autotune(*args, key=key, **kwargs)

    monkeypatch.setattr(triton, "autotune", recording_autotune)
    monkeypatch.setattr(launch, "INTERPRET_AUTOTUNE", True)
    launch._autotuner.cache_clear()
    q, k, v = (torch.randn(1, tokens, 1, 32, dtype=torch.float16, requires_grad=True) for tokens in (37, 5, 5))
    out = attention.efficient_attention(q, k, v)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    test_fused_attention._check((1, 37, 5, 1, 32), torch.float16, torch.device("cpu"))
    assert len(keys) >= 6, "the attention and fused attention kernels are autotuned in fp16"
    for key in keys:
        assert not {"N", "M"} & set(key), f"an autotune key holds a per-image size: {key}"
