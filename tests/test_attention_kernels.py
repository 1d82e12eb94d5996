"""The flash-attention kernels of each backend (ops vkernels::attention[_backward]_<backend>, no
autograd) against a float64 reference: forward, lse and all three gradients (and a learned bias's).

Triton runs through its interpreter on CPU (fp32, fp16; the interpreter is slow, so shapes are small
stand-ins for ViT ones), the CUDA kernels through the emulator (fp32, fp16, bf16); both run on a GPU
when there is one. CUDA_CASES add what only the CUDA kernels' tiling distinguishes: every head-dim
class (32, 64, 128, 256 with its two dK/dV column slices), several query and key blocks (ViT's 197,
257 and 577 tokens), causal masks with Lq != Lk, a value head dim unlike the query's, unaligned rows.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from support import KERNEL_BACKENDS, device_for, dtypes_for, poison_allocator, relative_error
from vkernels.ops.library import backend_op
from vkernels.triton_kernels import attention as attention_kernels

# relative error against reference_attention in float64 on the same (rounded) inputs
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def reference_attention(query, key, value, mask, is_causal, scale, bias=None):
    """softmax(q k^T * scale + mask + bias) v in float64, and the natural-log lse; rows with every key
    masked give out = 0 (and so zero gradients) and lse = -inf."""
    scores = (query @ key.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    attend = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if mask is not None and mask.dtype == torch.bool:
        attend = attend & mask
    elif mask is not None:
        scores = scores + mask.double()
    if is_causal:
        attend = attend & torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~attend, float("-inf"))
    dead = (scores == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return probs @ value, torch.logsumexp(scores, -1)


@dataclasses.dataclass
class Case:
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: torch.dtype
    head_dim_v: int | None = None
    layout: str = "contiguous"  # "qkv": views of one (B, L, 3, H, D) projection, as in a ViT;
    # "offset": rows start 2 elements into wider rows (not 16-byte aligned: the CUDA kernels copy)
    mask: str | None = None  # "bool", "float", "float32", "key_padding", "causal_float32"
    is_causal: bool = False
    logit_scale: float = 1.0  # x100 pushes the softmax to one-hot: large logits
    dead_row: bool = False  # mask every key of one query row
    bias: tuple[int, ...] | None = None  # a learned float32 bias of this shape, broadcast to (B, H, Lq, Lk)

    def inputs(self, device):
        dv = self.head_dim_v or self.head_dim
        b, h, lq, lk, d = self.batch, self.heads, self.seq_q, self.seq_k, self.head_dim
        if self.layout == "qkv":
            assert lq == lk and dv == d
            qkv = torch.randn(b, lq, 3, h, d, device=device).to(self.dtype)
            query, key, value = (t.transpose(1, 2) for t in qkv.unbind(2))
        elif self.layout == "offset":
            query, key, value = (torch.randn(b, h, n, e + 2, device=device).to(self.dtype)[..., 2:]
                                 for n, e in ((lq, d), (lk, d), (lk, dv)))
        else:
            query = torch.randn(b, h, lq, d, device=device).to(self.dtype)
            key = torch.randn(b, h, lk, d, device=device).to(self.dtype)
            value = torch.randn(b, h, lk, dv, device=device).to(self.dtype)
        if self.logit_scale != 1.0:
            # scale q and k by sqrt each so that the fp16 inputs stay exact copies of the reference's
            query = (query.float() * self.logit_scale**0.5).to(self.dtype)
            key = (key.float() * self.logit_scale**0.5).to(self.dtype)
        mask = self._mask(device)
        bias = None if self.bias is None else torch.randn(self.bias, device=device)
        return query, key, value, mask, bias

    def _mask(self, device):
        b, h, lq, lk = self.batch, self.heads, self.seq_q, self.seq_k
        if self.mask is None:
            return None
        if self.mask == "bool":
            mask = torch.rand(b, h, lq, lk, device=device) > 0.3
            if self.dead_row:
                mask[:, :, lq // 2] = False
            return mask
        if self.mask == "key_padding":  # (B, 1, 1, Lk) expanded, never materialised
            mask = torch.arange(lk, device=device) < torch.tensor([lk - 3, lk // 2], device=device)[:b, None]
            return mask[:, None, None, :].expand(b, h, lq, lk)
        if self.mask == "causal_float32":  # open_clip's text mask: float32 0 / -inf, shared by all heads
            mask = torch.full((lq, lk), float("-inf"), device=device).triu(1)
            return mask.expand(b, h, lq, lk)
        dtype = torch.float32 if self.mask == "float32" else self.dtype
        mask = torch.randn(b, h, lq, lk, device=device)
        mask = mask.masked_fill(torch.rand(b, h, lq, lk, device=device) < 0.2, float("-inf"))
        if self.dead_row:
            mask[:, :, lq // 2] = float("-inf")
        return mask.to(dtype)


FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    pytest.param(Case(1, 2, 50, 50, 64, FP32, layout="qkv"), id="vit50-d64-qkv-fp32"),
    pytest.param(Case(2, 1, 97, 97, 80, FP16, layout="qkv", mask="key_padding"), id="vit97-d80-qkv-keypad-fp16"),
    pytest.param(Case(1, 2, 45, 70, 40, FP32, mask="float", is_causal=True), id="cross-d40-causal-float-fp32"),
    pytest.param(Case(1, 1, 70, 33, 64, FP16, mask="bool", is_causal=True, dead_row=True),
                 id="cross-lq>lk-causal-bool-deadrow-fp16"),
    pytest.param(Case(2, 1, 7, 1, 8, FP32, mask="float"), id="single-key-d8-fp32"),
    pytest.param(Case(1, 2, 1, 50, 8, FP16, head_dim_v=24), id="single-query-d8-dv24-fp16"),
    pytest.param(Case(1, 2, 50, 50, 64, FP32, mask="float", logit_scale=100.0, dead_row=True),
                 id="large-logits-float-deadrow-fp32"),
    pytest.param(Case(1, 2, 50, 37, 80, FP16, mask="float32", logit_scale=100.0), id="large-logits-f32mask-d80-fp16"),
    pytest.param(Case(1, 2, 40, 40, 64, FP32, mask="causal_float32", is_causal=True), id="text-causal-f32mask-fp32"),
    pytest.param(Case(1, 3, 50, 50, 80, BF16, layout="qkv", mask="bool", dead_row=True),
                 id="vit50-d80-bool-bf16", marks=pytest.mark.gpu),
    # learned float32 biases, their gradients summed over the dims they broadcast over
    pytest.param(Case(3, 2, 49, 49, 32, FP32, layout="qkv", bias=(1, 2, 49, 49)), id="window49-headbias-fp32"),
    pytest.param(Case(2, 2, 50, 50, 80, FP16, mask="bool", dead_row=True, bias=(1, 2, 50, 50)),
                 id="bool+bias-deadrow-d80-fp16"),
    pytest.param(Case(2, 2, 37, 45, 40, FP32, mask="key_padding", bias=(2, 1, 1, 45)), id="keybias-keypad-fp32"),
    pytest.param(Case(2, 1, 37, 45, 24, FP16, is_causal=True, bias=(1, 1, 37, 1)), id="rowbias-causal-fp16"),  # grad 0
    pytest.param(Case(2, 2, 20, 33, 16, FP32, mask="float", bias=(1, 1, 1, 1)), id="scalarbias-fp32"),
    pytest.param(Case(2, 2, 33, 20, 64, FP32, bias=(2, 2, 33, 20)), id="fullbias-fp32"),
    pytest.param(Case(2, 3, 50, 50, 64, BF16, layout="qkv", bias=(1, 3, 50, 50)), id="headbias-bf16",
                 marks=pytest.mark.gpu),
]


# The CUDA kernels' tiles: head-dim classes 32/64/128/256 (256 splits dK/dV into two column slices),
# 128-query blocks, 32- or 64-key tiles, dK/dV blocks of 64 or 128 keys. Each case runs in every dtype.
CUDA_CASES = [
    pytest.param(Case(1, 2, 197, 197, 64, FP16, layout="qkv"), id="vit197-d64-qkv"),
    pytest.param(Case(2, 1, 257, 257, 80, FP16, mask="key_padding"), id="vit257-d80-keypad"),
    pytest.param(Case(1, 1, 70, 45, 256, FP16, mask="float", dead_row=True), id="d256-float-deadrow"),
    pytest.param(Case(1, 2, 150, 70, 32, FP16, mask="bool", is_causal=True, dead_row=True), id="causal-lq>lk-d32-bool"),
    pytest.param(Case(1, 1, 70, 150, 24, FP16, head_dim_v=136, is_causal=True), id="causal-lq<lk-d24-dv136"),
    pytest.param(Case(1, 2, 97, 97, 40, FP16, mask="float", logit_scale=100.0), id="large-logits-float-mask"),
    pytest.param(Case(2, 1, 33, 1, 8, FP16, mask="causal_float32"), id="single-key-d8"),
    pytest.param(Case(1, 2, 40, 40, 24, FP16, layout="offset", is_causal=True), id="unaligned-rows-d24"),
    # the bias gradient's tiles: 64 queries x 64 keys (32 at HD = 256); a bias of one row (column)
    # sums its tile over every query (key) block, one of a single element over both
    pytest.param(Case(1, 2, 150, 97, 64, FP16, mask="bool", dead_row=True, bias=(1, 2, 150, 97)),
                 id="bias-tiles-bool-deadrow-d64"),
    pytest.param(Case(2, 1, 70, 45, 256, FP16, mask="float", bias=(1, 1, 1, 45)), id="keybias-rows-summed-d256"),
    pytest.param(Case(2, 1, 70, 100, 128, FP16, bias=(2, 1, 70, 1)), id="querybias-keys-summed-d128"),  # grad 0
    pytest.param(Case(1, 2, 70, 90, 32, FP16, mask="key_padding", bias=(1, 1, 1, 1)), id="scalarbias-both-summed-d32"),
    pytest.param(Case(1, 1, 70, 45, 40, FP16, is_causal=True, bias=(1, 1, 70, 45)), id="bias-causal-d40"),
]
# fp16 and bf16 only: the fp32 kernel's warp-per-row loop has no tiles to test here, and its shuffle
# per key makes 577 tokens cost the emulator 10 s
CUDA_TENSOR_CORE_CASES = [pytest.param(Case(1, 1, 577, 577, 64, FP16), id="vit577-d64")]


def backend_cases(cases, backends=("triton", "cuda"), cuda_dtypes=dtypes_for("cuda")):
    """(backend, case) parameters: Triton in each case's own dtype where it takes it (the interpreter
    has no bf16), the CUDA kernels in every dtype (of ``cuda_dtypes``)."""
    for backend in (p for p in KERNEL_BACKENDS if p.values[0] in backends):
        name = backend.values[0]
        for case in cases:
            dtypes = cuda_dtypes if name == "cuda" else [case.values[0].dtype]
            for dtype in (d for d in dtypes if d in dtypes_for(name)):
                yield pytest.param(name, dataclasses.replace(case.values[0], dtype=dtype),
                                   id=f"{backend.id}-{case.id}-{str(dtype).removeprefix('torch.')}",
                                   marks=[*backend.marks, *case.marks])


@pytest.mark.parametrize("backend, case", backend_cases(CASES))
def test_attention_matches_float64_reference(backend, case: Case):
    check_against_reference(backend, case)


@pytest.mark.parametrize("backend, case", [*backend_cases(CUDA_CASES, backends=("cuda",)),
                                           *backend_cases(CUDA_TENSOR_CORE_CASES, ("cuda",), (FP16, BF16))])
def test_cuda_kernel_tiles_match_float64_reference(backend, case: Case):
    check_against_reference(backend, case)


@pytest.mark.parametrize("blocks", [((16, 64), (64, 16), (16, 64)), ((64, 16), (16, 64), (64, 16))], ids=["m<n", "m>n"])
def test_triton_block_shapes(blocks, monkeypatch):
    """Tiles other than the interpreter's default (the GPU configs have BLOCK_M < BLOCK_N and > BLOCK_N)
    give the same results: the causal, length and tail-step block ranges hold for any tile shape."""
    if device_for("triton").type == "cuda":
        pytest.skip("the GPU autotunes over its own configs")
    kernels = (attention_kernels._attention_forward_kernel, attention_kernels._attention_backward_key_kernel,
               attention_kernels._attention_backward_query_kernel, attention_kernels._attention_bias_grad_kernel)
    for kernel, (block_m, block_n) in zip(kernels, (*blocks, blocks[0])):
        monkeypatch.setattr(kernel, "configs", [attention_kernels._tiled_config(block_m, block_n)])
    check_against_reference("triton", Case(1, 1, 83, 70, 40, FP32, mask="bool", is_causal=True, dead_row=True))
    check_against_reference("triton", Case(1, 1, 37, 90, 24, FP32, mask="key_padding", is_causal=True))
    # not causal: the forward and dQ key loops (and the dK/dV query loop) end in tail steps
    check_against_reference("triton", Case(1, 1, 83, 70, 40, FP32, mask="bool", dead_row=True))
    check_against_reference("triton", Case(2, 1, 50, 129, 24, FP32))
    check_against_reference("triton", Case(2, 1, 50, 70, 24, FP32, bias=(1, 1, 50, 70)))  # bias tiles across both axes


def forward(backend, query, key, value, mask, bias, is_causal, scale):
    """(out, lse) from one backend's forward op."""
    return backend_op("attention", backend)(query, key, value, mask, bias, is_causal, scale)


