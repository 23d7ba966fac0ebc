"""The attention kernel for packed rows: which one a device gets, and the flex path's block mask.

Exactness against the dense path on every family is in test_families.py (forward; flex_attention
has no backward on CPU). Gradients through the compiled CUDA kernel are compared only where CUDA
is present (the bench, `bench/gpu_step.py`, measures both paths' speed there).
"""

from __future__ import annotations

import pytest
import torch

from pipelora.trainer import attention
from pipelora.trainer.errors import TrainerError


def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def test_cuda_gets_flex_and_cpu_keeps_the_dense_masks(monkeypatch) -> None:
    monkeypatch.delenv(attention.ATTENTION_ENV, raising=False)
    assert attention.choose_kernel(torch.device("cpu")) == attention.DENSE
    assert attention.choose_kernel(torch.device("cuda", 0)) == attention.FLEX
    monkeypatch.setenv(attention.ATTENTION_ENV, "dense")
    assert attention.choose_kernel(torch.device("cuda", 0)) == attention.DENSE
    monkeypatch.setenv(attention.ATTENTION_ENV, "flex")
    assert attention.choose_kernel(torch.device("cpu")) == attention.FLEX


def test_an_unknown_kernel_name_is_one_sentence(monkeypatch) -> None:
    monkeypatch.setenv(attention.ATTENTION_ENV, "flash")
    with pytest.raises(TrainerError, match="PIPELORA_ATTENTION='flash' is not one of auto, dense, flex"):
        attention.choose_kernel(torch.device("cpu"))


def test_the_block_mask_computes_only_tiles_inside_packed_sequences() -> None:
    """Eight sequences of 128 tokens in a row of 1024: flex visits the 8 diagonal tiles of 128 x 128,
    where a causal mask alone would visit 36 and the dense path computes all 64."""
    pos = packed_positions([128] * 8)
    mask = attention._block_mask(pos, None)
    assert mask.BLOCK_SIZE == (128, 128)
    assert int(mask.kv_num_blocks.sum()) + int(mask.full_kv_num_blocks.sum()) == 8
    causal = attention._block_mask(torch.arange(1024)[None], None)
    assert int(causal.kv_num_blocks.sum()) + int(causal.full_kv_num_blocks.sum()) == 36


def test_the_block_mask_is_the_dense_mask_token_for_token() -> None:
    pos = packed_positions([100, 3, 200, 1, 208])
    for window in (None, 50):
        mask = attention._block_mask(pos, window)
        dense = attention.block_causal_mask(pos, sliding_window=window)[0, 0]
        q, kv = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
        zero = torch.zeros_like(q)
        assert torch.equal(mask.mask_mod(zero, zero, q, kv), dense)


def test_one_block_mask_per_micro_batch_and_window() -> None:
    pos = packed_positions([30, 34])
    first = attention._cached_block_mask(pos, None)
    assert attention._cached_block_mask(pos, None) is first  # the next layer of the stage
    assert attention._cached_block_mask(pos, 16) is not first  # a sliding layer has its own
    same_values = pos.clone()  # the next micro-batch: a new tensor, even with equal values
    assert attention._cached_block_mask(same_values, None) is not first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: flex_attention has no backward "
                    "pass on CPU, so its gradients can only be compared on a GPU")
def test_flex_gradients_equal_the_dense_path_on_cuda() -> None:
    torch.manual_seed(0)
    pos = packed_positions([300, 57, 400, 267]).cuda()
    q, k, v = (torch.randn(1, 8, 1024, 64, device="cuda", requires_grad=True) for _ in range(3))
    allowed = attention.block_causal_mask(pos)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    flex = attention._flex_kernel(q.device)(q, k, v, block_mask=attention._block_mask(pos, None))
    assert float((flex - dense).abs().max()) <= 1e-5 * float(dense.abs().max())
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    grads_flex = torch.autograd.grad(flex.square().sum(), (q, k, v))
    for a, b in zip(grads_flex, grads_dense, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
