"""The ops stay whole under torch.compile(fullgraph=True) and are as accurate as eager, results and
gradients, against the same block on stock PyTorch in float64."""
import functools

import pytest
import torch

import vkernels
from support import assert_as_accurate, device_for, rounding_floor


def pools(x, backend):
    y = vkernels.max_pool2d(x, 3, 2, 1, backend=backend)
    y = vkernels.avg_pool2d(y, 2, ceil_mode=True, backend=backend)
    return vkernels.adaptive_avg_pool2d(y, 1, backend=backend)


def conv_block(x, backend):
    weight = torch.linspace(-1, 1, 4 * 4 * 9, device=x.device, dtype=x.dtype).view(4, 4, 3, 3)
    return vkernels.conv2d_relu(x, weight, padding=1, residual=x, backend=backend)


def attention_block(x, backend):
    tokens = x.flatten(2).transpose(1, 2).unflatten(-1, (2, 2)).transpose(1, 2)  # (B, heads, L, 2)
    tokens = torch.cat([tokens] * 4, dim=-1)  # head dim 8
    return vkernels.attention(tokens, tokens, tokens, is_causal=True, backend=backend)


def packed_attention_block(x, backend):
    """Two images of 10 and 25 tokens packed, 2-D RoPE in the kernels (max_seqlen given: no host sync)."""
    tokens = x.flatten(1).view(35, 2, 4).repeat(1, 1, 4)  # (tokens, heads, 16)
    cu_seqlens = torch.tensor([0, 10, 35], dtype=torch.int32, device=x.device)
    rows = torch.arange(35, device=x.device)
    cos, sin = vkernels.rotary_tables(torch.stack([rows // 5, rows % 5], -1), 16)
    return vkernels.varlen_attention(tokens, tokens, tokens, cu_seqlens, cu_seqlens, 25, 25, rotary=(cos, sin),
                                     backend=backend)


@pytest.mark.parametrize("block", [pools, conv_block, attention_block, packed_attention_block])
def test_under_compile_fullgraph(block):
    device = device_for("triton")
    torch._dynamo.reset()
    compiled = torch.compile(functools.partial(block, backend="triton"), fullgraph=True)
    x = torch.randn(2, 4, 7, 5, device=device).contiguous(memory_format=torch.channels_last)
    runs = {"compiled": (compiled, x), "eager": (functools.partial(block, backend="triton"), x),
            "exact": (functools.partial(block, backend="torch"), x.double())}
    results, grad = {}, None
    for name, (fn, t) in runs.items():
        leaf = t.clone().requires_grad_()
        out = fn(leaf)
        grad = torch.randn_like(out) if grad is None else grad  # the same upstream gradient for all three
        out.backward(grad.to(out.dtype))
        results[name] = {"output": out.detach(), "grad": leaf.grad}
    # the longest sum: the conv's 4 x 3 x 3 taps
    assert_as_accurate(results["compiled"], results["eager"], results["exact"], rounding_floor(torch.float32, 36))
