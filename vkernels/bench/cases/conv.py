"""conv2d + bias + activation at ResNet-50's layer shapes (ReLU) and at MobileNetV3-Large's and
EfficientNet-B0's (depthwise 3x3 and 5x5 with ReLU, hardswish or SiLU, their 1x1 expansions and
projections) on CUDA (bf16, channels_last, batch 256), and at tiny fp32 shapes on CPU.

Stock eager runs cuDNN's conv, then the activation as its own kernel; torch.compile (default mode) fuses
what Inductor can around cuDNN; with ``max_autotune`` the forward cases also time
``torch.compile(mode="max-autotune")``, which benchmarks Inductor's Triton conv templates against
cuDNN and keeps the faster. FLOPs: 2·N·OH·OW·Cout·Cin/groups·KH·KW forward, 3× that for
forward+backward (the input and the weight gradients are one such GEMM each); bytes: the input and
output activations once forward, three times forward+backward (depthwise convs are bound by these).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

import vkernels
from vkernels.bench.case import DTYPE_NAMES, Case, compiled, dtype_name, forward_backward, forward_only, tolerance, vkernels_impls
from vkernels.ops.conv import ACTIVATIONS
from vkernels.shapes import conv_shape_class

ARGS = ("x", "weight", "bias")


class Layer(NamedTuple):
    label: str  # "3x3/2 128->128 @56"
    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel: int
    stride: int = 1
    groups: int = 1
    activation: str | None = "relu"  # as vkernels.conv2d takes it
    headline: bool = False  # timed in bench/gpu_run.sh's headline stage: one layer per shape class

    @property
    def padding(self) -> int:  # "same"-style padding, as ResNet pads
        return self.kernel // 2


CUDA_BATCH = 256
CUDA_LAYERS = [
    Layer("stem 7x7/2 3->64 @224", 3, 64, 224, 7, stride=2),
    Layer("1x1 64->256 @56", 64, 256, 56, 1, headline=True),
    Layer("1x1 256->64 @56", 256, 64, 56, 1),
    Layer("3x3 64->64 @56", 64, 64, 56, 3, headline=True),
    Layer("3x3 256->256 @14", 256, 256, 14, 3),
    Layer("3x3/2 128->128 @56", 128, 128, 56, 3, stride=2),
    Layer("depthwise 3x3 64 @56", 64, 64, 56, 3, groups=64),
    # MobileNetV3-Large: depthwise convs (the direct kernels) with ReLU early and hardswish late
    Layer("MobileNetV3-L depthwise 3x3 64 @112", 64, 64, 112, 3, stride=2, groups=64),
    Layer("MobileNetV3-L depthwise 5x5 72 @56", 72, 72, 56, 5, stride=2, groups=72),
    Layer("MobileNetV3-L depthwise 3x3 200 @14", 200, 200, 14, 3, groups=200, activation="hardswish"),
    Layer("MobileNetV3-L depthwise 5x5 960 @7", 960, 960, 7, 5, groups=960, activation="hardswish"),
    Layer("MobileNetV3-L 1x1 80->200 @14", 80, 200, 14, 1, activation="hardswish"),
    # EfficientNet-B0: SiLU everywhere; the projection convs have no activation
    Layer("EfficientNet-B0 depthwise 3x3 32 @112", 32, 32, 112, 3, groups=32, activation="silu"),
    Layer("EfficientNet-B0 depthwise 3x3 96 @112", 96, 96, 112, 3, stride=2, groups=96, activation="silu"),
    Layer("EfficientNet-B0 depthwise 5x5 240 @28", 240, 240, 28, 5, groups=240, activation="silu"),
    Layer("EfficientNet-B0 depthwise 5x5 1152 @7", 1152, 1152, 7, 5, groups=1152, activation="silu"),
    Layer("EfficientNet-B0 1x1 24->144 @56", 24, 144, 56, 1, activation="silu"),
    Layer("EfficientNet-B0 1x1 144->24 @56", 144, 24, 56, 1, activation=None),
]
CPU_BATCH = 2
CPU_LAYERS = [  # tiny: the Triton interpreter runs each program in numpy
    Layer("3x3 8->16 @12", 8, 16, 12, 3, headline=True),
    Layer("depthwise 3x3 8 @12", 8, 8, 12, 3, groups=8, activation="silu"),
]


def stock(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, layer: Layer) -> torch.Tensor:
    out = F.conv2d(x, weight, bias, layer.stride, layer.padding, 1, layer.groups)
    return out if layer.activation is None else ACTIVATIONS[layer.activation](out, 0.01)


def cases(device: torch.device, max_autotune: bool) -> list[Case]:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    batch, layers = (CUDA_BATCH, CUDA_LAYERS) if on_gpu else (CPU_BATCH, CPU_LAYERS)
    # Inductor's CPU code is not what we compete with, and it compiles for tens of seconds per case.
    compile_skip = None if on_gpu else "timed on GPUs only (~20 s of compiling per case on a CPU)"
    return [conv_case(layer, batch, dtype, device, direction, compile_skip, max_autotune)
            for layer in layers for direction in ("fwd", "fwd+bwd")]


def conv_case(layer: Layer, batch: int, dtype: torch.dtype, device: torch.device, direction: str,
              compile_skip: str | None, max_autotune: bool) -> Case:
    training = direction == "fwd+bwd"
    x_shape = (batch, layer.in_channels, layer.size, layer.size)
    weight_shape = (layer.out_channels, layer.in_channels // layer.groups, layer.kernel, layer.kernel)
    forward = functools.partial(stock, layer=layer)
    meta = [torch.empty(shape, device="meta") for shape in (x_shape, weight_shape, (layer.out_channels,))]
    out_shape = forward(*meta).shape

    def make_inputs() -> dict[str, torch.Tensor]:
        fan_in = weight_shape[1] * layer.kernel * layer.kernel  # unit-variance outputs, as after init
        x = torch.randn(x_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(weight_shape, device=device, dtype=dtype) / fan_in**0.5).contiguous(memory_format=torch.channels_last)
        bias = torch.randn(layer.out_channels, device=device, dtype=dtype)
        grad_out = torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        tensors = {"x": x, "weight": weight, "bias": bias}
        return {**{name: t.requires_grad_(training) for name, t in tensors.items()}, "grad_out": grad_out}

    wrap = functools.partial(forward_backward if training else forward_only, args=ARGS)
    # ReLU runs on the conv2d_relu ops, the other activations on the conv2d ops (see vkernels.ops.conv)
    op = "conv2d_relu" if layer.activation == "relu" else "conv2d"
    impls, skipped = vkernels_impls(
        op,
        lambda backend: functools.partial(vkernels.conv2d, stride=layer.stride, padding=layer.padding,
                                          groups=layer.groups, activation=layer.activation, backend=backend),
        wrap)
    if compile_skip:
        skipped["torch.compile"] = compile_skip
    else:
        impls = {"torch.compile": wrap(compiled(forward)), **impls}
        if max_autotune and not training:
            impls = {"torch.compile max-autotune": wrap(compiled(forward, mode="max-autotune")), **impls}

    flops = 2 * out_shape.numel() * weight_shape[1] * layer.kernel * layer.kernel
    # activations moved once each way: forward x in, out out; backward grad_out, the saved output and
    # x in, grad_x out (weights are small next to them). Depthwise convs are bound by these bytes.
    activation_elements = x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3] + out_shape.numel()
    bytes_moved = (3 if training else 1) * activation_elements * dtype.itemsize
    return Case(
        name=f"{'conv2d_relu' if op == 'conv2d_relu' else f'conv2d {layer.activation}'} {layer.label} N{batch} "
             f"{DTYPE_NAMES[dtype]} channels_last {direction}",
        family="conv",
        direction=direction,
        make_inputs=make_inputs,
        impls={"pytorch": wrap(forward), **impls},
        skipped=skipped,
        flops=flops * (3 if training else 1),
        bytes_moved=bytes_moved,
        tolerance=tolerance(dtype),
        op=op,
        dtype=dtype_name(dtype),
        shape_class=conv_shape_class((layer.kernel, layer.kernel), layer.groups, layer.in_channels),
        headline=layer.headline,
    )
