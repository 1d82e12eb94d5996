"""The ops stay whole under torch.compile(fullgraph=True) and give eager's results and gradients."""
import pytest
import torch

import vkernels
from support import device_for, relative_error


def pools(x):
    y = vkernels.max_pool2d(x, 3, 2, 1, backend="triton")
    y = vkernels.avg_pool2d(y, 2, ceil_mode=True, backend="triton")
    return vkernels.adaptive_avg_pool2d(y, 1, backend="triton")


def conv_block(x):
    weight = torch.linspace(-1, 1, 4 * 4 * 9, device=x.device).view(4, 4, 3, 3)
    return vkernels.conv2d_relu(x, weight, padding=1, residual=x, backend="triton")


def attention_block(x):
    tokens = x.flatten(2).transpose(1, 2).unflatten(-1, (2, 2)).transpose(1, 2)  # (B, heads, L, 2)
    tokens = torch.cat([tokens] * 4, dim=-1)  # head dim 8
    return vkernels.attention(tokens, tokens, tokens, is_causal=True, backend="triton")


@pytest.mark.parametrize("block", [pools, conv_block, attention_block])
def test_under_compile_fullgraph(block):
    device = device_for("triton")
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 4, 7, 5, device=device).contiguous(memory_format=torch.channels_last)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    eager, result = block(x_eager), compiled(x_compiled)
    assert relative_error(result, eager) < 1e-6
    grad = torch.randn_like(eager)
    eager.backward(grad)
    result.backward(grad)
    assert relative_error(x_compiled.grad, x_eager.grad) < 1e-6
