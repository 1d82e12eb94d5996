"""Compile every Triton kernel variant our ops launch for sm_90 (H100), without a GPU.

    python bench/compile_check.py [--quick] [--only REGEX] [--dtypes bfloat16,...] [--jobs N] [--json PATH]

The interpreter the CPU tests use (TRITON_INTERPRET=1) runs no compiler, so errors only the real
compiler raises (tl.dot shape/dtype rules, loop-carried type changes, shared memory over the
H100's 227 KiB, register spills) and bf16 code paths never show there. This tool:

1. records, in a subprocess with TRITON_INTERPRET=1, every kernel launch of representative public
   calls (``CASES`` below, backend="triton", fp32 and fp16 CPU tensors, forward and backward) as
   (kernel, argument kinds, constexprs), without running the kernels (outputs stay uninitialised:
   no launcher branches on kernel results, and it takes seconds instead of many minutes). The
   launcher modules' ``INTERPRETED`` flag is switched off there, so launch-time choices that differ
   on a GPU (fp32 conv on TF32, the delta kernel's block) are the GPU's. Non-constexpr ints are reduced to what Triton specializes on (== 1,
   divisible by 16, i32 or i64) and tensors to (dtype, 16-byte aligned). bf16 variants are the fp16
   records with every fp16 pointer (and fp16-valued constexpr) swapped to bf16;
2. compiles, without the interpreter, each distinct variant with every GPU autotune config the
   autotuner would consider for it (after the kernel's ``early_config_prune``; ``--quick``: the first
   only, as VKERNELS_TRITON_AUTOTUNE=0 runs) for GPUTarget("cuda", 90, 32), binding the arguments
   through Triton's own launch binder so the specialization is the one a real launch gets;
3. prints a table (kernel, variant, config, OK/FAIL, shared bytes, registers, spill bytes, from the
   compiled metadata and the ptxas -v log of Triton's own ptxas run, and which tensor-core
   instruction tl.dot became: Hopper's wgmma or the older mma.sync) and per-kernel maxima, and exits
   1 on any failure or shared memory over 232448 bytes (sm_90's opt-in maximum per block).

Not checked: run-time behaviour (results, speed, launch limits such as grid sizes), ints too large
for i32 (the cases are small; Triton would compile an i64 variant), and shapes whose
specialization the cases do not meet.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = ("vkernels.triton_kernels.attention", "vkernels.triton_kernels.conv",
                  "vkernels.triton_kernels.depthwise_conv", "vkernels.triton_kernels.pooling")
SHARED_LIMIT = 232448  # bytes of shared memory one sm_90 block may opt in to (227 KiB)
SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size


# ---------------------------------------------------------------------------------------------
# Cases: representative public calls. Each runs for fp32 and fp16 (bf16 is derived from fp16).


def _attention(dtype, dim=64, dim_v=None, seq_q=50, seq_k=50, mask=None, causal=False, qkv_view=False, bias=None):
    import torch
    import vkernels

    dim_v = dim_v or dim
    batch, heads = 2, 2
    if qkv_view:  # q, k, v as views of one fused projection, as timm's ViT makes them
        qkv = torch.randn(batch, seq_q, 3, heads, dim, dtype=dtype).permute(2, 0, 3, 1, 4)
        q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
    else:
        q = torch.randn(batch, heads, seq_q, dim, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, heads, seq_k, dim, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, heads, seq_k, dim_v, dtype=dtype, requires_grad=True)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(batch, heads, seq_q, seq_k) > 0.2
    elif mask == "windows":  # Swin's shift mask: float32 0 / -100 per window
        attn_mask = torch.where(torch.rand(batch, 1, seq_q, seq_k) > 0.2, 0.0, -100.0)
    elif mask in ("float", "float32"):
        attn_mask = torch.randn(batch, 1, seq_q, seq_k, dtype=dtype if mask == "float" else torch.float32)
    elif mask == "key-padding":
        attn_mask = torch.rand(batch, 1, 1, seq_k) > 0.2
    attn_bias = None
    if bias == "heads":  # a learned float32 relative-position bias shared by the batch
        attn_bias = torch.randn(1, heads, seq_q, seq_k, requires_grad=True)
    elif bias == "keys":  # a learned per-key bias: its gradient sums rows too
        attn_bias = torch.randn(batch, 1, 1, seq_k, requires_grad=True)
    elif bias == "windows":  # Swin: 5-D windows, a per-window mask and a per-head bias
        q, k, v = (t.detach().view(1, batch, heads, *t.shape[2:]).requires_grad_() for t in (q, k, v))
        attn_mask = attn_mask.view(1, batch, 1, seq_q, seq_k)
        attn_bias = torch.randn(heads, seq_q, seq_k, requires_grad=True)
    out = vkernels.attention(q, k, v, attn_mask, is_causal=causal, attn_bias=attn_bias, backend="triton")
    out.float().sum().backward()


def _rotary(dtype, dim=64, rotary="half", rotary_dim=None, bias=None):
    """vkernels.attention with rotary tables (and a learned bias: the bias-gradient kernel rotates too)."""
    import torch
    import vkernels

    q, k, v = (torch.randn(2, 2, 50, dim, dtype=dtype, requires_grad=True) for _ in range(3))
    angles = torch.rand(50, rotary_dim or dim)
    attn_bias = torch.randn(1, 2, 50, 50, requires_grad=True) if bias else None
    out = vkernels.attention(q, k, v, attn_bias=attn_bias, rotary=(angles.cos(), angles.sin()),
                             rotary_interleaved=rotary == "interleaved", backend="triton")
    out.float().sum().backward()


def _varlen(dtype, dim=64, rotary=None, causal=False, heads=4, kv_heads=2, per_head=False):
    """vkernels.varlen_attention over three packed sequences (one empty), grouped heads."""
    import torch
    import vkernels

    lengths = (50, 0, 77)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(total, kv_heads, dim, dtype=dtype, requires_grad=True) for _ in range(2))
    cu_seqlens = torch.tensor([0, 50, 50, total], dtype=torch.int32)
    tables = None
    if rotary:
        angles = torch.rand((total, heads, dim) if per_head else (total, dim))
        tables = (angles.cos(), angles.sin())
    out = vkernels.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 77, 77, is_causal=causal, rotary=tables,
                                    rotary_interleaved=rotary == "interleaved", backend="triton")
    out.float().sum().backward()


def _conv(dtype, cin=16, cout=32, size=16, kernel=3, stride=1, padding=1, groups=1, bias=True, residual=False,
          channels_last=False, pool=None, activation="relu", frozen=False):
    import torch
    import vkernels

    x = torch.randn(2, cin, size, size, dtype=dtype)
    w = torch.randn(cout, cin // groups, kernel, kernel, dtype=dtype) * 0.1
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w.requires_grad_(not frozen)  # frozen: only the input gradient, which takes the derivative as it loads
    b = torch.randn(cout, dtype=dtype, requires_grad=not frozen) if bias else None
    if pool is not None:
        out = vkernels.conv2d_relu_maxpool2d(x, w, b, stride, padding, groups=groups, pool_kernel_size=pool[0],
                                             pool_stride=pool[1], pool_padding=pool[2], backend="triton")
    else:
        r = None
        if residual:
            out_size = (size + 2 * padding - kernel) // stride + 1
            r = torch.randn(2, cout, out_size, out_size, dtype=dtype, requires_grad=True)
        out = vkernels.conv2d(x, w, b, stride, padding, groups=groups, residual=r, activation=activation,
                              backend="triton")
    out.float().sum().backward()


def _pool(dtype, op, *args, channels_last=False, channels=32, size=16, **kwargs):
    import torch
    import vkernels

    x = torch.randn(2, channels, size, size, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    out = getattr(vkernels, op)(x, *args, backend="triton", **kwargs)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()


CASES = {
    **{f"attention d{d}": (lambda dt, d=d: _attention(dt, d)) for d in (40, 64, 72, 80, 96, 128, 256)},
    **{f"attention d{d} {m} mask": (lambda dt, d=d, m=m: _attention(dt, d, mask=m))
       for d in (40, 64, 80, 128, 256) for m in ("bool", "float", "float32", "key-padding")},
    **{f"attention d{d} causal": (lambda dt, d=d: _attention(dt, d, causal=True)) for d in (64, 80, 128, 256)},
    "attention d64 seq 64 qkv view": lambda dt: _attention(dt, 64, seq_q=64, seq_k=64, qkv_view=True),
    "attention d64 cross 20x77": lambda dt: _attention(dt, 64, seq_q=20, seq_k=77, mask="key-padding"),
    "attention d64 dv32": lambda dt: _attention(dt, 64, dim_v=32),
    **{f"attention d{d} bias": (lambda dt, d=d: _attention(dt, d, bias="heads")) for d in (32, 64, 80, 128, 256)},
    "attention d64 key bias": lambda dt: _attention(dt, 64, bias="keys"),
    **{f"attention d{d} window 49 bias": (lambda dt, d=d: _attention(dt, d, seq_q=49, seq_k=49, mask="windows",
                                                                      bias="windows")) for d in (32, 64)},
    **{f"attention d{d} rotary {r}": (lambda dt, d=d, r=r: _rotary(dt, d, r)) for d in (64, 80) for r in ("half", "interleaved")},
    "attention d64 rotary 32 of 64, bias": lambda dt: _rotary(dt, 64, rotary_dim=32, bias=True),
    **{f"varlen d{d}": (lambda dt, d=d: _varlen(dt, d)) for d in (64, 80, 128)},
    **{f"varlen d{d} rotary {r}": (lambda dt, d=d, r=r: _varlen(dt, d, r)) for d in (64, 80, 128)
       for r in ("half", "interleaved")},
    "varlen d80 causal rotary per head": lambda dt: _varlen(dt, 80, "half", causal=True, per_head=True),
    "conv 3x3": lambda dt: _conv(dt),
    "conv 3x3 channels_last residual": lambda dt: _conv(dt, channels_last=True, residual=True),
    "conv 3x3 stride 2": lambda dt: _conv(dt, stride=2),
    "conv 1x1": lambda dt: _conv(dt, kernel=1, padding=0, bias=False),
    "conv 1x1 stride 2 channels_last": lambda dt: _conv(dt, kernel=1, padding=0, stride=2, channels_last=True),
    "conv 7x7 stem": lambda dt: _conv(dt, cin=3, cout=64, size=32, kernel=7, stride=2, padding=3),
    "conv depthwise": lambda dt: _conv(dt, cin=32, cout=32, groups=32),
    "conv depthwise stride 2 channels_last": lambda dt: _conv(dt, cin=32, cout=32, groups=32, stride=2,
                                                              channels_last=True),
    "conv groups 4": lambda dt: _conv(dt, cin=32, cout=64, groups=4),
    "conv 3x3 silu": lambda dt: _conv(dt, activation="silu"),
    "conv 3x3 gelu_tanh channels_last residual": lambda dt: _conv(dt, channels_last=True, residual=True,
                                                                  activation="gelu_tanh"),
    "conv 1x1 hardswish channels_last": lambda dt: _conv(dt, kernel=1, padding=0, channels_last=True,
                                                         activation="hardswish"),
    "conv 1x1 no activation residual": lambda dt: _conv(dt, kernel=1, padding=0, residual=True, activation=None),
    "conv depthwise 5x5 stride 2 silu channels_last": lambda dt: _conv(dt, cin=32, cout=32, kernel=5, stride=2,
                                                                       padding=2, groups=32, channels_last=True,
                                                                       activation="silu"),
    "conv depthwise 7x7 gelu residual": lambda dt: _conv(dt, cin=32, cout=32, kernel=7, padding=3, groups=32,
                                                         residual=True, activation="gelu"),
    "conv depthwise 3x3 leaky_relu": lambda dt: _conv(dt, cin=32, cout=32, groups=32, activation="leaky_relu"),
    "conv 3x3 silu frozen": lambda dt: _conv(dt, activation="silu", frozen=True),
    "conv depthwise 3x3 hardswish frozen": lambda dt: _conv(dt, cin=32, cout=32, groups=32, activation="hardswish",
                                                           frozen=True),
    "conv maxpool stem": lambda dt: _conv(dt, cin=3, cout=64, size=32, kernel=7, stride=2, padding=3,
                                          pool=(3, 2, 1)),
    "conv maxpool 3x3": lambda dt: _conv(dt, channels_last=True, pool=(2, 2, 0)),
    "max_pool 3/2/1": lambda dt: _pool(dt, "max_pool2d", 3, 2, 1),
    "max_pool 3/2/1 channels_last": lambda dt: _pool(dt, "max_pool2d", 3, 2, 1, channels_last=True),
    "max_pool 2/2": lambda dt: _pool(dt, "max_pool2d", 2, 2),
    "max_pool 12 dilation 2 ceil": lambda dt: _pool(dt, "max_pool2d", 12, 3, 5, dilation=2, ceil_mode=True,
                                                    size=32),
    "avg_pool 3/1/1 no pad count": lambda dt: _pool(dt, "avg_pool2d", 3, 1, 1, count_include_pad=False),
    "avg_pool 2/2 channels_last": lambda dt: _pool(dt, "avg_pool2d", 2, 2, channels_last=True),
    "avg_pool 3/2 divisor": lambda dt: _pool(dt, "avg_pool2d", 3, 2, divisor_override=5),
    "adaptive_avg_pool 1": lambda dt: _pool(dt, "adaptive_avg_pool2d", 1),
    "adaptive_avg_pool 1 channels_last": lambda dt: _pool(dt, "adaptive_avg_pool2d", 1, channels_last=True),
    "adaptive_avg_pool 7 from 20": lambda dt: _pool(dt, "adaptive_avg_pool2d", 7, size=20),
}
RECORDED_DTYPES = ("float32", "float16")


# ---------------------------------------------------------------------------------------------
# Step 1: record launches under the interpreter


def _canonical_int(value: int) -> int:
    """A stand-in with the same Triton specialization: 1, divisible by 16 or not, i32 or i64."""
    if value == 1 or value < 0:
        return value
    wide = not value < 2**31
    return (2**32 if wide else 16) + (0 if value % 16 == 0 else 1)


def _encode(value, constexpr: bool):
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if constexpr else _canonical_int(value)
    if isinstance(value, float):
        return value if constexpr else {"float": 1.5}
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


CONSTEXPR_NAMES = ("tl.constexpr", "triton.language.constexpr", "constexpr")


def record(path: str) -> None:
    """Runs every case for each recorded dtype and writes the distinct launches to ``path``."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "recording runs under the interpreter"
    import importlib
    import inspect

    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    for name in KERNEL_MODULES:  # launch-time choices as on a GPU (the interpreter runs them all)
        module = importlib.import_module(name)
        if hasattr(module, "INTERPRETED"):
            module.INTERPRETED = False
    launches, current = {}, {}

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        # modules with `from __future__ import annotations` keep the annotation as a string
        constexpr = {n for n, p in params.items() if p.annotation is tl.constexpr or p.annotation in CONSTEXPR_NAMES}
        entry = {
            "module": self.fn.__module__, "kernel": self.fn.__name__,
            "args": [_encode(a, names[i] in constexpr) for i, a in enumerate(args)],
            "kwargs": {k: _encode(v, k in constexpr) for k, v in kwargs.items()},
        }
        key = json.dumps(entry, sort_keys=True)
        launches.setdefault(key, dict(entry, cases=[]))["cases"].append(current["case"])
        # not executed: launchers never branch on the values kernels write, and the interpreter is slow

    InterpretedFunction.run = recording_run
    torch.manual_seed(0)
    for dtype in RECORDED_DTYPES:
        for case, run_case in CASES.items():
            current["case"] = f"{case} {dtype}"
            run_case(getattr(torch, dtype))
    with open(path, "w") as f:
        json.dump(list(launches.values()), f)


