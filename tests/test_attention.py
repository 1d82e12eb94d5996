"""vkernels.attention: SDPA's arguments and results through the public function and its ops."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import vkernels
from support import CPU_DTYPES, DTYPES, GPU, KERNEL_BACKENDS, device_for, relative_error, tolerance


def reference(query, key, value, attn_mask=None, is_causal=False, scale=None):
    return F.scaled_dot_product_attention(
        query.double(), key.double(), value.double(),
        attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double(),
        is_causal=is_causal, scale=scale,
    )


def check(backend, query, key, value, dtype, **kwargs):
    leaves = [t.detach().requires_grad_() for t in (query, key, value)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (query, key, value)]
    out = vkernels.attention(*leaves, **kwargs, backend=backend)
    expected = reference(*ref_leaves, **kwargs)
    assert out.dtype == dtype and out.shape == expected.shape
    assert relative_error(out, expected) < tolerance(dtype)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert relative_error(leaf.grad, ref_leaf.grad, floor=1.0) < tolerance(dtype) * 2


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES + ((torch.bfloat16,) if GPU else ()))
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
    dtype=st.sampled_from(DTYPES),
)
def test_attention_shape_fuzz(backend, batch_heads, lengths, head_dims, mask, dtype):
    """Random lengths, head dims (value's may differ), masks and causality against float64 SDPA.
    Every query row keeps key 0, so no row is fully masked (where SDPA itself gives NaN)."""
    device = device_for(backend)
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


def test_what_only_sdpa_serves_goes_to_torch_under_auto_and_is_refused_when_forced():
    device = device_for("triton")
    q = torch.randn(1, 2, 4, 8, device=device)
    for kwargs, inputs in (
        ({"dropout_p": 0.5}, (q, q, q)),
        ({}, (torch.randn(1, 2, 4, 300, device=device),) * 3),
        ({"attn_mask": torch.zeros(4, 4, device=device, requires_grad=True)}, (q, q, q)),
    ):
        vkernels.attention(*inputs, **kwargs)  # auto: stock SDPA
        with pytest.raises(vkernels.BackendUnavailableError):
            vkernels.attention(*inputs, **kwargs, backend="triton")


BAD_CALLS = {
    "mismatched batch": lambda q: (q, q.repeat(2, 1, 1, 1)[:3], q),
    "mismatched heads": lambda q: (q, q[:, :2], q[:, :2]),
    "key and value lengths differ": lambda q: (q, q, q[:, :, :3]),
    "head dims differ": lambda q: (q, q[..., :4], q),
    "mask does not broadcast": lambda q: (q, q, q, torch.ones(4, 5, dtype=torch.bool, device=q.device)),
    "integer mask": lambda q: (q, q, q, torch.ones(4, 4, dtype=torch.int32, device=q.device)),
    "one-dimensional query": lambda q: (q[0, 0, 0], q, q),
}


@pytest.mark.parametrize("make", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_a_clear_error(make):
    args = make(torch.randn(2, 3, 4, 8, device=device_for("triton")))
    with pytest.raises(RuntimeError, match="attention"):
        vkernels.attention(*args, backend="triton")


def test_mask_and_is_causal_together_raise_like_sdpa():
    q = torch.randn(1, 1, 3, 8, device=device_for("triton"))
    with pytest.raises(RuntimeError, match="is_causal"):
        vkernels.attention(q, q, q, torch.ones(3, 3, dtype=torch.bool), is_causal=True, backend="triton")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    q, k, v = (torch.randn(1, 2, n, 16, device=device, requires_grad=True) for n in (5, 7, 7))
    mask = (torch.rand(1, 1, 1, 7, device=device) > 0.2).expand(1, 2, 5, 7)
    op = getattr(torch.ops.vkernels, f"attention_{backend}").default
    torch.library.opcheck(op, (q, k, v, None, True, 0.25))
    torch.library.opcheck(op, (q, k, v, mask, False, 0.25))


def test_autocast_runs_the_kernel_in_the_autocast_dtype_like_sdpa():
    device = device_for("triton")
    q, k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(3))
    with torch.autocast(device.type, dtype=torch.float16):
        ours = vkernels.attention(q, k, v, backend="triton")
        expected = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == expected.dtype == torch.float16
    assert relative_error(ours, expected) < tolerance(torch.float16)
