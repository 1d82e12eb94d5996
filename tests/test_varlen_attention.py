"""vkernels.varlen_attention: packed variable-length batches (cu_seqlens), grouped key/value heads and
rotary embeddings in the kernels, against a float64 per-sequence SDPA reference on rotated q and k.

Small packings run through the Triton interpreter on CPU (in the dtype a case names) and through the
CUDA emulator (in every dtype, bf16 included); the ViT lengths (197, 257, 577) use 128-row tiles in
the interpreter (its cost is per tile) and head dim 16.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vkernels
import vkernels.ops.attention as attention_ops
from support import (GPU, KERNEL_BACKENDS, backend_case_params, backends_and_dtypes, device_for, poison_allocator,
                     relative_error, tolerance)
from vkernels.triton_kernels import attention as attention_kernels

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def rotated(x, cos, sin, interleaved):
    """x (tokens, H, D) with its first R columns rotated by per-token tables (tokens, [H,] R), written
    out pair by pair: (x_a cos_a - x_b sin_a, x_b cos_b + x_a sin_b) for the pairs (a, b) of the
    layout (a, a + R/2 for rotate-half; 2i, 2i + 1 interleaved)."""
    if cos.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    rotary_dim = cos.shape[-1]
    first = torch.arange(0, rotary_dim, 2) if interleaved else torch.arange(rotary_dim // 2)
    second = first + 1 if interleaved else first + rotary_dim // 2
    out = x.clone()
    out[..., first] = x[..., first] * cos[..., first] - x[..., second] * sin[..., first]
    out[..., second] = x[..., second] * cos[..., second] + x[..., first] * sin[..., second]
    return out


def reference(query, key, value, bounds_q, bounds_k, is_causal, scale, rotary, interleaved):
    """float64: rotate q and k (k per query head), then SDPA per sequence; no keys: zeros."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(group, 1) for t in (key, value))
    if rotary is not None:
        query, key = (rotated(t, *rotary, interleaved) for t in (query, key))
    outs = []
    for q0, q1, k0, k1 in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        if k1 == k0:
            outs.append(query.new_zeros((q1 - q0, query.shape[1], value.shape[-1])))
            continue
        q, k, v = (t.transpose(0, 1) for t in (query[q0:q1], key[k0:k1], value[k0:k1]))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@dataclasses.dataclass
class Packing:
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...] | None = None  # None: the query's
    heads: int = 2
    kv_heads: int | None = None  # None: heads
    head_dim: int = 64
    head_dim_v: int | None = None
    dtype: torch.dtype = FP32
    is_causal: bool = False
    scale: float | None = None
    rotary: str | None = None  # "half" or "interleaved"
    rotary_dim: int | None = None  # None: head_dim
    per_head: bool = False  # (tokens, heads, R) tables

    def inputs(self, device):
        lengths_k = self.lengths_k or self.lengths_q
        bounds_q, bounds_k = ([0, *torch.tensor(lengths).cumsum(0).tolist()] for lengths in (self.lengths_q, lengths_k))
        total_q, total_k = bounds_q[-1], bounds_k[-1]
        kv_heads = self.kv_heads or self.heads
        query = torch.randn(total_q, self.heads, self.head_dim, device=device).to(self.dtype)
        key = torch.randn(total_k, kv_heads, self.head_dim, device=device).to(self.dtype)
        value = torch.randn(total_k, kv_heads, self.head_dim_v or self.head_dim, device=device).to(self.dtype)
        rotary = None
        if self.rotary:  # every column its own angle: no assumption that the halves' tables repeat
            table = (total_q, self.heads) if self.per_head else (total_q,)
            angles = torch.rand(*table, self.rotary_dim or self.head_dim, device=device) * 12 - 6
            rotary = (angles.cos(), angles.sin())
        cu_seqlens = [torch.tensor(b, dtype=torch.int32, device=device) for b in (bounds_q, bounds_k)]
        return (query, key, value), cu_seqlens, (bounds_q, bounds_k), rotary


