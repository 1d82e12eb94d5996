"""vkernels.attention: SDPA's arguments and results through the public function and its ops."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import vkernels
from support import (
    KERNEL_BACKENDS, assert_as_accurate, backends_and_dtypes, device_for, dtypes_for, relative_error, rounding_floor,
    tolerance,
)


def reference(query, key, value, attn_mask=None, is_causal=False, scale=None, attn_bias=None):
    """SDPA in float64, attn_bias added to attn_mask (a bool mask keeps -inf where it masks)."""
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    if attn_bias is not None:
        bias = attn_bias.double()
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask + bias
    return F.scaled_dot_product_attention(query.double(), key.double(), value.double(), mask, is_causal=is_causal,
                                          scale=scale)


def check(backend, query, key, value, dtype, **kwargs):
    """Output and the gradients of q, k, v and of every mask that requires grad against float64 SDPA.
    A learned mask's reference is a full-size float64 copy, whose gradient dS is then summed to the
    mask's shape; its error is measured against the largest of that sum, dS and 1 (a bias constant
    along the keys has gradient 0: softmax ignores it, and the kernels' sum cancels to rounding of dS)."""
    learned = [name for name, t in kwargs.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    scores = (*torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]), query.shape[-2], key.shape[-2])
    ours = {**kwargs, **{name: kwargs[name].detach().requires_grad_() for name in learned}}
    theirs = {**kwargs, **{name: kwargs[name].detach().double().expand(scores).clone().requires_grad_() for name in learned}}
    leaves = [t.detach().requires_grad_() for t in (query, key, value)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    out = vkernels.attention(*leaves, **ours, backend=backend)
    expected = reference(*ref_leaves, **theirs)
    assert out.dtype == dtype and out.shape == expected.shape
    assert relative_error(out, expected) < tolerance(dtype)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
        assert relative_error(leaf.grad, ref_leaf.grad, floor=1.0) < tolerance(dtype) * 2
    for name in learned:
        grad_scores = theirs[name].grad
        assert ours[name].grad.dtype == ours[name].dtype and ours[name].grad.shape == ours[name].shape
        floor = max(grad_scores.norm().item(), 1.0)  # absolute where dS is ~0 too (a single key, say)
        error = relative_error(ours[name].grad, grad_scores.sum_to_size(ours[name].shape), floor=floor)
        assert error < tolerance(dtype) * 2, name


@pytest.mark.parametrize(("backend", "dtype"), backends_and_dtypes())
def test_vit_block_qkv_views(backend, dtype):
    """q, k, v as a ViT block makes them: unbind of a (B, L, 3, H, D) projection, read in place."""
    device = device_for(backend)
    batch, length, heads, head_dim = 2, 50, 3, 40
    qkv = torch.randn(batch, length, 3, heads, head_dim, device=device).to(dtype)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    check(backend, query, key, value, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_key_padding_mask_causal_cross_attention_and_3d(backend):
    device = device_for(backend)
    q, k, v = (torch.randn(2, 3, n, 16, device=device) for n in (7, 11, 11))
    padding = torch.rand(2, 1, 1, 11, device=device) > 0.3
    padding[..., 0] = True
    check(backend, q, k, v, torch.float32, attn_mask=padding)
    check(backend, q, k, v, torch.float32, attn_mask=torch.randn(7, 11, device=device))
    check(backend, q, k, v, torch.float32, is_causal=True, scale=0.3)
    check(backend, q[0], k[0], v[0], torch.float32)  # 3-D inputs
    check(backend, q, k[:1], v[:1], torch.float32)  # batch dims broadcast


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fully_masked_rows_give_zeros_not_nan(backend):
    device = device_for(backend)
    q, k, v = (torch.randn(1, 2, 5, 16, device=device, requires_grad=True) for _ in range(3))
    mask = torch.ones(5, 5, dtype=torch.bool, device=device)
    mask[2] = False
    out = vkernels.attention(q, k, v, attn_mask=mask, backend=backend)
    out.sum().backward()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    assert not any(t.grad.isnan().any() for t in (q, k, v))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=10, deadline=None)
@given(
    batch_heads=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    lengths=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    head_dims=st.tuples(st.sampled_from([8, 16, 24, 40, 64, 72, 80, 96]), st.sampled_from([None, 8, 40])),
    mask=st.sampled_from([None, "bool", "float", "key_padding", "causal"]),
    data=st.data(),
)
def test_attention_shape_fuzz(backend, batch_heads, lengths, head_dims, mask, data):
    """Random lengths, head dims (value's may differ), masks and causality against float64 SDPA.
    Every query row keeps key 0, so no row is fully masked (where SDPA itself gives NaN)."""
    device = device_for(backend)
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    (batch, heads), (seq_q, seq_k), (head_dim, head_dim_v) = batch_heads, lengths, head_dims
    query = torch.randn(batch, heads, seq_q, head_dim, device=device).to(dtype)
    key = torch.randn(batch, heads, seq_k, head_dim, device=device).to(dtype)
    value = torch.randn(batch, heads, seq_k, head_dim_v or head_dim, device=device).to(dtype)
    kwargs = {}
    if mask == "causal":
        kwargs["is_causal"] = True
    elif mask == "key_padding":
        kwargs["attn_mask"] = (torch.rand(batch, 1, 1, seq_k, device=device) > 0.4).index_fill(-1, torch.tensor([0], device=device), True)
    elif mask == "bool":
        kwargs["attn_mask"] = (torch.rand(seq_q, seq_k, device=device) > 0.4).index_fill(-1, torch.tensor([0], device=device), True)
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(heads, seq_q, seq_k, device=device).to(dtype)
    check(backend, query, key, value, dtype, **kwargs)


def keep_first_key(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask where every query row attends key 0: no row fully masked (SDPA gives NaN there)."""
    return mask.index_fill(-1, torch.tensor([0], device=mask.device), True)


FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# name -> (query batch dims, key length, bias shape, mask shape or None, q/k/v dtype): learned float32
# biases as models use them. Three batch dims are the kernels' three levels (B0 images, B1 windows, H).
BIAS_PATTERNS = {
    "relative-position (1,H,L,L)": ((3, 2), 20, (1, 2, 20, 20), None, FP16),
    "swin: per-head bias (H,L,L) + per-window shift mask (nW,1,L,L)": ((2, 3, 2), 20, (2, 20, 20), (3, 1, 20, 20), FP16),
    "swin windows as batch: bias (nW,H,L,L) + shift mask (nW,1,L,L)": ((2, 3, 2), 20, (3, 2, 20, 20), (3, 1, 20, 20), FP32),
    "per-head (H,L,L) + key padding": ((2, 2), 25, (2, 20, 25), (2, 1, 1, 25), FP16),
    "per-key (B,1,1,Lk)": ((3, 2), 25, (3, 1, 1, 25), None, FP32),
    "per-query (Lq,1): gradient 0": ((2, 2), 25, (20, 1), None, FP16),
    "full (B,H,Lq,Lk)": ((2, 2), 25, (2, 2, 20, 25), None, FP32),
}


def bias_cases():
    """(backend, pattern) parameters: Triton in each pattern's own dtype (bf16 on a GPU only: the
    interpreter has none), the CUDA kernels in fp32, fp16 and bf16."""
    for backend in KERNEL_BACKENDS:
        name = backend.values[0]
        for pattern_name, pattern in BIAS_PATTERNS.items():
            dtypes = dtypes_for(name) if name == "cuda" else (pattern[-1], BF16) if pattern[-1] == FP16 else (pattern[-1],)
            for dtype in (d for d in dtypes if d in dtypes_for(name)):
                yield pytest.param(name, (*pattern[:-1], dtype), marks=backend.marks,
                                   id=f"{backend.id}-{pattern_name}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("backend, pattern", bias_cases())
def test_learned_bias_gets_sdpas_gradient(backend, pattern):
    """An additive attn_mask that requires grad (float32, with any q/k/v dtype, as SDPA takes it):
    its gradient, summed over what it broadcasts over, against float64 SDPA."""
    device = device_for(backend)
    batch, key_len, bias_shape, mask_shape, dtype = pattern
    query = torch.randn(*batch, 20, 16, device=device).to(dtype)
    key, value = (torch.randn(*batch, key_len, 16, device=device).to(dtype) for _ in range(2))
    bias = torch.randn(bias_shape, device=device, requires_grad=True)
    if mask_shape is None:
        check(backend, query, key, value, dtype, attn_mask=bias)
    else:  # a second mask in the same pass: SDPA's attn_mask is their sum
        mask = keep_first_key(torch.rand(mask_shape, device=device) > 0.3)
        check(backend, query, key, value, dtype, attn_mask=mask, attn_bias=bias)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=5, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    lengths=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    head_dim=st.sampled_from([8, 16, 24]),
    broadcast=st.lists(st.booleans(), min_size=5, max_size=5),
    mask=st.sampled_from([None, "bool", "float"]),
    bias_dtype=st.sampled_from([torch.float32, None]),
    data=st.data(),
)
def test_learned_bias_fuzz(backend, batch, lengths, head_dim, broadcast, mask, bias_dtype, data):
    """Random batch dims, a bias broadcast over a random subset of them and of (Lq, Lk), maybe of lower
    rank, with or without a second mask, in the query's dtype or float32."""
    device = device_for(backend)
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    seq_q, seq_k = lengths
    scores = (*batch, seq_q, seq_k)
    bias_shape = [1 if flat else size for flat, size in zip(broadcast, scores[-5:] if len(scores) >= 5 else scores)]
    bias_shape = bias_shape[next((i for i, size in enumerate(bias_shape) if size != 1), len(bias_shape)) // 2:]
    query = torch.randn(*batch, seq_q, head_dim, device=device).to(dtype)
    key, value = (torch.randn(*batch, seq_k, head_dim, device=device).to(dtype) for _ in range(2))
    bias = torch.randn(bias_shape, device=device, dtype=bias_dtype or dtype, requires_grad=True)
    kwargs = {"attn_bias": bias}
    if mask == "bool":
        kwargs["attn_mask"] = keep_first_key(torch.rand(scores, device=device) > 0.4)
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(scores[-3:], device=device)
    check(backend, query, key, value, dtype, **kwargs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_what_only_sdpa_serves_goes_to_torch_under_auto_and_is_refused_when_forced(backend):
    device = device_for(backend)
    q = torch.randn(1, 2, 4, 8, device=device)
    for kwargs, inputs in (
        ({"dropout_p": 0.5}, (q, q, q)),
        ({}, (torch.randn(1, 2, 4, 300, device=device),) * 3),
    ):
        vkernels.attention(*inputs, **kwargs)  # auto: stock SDPA
        with pytest.raises(vkernels.BackendUnavailableError):
            vkernels.attention(*inputs, **kwargs, backend=backend)


BAD_CALLS = {
    "mismatched batch": lambda q: (q, q.repeat(2, 1, 1, 1)[:3], q),
    "mismatched heads": lambda q: (q, q[:, :2], q[:, :2]),
    "key and value lengths differ": lambda q: (q, q, q[:, :, :3]),
    "head dims differ": lambda q: (q, q[..., :4], q),
    "mask does not broadcast": lambda q: (q, q, q, torch.ones(4, 5, dtype=torch.bool, device=q.device)),
    "integer mask": lambda q: (q, q, q, torch.ones(4, 4, dtype=torch.int32, device=q.device)),
    "one-dimensional query": lambda q: (q[0, 0, 0], q, q),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("make", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_a_clear_error(backend, make):
    args = make(torch.randn(2, 3, 4, 8, device=device_for(backend)))
    with pytest.raises(RuntimeError, match="attention"):
        vkernels.attention(*args, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mask_and_is_causal_together_raise_like_sdpa(backend):
    q = torch.randn(1, 1, 3, 8, device=device_for(backend))
    with pytest.raises(RuntimeError, match="is_causal"):
        vkernels.attention(q, q, q, torch.ones(3, 3, dtype=torch.bool), is_causal=True, backend=backend)


@pytest.mark.cuda
def test_cuda_kernels_take_head_dims_that_are_multiples_of_8():
    """The CUDA kernels' limit, the same emulated as on a GPU: the public function refuses the
    backend, and the op itself (its C++ check) raises."""
    q = torch.randn(1, 2, 5, 12, device=device_for("cuda"))
    with pytest.raises(vkernels.BackendUnavailableError, match="multiples of 8"):
        vkernels.attention(q, q, q, backend="cuda")
    with pytest.raises(RuntimeError, match="multiples of 8"):
        torch.ops.vkernels.attention_cuda(q, q, q, None, None, False, 0.3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    q, k, v = (torch.randn(1, 2, n, 16, device=device, requires_grad=True) for n in (5, 7, 7))
    op = getattr(torch.ops.vkernels, f"attention_{backend}").default
    torch.library.opcheck(op, (q, k, v, None, None, True, 0.25))
    # 5-D windows (B0 images, B1 windows, H heads): a per-window bool mask and a per-head learned bias
    q, k, v = (torch.randn(2, 2, 2, 5, 8, device=device, requires_grad=True) for _ in range(3))
    mask = torch.rand(1, 2, 1, 5, 5, device=device) > 0.2
    bias = torch.randn(1, 1, 2, 5, 5, device=device, requires_grad=True)
    torch.library.opcheck(op, (q, k, v, mask, bias, False, 0.25))
    out = vkernels.attention(q[0], k[0], v[0], attn_bias=bias[0], backend=backend)
    assert out.transpose(-3, -2).is_contiguous()  # laid out (B, L, H, E): a ViT's (B, L, H * E) view is free


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_autocast_runs_the_kernel_in_the_autocast_dtype_like_sdpa(backend):
    device = device_for(backend)
    q, k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(3))
    with torch.autocast(device.type, dtype=torch.float16):
        ours = vkernels.attention(q, k, v, backend=backend)
        stock = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == stock.dtype == torch.float16
    # against float64 on the operands autocast rounds to fp16; the probabilities are rounded to fp16
    # before P @ V too, and summed in float32
    assert_as_accurate(ours, stock, reference(q.half(), k.half(), v.half()), rounding_floor(torch.float16, 2))