def _as_bf16(entry: dict) -> dict | None:
    """The launch of the same call on bf16 inputs, from its fp16 record (None if it has no fp16 pointer)."""
    def swap(value):
        if isinstance(value, dict) and value.get("tensor") == "float16":
            return dict(value, tensor="bfloat16")
        if isinstance(value, dict) and value.get("tl_dtype") == "fp16":
            return {"tl_dtype": "bf16"}
        return value

    if not any(isinstance(a, dict) and a.get("tensor") == "float16" for a in entry["args"]):
        return None
    return dict(entry, args=[swap(a) for a in entry["args"]], kwargs={k: swap(v) for k, v in entry["kwargs"].items()},
                cases=[c.replace("float16", "bfloat16") for c in entry["cases"]])


# ---------------------------------------------------------------------------------------------
# Step 2: compile for sm_90


class _MockTensor:
    """What Triton's launch binder reads of a tensor: its dtype and whether its address is 16-byte aligned."""

    def __init__(self, dtype, aligned: bool):
        self.dtype, self._ptr = dtype, 0 if aligned else 8

    def data_ptr(self):
        return self._ptr


def _decode(value):
    import torch
    import triton.language as tl

    if isinstance(value, dict):
        if "tensor" in value:
            return _MockTensor(getattr(torch, value["tensor"]), value["aligned"])
        if "tl_dtype" in value:
            return tl.dtype(value["tl_dtype"])
        if "float" in value:
            return value["float"]
    return value