def check(backend, case: Packing, device):
    """Output and the gradients of q, k, v against float64: within tolerance(dtype) and twice that
    (as tests/test_attention.py; measured over 6 seeds against this reference: fp32 <= 4.2e-7,
    fp16 <= 4.9e-4, rotated q and k rounded to fp16 as the models round them; the CUDA kernels in
    every dtype, 10 seeds: fp32 <= 7.2e-7, fp16 <= 5.5e-4, bf16 <= 4.3e-3)."""
    (query, key, value), cu_seqlens, bounds, rotary = case.inputs(device)
    leaves = [t.detach().requires_grad_() for t in (query, key, value)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    poison_allocator(device)
    out = vkernels.varlen_attention(*leaves, *cu_seqlens, max(case.lengths_q), max(case.lengths_k or case.lengths_q),
                                    is_causal=case.is_causal, scale=case.scale, rotary=rotary,
                                    rotary_interleaved=case.rotary == "interleaved", backend=backend)
    rotary64 = None if rotary is None else tuple(t.double() for t in rotary)
    scale = case.scale or case.head_dim ** -0.5
    expected = reference(*ref_leaves, *bounds, case.is_causal, scale, rotary64, case.rotary == "interleaved")
    assert out.dtype == case.dtype and out.shape == expected.shape and out.is_contiguous()
    assert relative_error(out, expected) < tolerance(case.dtype)
    grad = torch.randn_like(out)
    poison_allocator(device)
    out.backward(grad)
    expected.backward(grad.double())
    for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        error = relative_error(leaf.grad, ref_leaf.grad, floor=1.0)  # dq, dk are ~0 for one-token sequences
        assert error < 2 * tolerance(case.dtype), f"grad {name}: {error:.2e}"


CASES = {  # each case's dtype is the Triton backend's (the CUDA kernels run every case in every dtype)
    "empty+one-token+50+13 d64 rotate-half": Packing((0, 1, 50, 13), rotary="half"),
    "gqa 4:2 d80 causal interleaved per-head": Packing((5, 33, 1), heads=4, kv_heads=2, head_dim=80, dtype=FP16,
                                                            is_causal=True, rotary="interleaved", per_head=True),
    "gqa 3:1 d80 dv32 custom scale": Packing((17, 40), heads=3, kv_heads=1, head_dim=80, head_dim_v=32,
                                                  scale=0.3),
    "cross lengths, partial rotary 32 of 64, causal": Packing((3, 30, 10), (20, 8, 15), dtype=FP16,
                                                                   is_causal=True, rotary="half", rotary_dim=32),
    "empty key sequence, d40": Packing((6, 9), (0, 15), head_dim=40),
    # head dims past 128: the CUDA dK/dV kernels accumulate two 128-column slices, rotary pairs in each
    "d160 interleaved rotary over both dK slices": Packing((7, 12), head_dim=160, rotary="interleaved"),
    "d192 rotate-half 128 of 192 causal": Packing((9, 5), head_dim=192, dtype=FP16, is_causal=True,
                                                       rotary="half", rotary_dim=128),
    # bf16: not in the Triton interpreter (GPU only there), in the CUDA emulator
    "gqa 4:2 d64 rotate-half, ViT length 197": Packing((197, 64, 1), heads=4, kv_heads=2, dtype=BF16,
                                                           rotary="half"),
}


@pytest.mark.parametrize("backend, dtype, case", backend_case_params(CASES, lambda case: case.dtype))
def test_varlen_matches_float64_reference(backend, dtype, case):
    check(backend, dataclasses.replace(case, dtype=dtype), device_for(backend))


@pytest.fixture
def wide_tiles_on_cpu(monkeypatch):
    """128-row tiles in the interpreter (the GPU keeps its own configs): a quarter of the tiles."""
    if not GPU:
        for kernel in (attention_kernels._attention_forward_kernel, attention_kernels._attention_backward_key_kernel,
                       attention_kernels._attention_backward_query_kernel):
            monkeypatch.setattr(kernel, "configs", [attention_kernels._tiled_config(128, 128)])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vit_lengths_packed(backend, wide_tiles_on_cpu):
    """ViT-B/16@224, ViT-H/14 and ViT-B/16@384 token counts in one packed batch, with 2-D RoPE."""
    check(backend, Packing((197, 257, 577), heads=1, head_dim=16, rotary="half"), device_for(backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_key_at_all_gives_zeros(backend):
    """total_k = 0: every output row and dq are zeros (written, not left to the allocator)."""
    device = device_for(backend)
    (query, key, value), cu_seqlens, _, _ = Packing((3, 2), (0, 0), head_dim=16).inputs(device)
    leaves = [t.requires_grad_() for t in (query, key, value)]
    poison_allocator(device)
    out = vkernels.varlen_attention(*leaves, *cu_seqlens, 3, 0, backend=backend)
    poison_allocator(device)
    out.backward(torch.randn_like(out))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(query.grad, torch.zeros_like(query))
    assert key.grad.shape == key.shape and value.grad.shape == value.shape


def test_torch_backend_matches_float64_reference():
    """The per-sequence SDPA loop behind backend='torch' (auto's choice on CPU), rotation included."""
    check("torch", Packing((0, 4, 9), heads=4, kv_heads=2, head_dim=16, rotary="half", per_head=True), torch.device("cpu"))


def test_one_launch_for_the_whole_batch(monkeypatch):
    """Every sequence in one forward launch, not one per sequence."""
    launches = []
    kernel = attention_kernels._attention_forward_kernel
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: launches.append(1) or run(*args, **kwargs))
    (query, key, value), cu_seqlens, _, _ = Packing((7, 3, 12, 1), head_dim=16).inputs(device_for("triton"))
    vkernels.varlen_attention(query, key, value, *cu_seqlens, 12, 12, backend="triton")
    assert len(launches) == 1


@pytest.mark.parametrize("backend, dtype", backends_and_dtypes((FP32, BF16)))
def test_backward_is_deterministic(backend, dtype):
    """Bit-identical reruns of the backward (grouped heads and rotary tables included)."""
    device = device_for(backend)
    (query, key, value), cu_seqlens, _, rotary = Packing((9, 14), heads=4, kv_heads=2, head_dim=24, dtype=dtype,
                                                         rotary="half").inputs(device)
    out, lse = attention_ops.backend_op("varlen_attention", backend)(query, key, value, *cu_seqlens, 14, 14, False,
                                                                      0.2, *rotary)
    grad = torch.randn_like(out)
    backward = attention_ops.backend_op("varlen_attention_backward", backend)
    first, second = (backward(grad, query, key, value, out, lse, *cu_seqlens, 14, 14, False, 0.2, *rotary)
                     for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_int64_boundaries_and_max_seqlen_read_from_them():
    device = device_for("triton")
    (query, key, value), cu_seqlens, _, rotary = Packing((4, 11), head_dim=16, rotary="interleaved").inputs(device)
    expected = vkernels.varlen_attention(query, key, value, *cu_seqlens, 11, 11, rotary=rotary, rotary_interleaved=True,
                                         backend="triton")
    out = vkernels.varlen_attention(query, key, value, *(t.long() for t in cu_seqlens), rotary=rotary,
                                    rotary_interleaved=True, backend="triton")
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_runs_the_kernel_in_the_autocast_dtype(backend):
    device = device_for(backend)
    (query, key, value), cu_seqlens, bounds, _ = Packing((5, 8), head_dim=16).inputs(device)
    with torch.autocast(device.type, dtype=torch.float16):
        out = vkernels.varlen_attention(query, key, value, *cu_seqlens, 8, 8, backend=backend)
    assert out.dtype == torch.float16
    # float64 on the inputs as autocast rounds them, within check()'s fp16 bound
    expected = reference(*(t.half().double() for t in (query, key, value)), *bounds, False, 16 ** -0.5, None, False)
    assert relative_error(out, expected) < tolerance(torch.float16)


def _bad_calls():
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cos = torch.rand(10, 8)
    return {
        "cu_seqlens not starting at 0": ((q, q, q, torch.tensor([1, 4, 10], dtype=torch.int32), cu, 6, 6), {}, "start at 0"),
        "cu_seqlens decreasing": ((q, q, q, torch.tensor([0, 7, 5, 10], dtype=torch.int32),
                                   torch.tensor([0, 4, 6, 10], dtype=torch.int32), 7, 7), {}, "decreases"),
        "cu_seqlens not ending at total": ((q, q, q, torch.tensor([0, 4, 9], dtype=torch.int32), cu, 6, 6), {},
                                           "end at the total"),
        "cu_seqlens float": ((q, q, q, cu.float(), cu, 6, 6), {}, "int32 or int64"),
        "cu_seqlens on another device": ((q, q, q, cu.to("meta"), cu, 6, 6), {}, "is on meta"),
        "cu_seqlens lengths differ": ((q, q, q, cu, torch.tensor([0, 10], dtype=torch.int32), 6, 10), {},
                                      "one length"),
        "max_seqlen smaller than a sequence": ((q, q, q, cu, cu, 5, 6), {}, "smaller than a sequence of 6"),
        "odd rotary_dim": ((q, q, q, cu, cu, 6, 6), {"rotary": (cos[:, :5], cos[:, :5])}, "must be even"),
        "rotary_dim > head dim": ((q, q, q, cu, cu, 6, 6), {"rotary": (torch.rand(10, 10),) * 2}, "must be even"),
        "cos and sin shapes differ": ((q, q, q, cu, cu, 6, 6), {"rotary": (cos, cos[:, :6])}, "differ in shape"),
        "tables of the wrong token count": ((q, q, q, cu, cu, 6, 6), {"rotary": (cos[:9], cos[:9])}, "rotary tables"),
        "heads not a multiple of kv heads": ((torch.randn(10, 3, 8), q, q, cu, cu, 6, 6), {}, "multiple"),
        "2-D query": ((q[:, 0], q, q, cu, cu, 6, 6), {}, "3 dims"),
    }


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("backend", ["triton", "torch", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_before_any_kernel_runs(backend, call, monkeypatch):
    """Each bad input raises its message (the CUDA op checks cu_seqlens' values in C++, before its
    kernels, with the Python messages)."""
    device_for(backend)
    args, kwargs, message = call

    def kernel_ran(*_args, **_kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(attention_kernels, "varlen_attention_forward", kernel_ran)
    monkeypatch.setattr(attention_kernels, "_forward", kernel_ran)
    with pytest.raises((ValueError, RuntimeError), match=message):
        vkernels.varlen_attention(*args, **kwargs, backend=backend)


def test_cuda_takes_rotate_half_tables_over_128_columns_up_to_head_dim_128():
    """The CUDA dK/dV kernels un-rotate per 128-column slice past head dim 128: a rotate-half pair
    (c, c + R/2) must not straddle two, so the CUDA backend says why it cannot serve R > 128 there."""
    q, wide = torch.randn(4, 2, 192), torch.randn(4, 192)
    limits = attention_ops._kernel_limits(q, q, q, None, None, 0.0, rotary=(wide, wide))
    assert set(limits) == {"cuda"} and "128" in limits["cuda"]
    assert attention_ops._kernel_limits(q, q, q, None, None, 0.0, rotary=(wide, wide), rotary_interleaved=True) == {}
    assert attention_ops._kernel_limits(q, q, q, None, None, 0.0, rotary=(wide[:, :128],) * 2) == {}


@pytest.mark.cuda
def test_cuda_op_refuses_rotate_half_tables_straddling_its_dk_slices():
    device = device_for("cuda")
    (query, key, value), cu_seqlens, _, rotary = Packing((3, 4), head_dim=192, rotary="half").inputs(device)
    with pytest.raises(RuntimeError, match="more than 128 columns"):
        torch.ops.vkernels.varlen_attention_cuda(query, key, value, *cu_seqlens, 4, 4, False, 0.1, *rotary)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    (query, key, value), cu_seqlens, _, rotary = Packing((3, 0, 6), heads=4, kv_heads=2, head_dim=16,
                                                         rotary="half").inputs(device)
    leaves = [t.requires_grad_() for t in (query, key, value)]
    op = getattr(torch.ops.vkernels, f"varlen_attention_{backend}").default
    torch.library.opcheck(op, (*leaves, *cu_seqlens, 6, 6, True, 0.25, *rotary, False))
