"""The model's modules run on their own (docs/design.md, "The model"): a block can be hooked
and rerun alone, it computes the paper's x + attn(norm1(x)), x + mlp(norm2(x)) with its
residual adds fused into the next LayerNorm, and ``SegFormer.kernels`` reaches every
module that calls the ops."""

from __future__ import annotations

import torch

from helpers import assert_close
from segformer import SegFormer, SegFormerConfig
from segformer.model import Block, KernelModule, MixFFN

IMAGE_SIZE = (45, 38)


def small_model(**overrides) -> SegFormer:
    config = SegFormerConfig.preset("b0", depths=(1, 3, 1, 1), num_labels=3, **overrides)
    return SegFormer(config, kernels="torch")


def record_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda _, args, output: calls.append((args, output)))
    return calls


def test_a_hooked_block_sees_its_stage_shapes():
    model = small_model().eval()
    calls = record_calls(model.encoder.stages[1].blocks[2])
    with torch.no_grad():
        model(torch.randn(2, 3, *IMAGE_SIZE))
    assert len(calls) == 1
    (branch, residual, grid), (branch_out, residual_out) = calls[0]
    grid_expected = model.config.stage_grid(*IMAGE_SIZE)[1]
    tokens = (2, grid_expected[0] * grid_expected[1], model.config.hidden_sizes[1])
    assert grid == grid_expected
    assert [tuple(t.shape) for t in (branch, residual, branch_out, residual_out)] == [tokens] * 4


def test_a_block_run_alone_is_the_models_block_and_the_papers_formula():
    """Rerun with the inputs the whole model gave it, a block returns the same tensors; and
    residual + branch out is x + attn(norm1(x)) + mlp(norm2(...)) computed unfused with
    the nn modules themselves, for x = residual + branch in."""
    model = small_model().eval()
    block = model.encoder.stages[1].blocks[1]
    calls = record_calls(block)
    with torch.no_grad():
        model(torch.randn(2, 3, *IMAGE_SIZE))
        (branch, residual, grid), (branch_out, residual_out) = calls[0]
        alone = block(branch, residual, grid)
        assert torch.equal(alone[0], branch_out) and torch.equal(alone[1], residual_out)

        x = (residual + branch).double()
        block64 = block.double()
        x = x + block64.attn(block64.norm1(x), grid)
        x = x + block64.mlp(block64.norm2(x), grid)
    assert_close(residual_out + branch_out, x, torch.float32, "block output")


def test_the_first_block_of_a_stage_takes_no_residual():
    """A stage's first block gets the patch embedding's tokens as the branch and None as the
    residual; its residual stream starts at those tokens."""
    model = small_model().eval()
    calls = record_calls(model.encoder.stages[0].blocks[0])
    embed_calls = record_calls(model.encoder.stages[0].patch_embed)
    with torch.no_grad():
        model(torch.randn(1, 3, *IMAGE_SIZE))
    (branch, residual, _), _ = calls[0]
    _, (tokens, _) = embed_calls[0]
    assert residual is None and branch is tokens


def test_drop_path_is_per_block_and_only_in_training():
    """With drop path on, a training block's branch is zero or scaled per sample; in eval
    mode it is the plain branch."""
    block = Block(32, heads=1, sr_ratio=2, mlp_ratio=2, drop_path_rate=0.5)
    branch, residual, grid = torch.randn(64, 12, 32), torch.randn(64, 12, 32), (3, 4)
    with torch.no_grad():
        eval_branch, eval_residual = block.eval()(branch, residual, grid)
        torch.manual_seed(0)
        train_branch, train_residual = block.train()(branch, residual, grid)
    # the attention branch (what the block adds to x = branch + residual before its Mix-FFN)
    # is dropped or doubled, sample by sample
    x = branch + residual
    attention_eval, attention_train = eval_residual - x, train_residual - x
    dropped = attention_train.flatten(1).abs().amax(1) == 0
    assert 0 < dropped.sum() < len(dropped)
    assert_close(attention_train[~dropped], 2 * attention_eval[~dropped], torch.float32, "kept attention branch")
    # the Mix-FFN branch is dropped per sample too, independently of the attention branch
    mlp_dropped = train_branch.flatten(1).abs().amax(1) == 0
    assert 0 < mlp_dropped.sum() < len(mlp_dropped) and not torch.equal(mlp_dropped, dropped)


def test_setting_kernels_reaches_every_module_that_calls_the_ops():
    model = small_model()
    users = [m for m in model.modules() if isinstance(m, KernelModule)]
    # every block, attention, Mix-FFN, patch embedding, stage and the decode head
    assert len(users) == 3 * 6 + 2 * 4 + 1
    assert {m.kernels for m in users} == {"torch"}
    model.kernels = "auto"
    assert {m.kernels for m in users} == {"auto"}


def test_a_replaced_module_is_used():
    """Modules are ordinary submodules: swapping one block's Mix-FFN changes the output."""
    model = small_model().eval()
    images = torch.randn(1, 3, *IMAGE_SIZE)
    with torch.no_grad():
        before = model(images)

        class Doubled(MixFFN):
            def forward(self, x, grid):
                return 2 * super().forward(x, grid)

        block = model.encoder.stages[2].blocks[0]
        doubled = Doubled(model.config.hidden_sizes[2], model.config.mlp_ratios[2])
        doubled.load_state_dict(block.mlp.state_dict())
        doubled.kernels = model.kernels
        block.mlp = doubled
        after = model(images)
    assert not torch.equal(before, after)
