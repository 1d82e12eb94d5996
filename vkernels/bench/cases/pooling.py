"""2-D pooling at the issue's ResNet shapes on CUDA (bf16), and at small fp32 shapes on CPU.

Ideal bytes: the forward reads the input once and writes the output once; the backward reads
grad_output and writes grad_input once. Max-pool's backward also needs to know where each maximum
was: at best one byte per output (its position in a 3×3 window), written forward and read back.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import vkernels
from vkernels.bench.case import DTYPE_NAMES, Case, compiled, dtype_name, forward_backward, forward_only, tolerance, vkernels_impls

# op -> (its arguments, how the case name shows them, bytes per output saved for the backward)
POOLS = {
    "max_pool2d": (dict(kernel_size=3, stride=2, padding=1), "3x3/2 pad1", 1),  # ResNet stem
    "adaptive_avg_pool2d": (dict(output_size=1), "global", 0),  # ResNet head
    "avg_pool2d": (dict(kernel_size=3, stride=1, padding=1), "3x3/1 pad1", 0),  # Inception-style branch
}
HEADLINE = ("max_pool2d", "adaptive_avg_pool2d")  # issue 2's targets, BENCHMARKS.md
CUDA_SHAPES = {
    "max_pool2d": (256, 64, 112, 112),
    "adaptive_avg_pool2d": (256, 2048, 7, 7),
    "avg_pool2d": (128, 256, 56, 56),
}
CPU_SHAPES = {  # small: the Triton interpreter takes ~0.1 s per thousand outputs
    "max_pool2d": (2, 8, 32, 32),
    "adaptive_avg_pool2d": (2, 16, 16, 16),
    "avg_pool2d": (2, 8, 16, 16),
}


def cases(device: torch.device, max_autotune: bool) -> list[Case]:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shapes = CUDA_SHAPES if on_gpu else CPU_SHAPES
    # Inductor's CPU code is not what we compete with, and it compiles ~20 s per case on 2 cores.
    compile_skip = None if on_gpu else "timed on GPUs only (~20 s of compiling per case on a CPU)"
    return [
        pooling_case(op, shapes[op], dtype, device, channels_last, direction, compile_skip)
        for op in POOLS
        for channels_last in (False, True)
        for direction in ("fwd", "fwd+bwd")
    ]


def pooling_case(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 channels_last: bool, direction: str, compile_skip: str | None) -> Case:
    arguments, label, saved_bytes_per_output = POOLS[op]
    stock = functools.partial(getattr(F, op), **arguments)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out_shape = stock(torch.empty(shape, device="meta")).shape
    training = direction == "fwd+bwd"

    def make_inputs() -> dict[str, torch.Tensor]:
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        grad_out = torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        return {"x": x.requires_grad_(training), "grad_out": grad_out}

    wrap = forward_backward if training else forward_only
    impls, skipped = vkernels_impls(
        op, lambda backend: functools.partial(getattr(vkernels, op), **arguments, backend=backend), wrap)
    if compile_skip:
        skipped["torch.compile"] = compile_skip
    else:
        impls = {"torch.compile": wrap(compiled(stock)), **impls}
    impls = {"pytorch": wrap(stock), **impls}

    x_elements, out_elements = torch.Size(shape).numel(), out_shape.numel()
    itemsize = torch.empty((), dtype=dtype).element_size()
    bytes_moved = (x_elements + out_elements) * itemsize
    if training:
        bytes_moved += (out_elements + x_elements) * itemsize + 2 * saved_bytes_per_output * out_elements
    layout_name = "channels_last" if channels_last else "NCHW"
    return Case(
        name=f"{op} {label} {'x'.join(map(str, shape))} {DTYPE_NAMES[dtype]} {layout_name} {direction}",
        family="pooling",
        direction=direction,
        make_inputs=make_inputs,
        impls=impls,
        skipped=skipped,
        bytes_moved=bytes_moved,
        tolerance=tolerance(dtype),
        op=op,
        dtype=dtype_name(dtype),
        headline=op in HEADLINE,
    )