def _kernel(entry):
    import importlib

    from triton.runtime.autotuner import Autotuner

    obj = getattr(importlib.import_module(entry["module"]), entry["kernel"])
    return (obj.fn, obj) if isinstance(obj, Autotuner) else (obj, None)


def configs_for(entry: dict, quick: bool) -> list[dict | None]:
    """The configs (as launch kwargs) the autotuner would try for this launch; [None] if not autotuned."""
    jit, tuner = _kernel(entry)
    if tuner is None:
        return [None]
    names = [p.name for p in jit.params]
    nargs = {names[i]: _decode(a) for i, a in enumerate(entry["args"])}
    configs = tuner.configs
    if tuner.early_config_prune and len(configs) > 1:  # as Autotuner.run: a single config is never pruned
        configs = tuner.early_config_prune(configs, nargs, **{k: _decode(v) for k, v in entry["kwargs"].items()})
    configs = [c.all_kwargs() for c in configs]
    return configs[:1] if quick else configs


_PTXAS_NUMBERS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_one(entry: dict, config: dict | None) -> dict:
    """Compiles one launch with one config for sm_90 as JITFunction.run would; returns the numbers."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit, _ = _kernel(entry)
    args = [_decode(a) for a in entry["args"]]
    kwargs = {k: _decode(v) for k, v in entry["kwargs"].items()}
    if config is not None:  # the interpreter's config is replaced by the GPU one
        for key in list(kwargs):
            if key.startswith("BLOCK_") or key in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
                del kwargs[key]
        kwargs.update(config)
    target = GPUTarget(*SM90)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    result = {"num_warps": options.num_warps, "num_stages": options.num_stages}
    started = time.perf_counter()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton's own ptxas run (-v) prints its resource usage
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    except Exception as error:  # noqa: BLE001 - every compiler error is a finding
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
        # a CompilationError ends with the message after the source excerpt; others start with it
        message = lines[-1] if type(error).__name__ == "CompilationError" else next(
            (line for line in lines if "error" in line.lower()), lines[0])
        return dict(result, ok=False, error=f"{type(error).__name__}: {message}"[:300],
                    seconds=time.perf_counter() - started)
    numbers = {k: int(m.group(1)) if (m := p.search(log.getvalue())) else None for k, p in _PTXAS_NUMBERS.items()}
    return dict(result, ok=True, shared=kernel.metadata.shared, mma=_mma_kind(kernel.asm["ptx"]),
                seconds=time.perf_counter() - started, **numbers)


def _mma_kind(ptx: str) -> str:
    """Which tensor-core instructions a kernel's tl.dot became: Hopper's asynchronous warpgroup MMA,
    the synchronous per-warp one (Ampere's, about 2/3 of the H100's dense peak at best), or both."""
    kinds = [name for name, instruction in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync")) if instruction in ptx]
    return "+".join(kinds) or "-"


def _compile_task(task):
    index, entry, config = task
    try:
        return index, compile_one(entry, config)
    except Exception as error:  # noqa: BLE001 - a binder or config error is a finding too
        return index, {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}


# ---------------------------------------------------------------------------------------------
# Step 3: report


def _pointer_dtypes(entry) -> str:
    names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "uint8": "u8", "int8": "i8",
             "int16": "i16", "int32": "i32", "int64": "i64"}
    seen = []
    for a in entry["args"]:
        if isinstance(a, dict) and "tensor" in a and names.get(a["tensor"], a["tensor"]) not in seen:
            seen.append(names.get(a["tensor"], a["tensor"]))
    return "/".join(seen)


def variant_summary(entry) -> str:
    """Pointer dtypes and constexprs: True flags by name, False omitted, other values as NAME=value."""
    jit, _ = _kernel(entry)
    names = [p.name for p in jit.params]
    constexprs = {p.name for p in jit.params if p.is_constexpr}
    values = {**{names[i]: a for i, a in enumerate(entry["args"])}, **entry["kwargs"]}
    parts = [_pointer_dtypes(entry)]
    for name in names:
        if name not in constexprs or name.startswith("BLOCK_") or name not in values:
            continue
        value = values[name]
        if value is True:
            parts.append(name)
        elif value is not False:
            parts.append(f"{name}={value['tl_dtype'] if isinstance(value, dict) else value}")
    unaligned = sum(isinstance(a, dict) and a.get("aligned") is False for a in entry["args"])
    if unaligned:
        parts.append(f"{unaligned} unaligned ptr")
    return " ".join(parts)


def config_summary(result) -> str:
    config = result.get("config") or {}
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.items() if k.startswith("BLOCK_"))
    return f"{blocks + ' ' if blocks else ''}w{result.get('num_warps', '?')} s{result.get('num_stages', '?')}"


def report(rows: list[dict]) -> int:
    """Prints the table and per-kernel maxima; returns the number of problems (failures, shared overflow)."""
    problems = 0
    print(f"{'kernel':<36} {'status':<6} {'shared':>7} {'regs':>4} {'spill':>6} {'mma':<9} {'config':<18} variant")
    for row in rows:
        r = row["result"]
        over = r.get("ok") and r["shared"] > SHARED_LIMIT
        problems += (not r.get("ok")) + bool(over)
        status = "OK" if r.get("ok") and not over else "SHARED" if over else "FAIL"
        spill = r.get("spill_stores")
        print(f"{row['entry']['kernel']:<36} {status:<6} {r.get('shared', '-'):>7} {r.get('registers') or '-':>4} "
              f"{'-' if spill is None else spill:>6} {r.get('mma', '-'):<9} {config_summary(r):<18} {row['variant']}")
        if not r.get("ok"):
            print(f"    {r['error']}    [{row['entry']['cases'][0]}]")
    print("\nper kernel: compiles, failures, max shared bytes, max registers, max spill-store bytes (config, variant),"
          " compiles per tensor-core instruction kind")
    for kernel in dict.fromkeys(row["entry"]["kernel"] for row in rows):
        mine = [row for row in rows if row["entry"]["kernel"] == kernel]
        good = [row for row in mine if row["result"].get("ok")]
        fails = len(mine) - len(good)
        line = f"  {kernel:<36} {len(mine):>4} compiles {fails:>3} failed"
        if good:
            shared = max(row["result"]["shared"] for row in good)
            regs = max(good, key=lambda row: row["result"].get("registers") or 0)
            spill = max(good, key=lambda row: row["result"].get("spill_stores") or 0)
            line += (f"  shared <= {shared}  regs <= {regs['result'].get('registers')}"
                     f"  spills <= {spill['result'].get('spill_stores')}")
            if spill["result"].get("spill_stores"):
                line += f" ({config_summary(spill['result'])}; {spill['variant']})"
            kinds = [row["result"].get("mma", "-") for row in good]
            line += "  mma: " + ", ".join(f"{kind} {kinds.count(kind)}" for kind in sorted(set(kinds)))
        print(line)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the first autotune config of each variant")
    parser.add_argument("--only", default=None, help="regex: only launches recorded from matching case names")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16", help="comma-separated dtypes to compile")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    parser.add_argument("--record", metavar="PATH", help=argparse.SUPPRESS)  # step 1, run in a subprocess
    options = parser.parse_args(argv)
    if options.record:
        record(options.record)
        return 0

    sys.path.insert(0, ROOT)
    dtypes = options.dtypes.split(",")
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        recorded = os.path.join(scratch, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        subprocess.run([sys.executable, os.path.abspath(__file__), "--record", recorded], env=env, check=True)
        with open(recorded) as f:
            entries = json.load(f)
        # compile without the interpreter, all autotune configs, in a fresh cache so that ptxas runs
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ["VKERNELS_TRITON_AUTOTUNE"] = "1"
        os.environ["TRITON_CACHE_DIR"] = os.path.join(scratch, "triton-cache")
        entries += [bf16 for e in entries if (bf16 := _as_bf16(e)) is not None]
        if options.only:
            entries = [dict(e, cases=[c for c in e["cases"] if re.search(options.only, c)]) for e in entries]
        entries = [dict(e, cases=[c for c in e["cases"] if c.rsplit(" ", 1)[1] in dtypes]) for e in entries]
        entries = [e for e in entries if e["cases"]]
        rows = []
        for entry in entries:
            for config in configs_for(entry, options.quick):
                rows.append({"entry": entry, "config": config, "variant": variant_summary(entry)})
        print(f"{len(entries)} kernel variants recorded, {len(rows)} compiles on {options.jobs} processes "
              f"(record: {time.time() - started:.0f} s)", flush=True)
        tasks = [(i, row["entry"], row["config"]) for i, row in enumerate(rows)]
        with concurrent.futures.ProcessPoolExecutor(options.jobs) as pool:
            for done, (i, result) in enumerate(pool.map(_compile_task, tasks), 1):
                rows[i]["result"] = dict(result, config=rows[i]["config"])
                if done % 25 == 0:
                    print(f"  {done}/{len(rows)} compiled ({time.time() - started:.0f} s)", flush=True)
    rows.sort(key=lambda row: (row["entry"]["module"], row["entry"]["kernel"], row["variant"]))
    problems = report(rows)
    import triton

    print(f"\nTriton {triton.__version__}: {len(rows)} compiles, {problems} problems, {time.time() - started:.0f} s")
    if options.json:
        with open(options.json, "w") as f:
            json.dump([{"kernel": r["entry"]["kernel"], "variant": r["variant"], "cases": r["entry"]["cases"],
                        **r["result"]} for r in rows], f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