def backward(backend, grad_out, query, key, value, out, lse, mask, bias, is_causal, scale):
    """(grad_query, grad_key, grad_value, grad_bias or None) from one backend's backward op."""
    return backend_op("attention_backward", backend)(grad_out, query, key, value, out, lse, mask, bias, is_causal,
                                                     scale, bias is not None)


def check_against_reference(backend: str, case: Case):
    device = device_for(backend)
    query, key, value, mask, bias = case.inputs(device)
    scale = case.head_dim**-0.5
    poison_allocator(device)
    out, lse = forward(backend, query, key, value, mask, bias, case.is_causal, scale)

    leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    # the bias at full size: its gradient is dS, summed below to the bias's shape
    scores = (case.batch, case.heads, case.seq_q, case.seq_k)
    bias_leaf = None if bias is None else bias.double().expand(scores).clone().requires_grad_()
    expected_out, expected_lse = reference_attention(*leaves, mask, case.is_causal, scale, bias_leaf)
    grad_out = torch.randn_like(out)
    expected_out.backward(grad_out.double())
    poison_allocator(device)
    *grads, grad_bias = backward(backend, grad_out, query, key, value, out, lse, mask, bias, case.is_causal, scale)

    # scores of ~1e3 carry fp32 rounding of ~1e-4 into exp(): large logits get a looser bound
    tolerance = TOLERANCE[case.dtype] * (10 if case.logit_scale > 1 else 1)
    assert out.dtype == query.dtype and out.shape == expected_out.shape
    assert relative_error(out, expected_out, floor=1.0) < tolerance
    alive = torch.isfinite(expected_lse)
    assert torch.equal(torch.isinf(lse), ~alive) and (lse[~alive] > 0).all(), "fully masked rows: lse = +inf"
    assert relative_error(lse[alive], expected_lse[alive], floor=1.0) < 1e-6
    for name, grad, leaf in zip(("query", "key", "value"), grads, leaves):
        assert grad.dtype == query.dtype and grad.shape == leaf.shape, name
        error = relative_error(grad, leaf.grad, floor=1.0)  # dQ and dK are ~0 with a single key
        assert error < tolerance, f"grad {name}: {error:.2e}"
    if bias is None:
        assert grad_bias is None
    else:  # summed over the batch entries, rows and columns the bias broadcasts over; measured against
        # dS too, as a bias constant along the keys has gradient 0 (softmax ignores it)
        assert grad_bias.dtype == bias.dtype and grad_bias.shape == bias.shape
        expected = bias_leaf.grad.sum_to_size(bias.shape)
        floor = max(bias_leaf.grad.norm().item(), 1.0)
        assert relative_error(grad_bias, expected, floor=floor) < tolerance, "grad bias"
    if case.dead_row:
        assert (out[:, :, case.seq_q // 2] == 0).all() and (grads[0][:, :, case.seq_q // 2] == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_attention_backward_is_deterministic(backend, monkeypatch):
    """Bit-identical reruns; the bias gradient sums 6 batch entries in 6 chunks of 1 (the default
    here) and, on Triton, in 3 chunks of 2 (few programs wanted), each in a fixed order."""
    query, key, value, mask, bias = Case(3, 2, 20, 17, 16, FP32, mask="float", bias=(1, 1, 20, 17)).inputs(
        device_for(backend))
    out, lse = forward(backend, query, key, value, mask, bias, False, 0.2)
    grad_out = torch.randn_like(out)
    for programs in (3, attention_kernels.BIAS_GRAD_PROGRAMS):
        monkeypatch.setattr(attention_kernels, "BIAS_GRAD_PROGRAMS", programs)
        first = backward(backend, grad_out, query, key, value, out, lse, mask, bias, False, 0.2)
        second = backward(backend, grad_out, query, key, value, out, lse, mask, bias, False, 0.2)
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", dtypes_for("cuda"))
def test_cuda_bias_gradient_sums_chunks_of_entries(dtype):
    """1025 batch entries share one bias: more than the 1024 programs the sum aims for, so each adds
    two entries (the CUDA kernels' bias_grad_chunks)."""
    if dtype != FP32 and device_for("cuda").type != "cuda":
        pytest.skip("1025 tensor-core blocks per kernel cost the emulator 7 s: fp16/bf16 on a GPU")
    check_against_reference("cuda", Case(1025, 1, 1, 3, 8, dtype, bias=(1, 1, 1, 3)))


def test_triton_bias_grad_chunks_depend_on_shapes_only():
    assert attention_kernels.bias_grad_chunks(1, 4) == (1, 1)  # nothing to reduce: no partial sums
    assert attention_kernels.bias_grad_chunks(8192, 3) == (25, 328)  # Swin-T stage 1, batch 128: 64 x 128 windows
    for entries, tiles in ((5, 1), (1000, 7), (3, 5000)):
        chunk_size, chunks = attention_kernels.bias_grad_chunks(entries, tiles)
        assert (chunks - 1) * chunk_size < entries <= chunks * chunk_size
