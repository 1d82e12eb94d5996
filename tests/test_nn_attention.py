"""vkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict."""
import pytest
import torch

import vkernels
import vkernels.nn.attention as nn_attention
from support import device_for, relative_error

# torch's reference warns on a bool key_padding_mask with a float attn_mask; that mix is tested on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")

EMBED, HEADS, BATCH, QUERY_LEN, KEY_LEN = 16, 2, 2, 5, 7
TOL = 1e-5  # fp32 outputs and gradients against torch's module in float64


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach vkernels.attention (a fallback to torch's forward makes none)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return vkernels.attention(*args, **kwargs)

    monkeypatch.setattr(nn_attention, "attention", counted)
    return calls


def pair(device, batch_first, **kwargs):
    """Ours on the Triton backend (fp32) and torch's in float64, holding the same parameters."""
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first, **kwargs)
    ours = vkernels.nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first, backend="triton", **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours.to(device), theirs.to(device).double()


def key_padding_mask(kind, batch, device):
    """True/-inf = ignore. At least two keys are kept: no query row is fully masked, and the
    query gradient is not zero (a single key makes the output independent of the query)."""
    lengths = torch.randint(2, KEY_LEN + 1, (batch,), device=device)
    ignore = torch.arange(KEY_LEN, device=device) >= lengths[:, None]
    if kind == "bool":
        return ignore
    return torch.randn(batch, KEY_LEN, device=device).masked_fill(ignore, float("-inf"))


def attn_mask(kind, shape, device):
    """bool True = not allowed (torch MHA's convention) or additive float; column 0 always allowed."""
    forbid = torch.rand(shape, device=device) < 0.4
    forbid[..., 0] = False
    if kind == "bool":
        return forbid
    return torch.randn(shape, device=device).masked_fill(forbid, float("-inf"))


def compare(ours, theirs, names, leaves, **kwargs):
    """Forward, and gradients of the leaves and in_proj_weight, of ours against theirs (float64).
    ``names`` picks query, key and value among the leaves (the same leaf twice keeps ``is``)."""
    ref_leaves = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    args = [leaves[name] for name in names]
    ref_args = [ref_leaves[name] for name in names]
    ref_kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    kwargs.setdefault("need_weights", False)
    ref_kwargs.setdefault("need_weights", False)
    out, weights = ours(*args, **kwargs)
    expected, expected_weights = theirs(*ref_args, **ref_kwargs)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert relative_error(out, expected) < TOL
    if kwargs["need_weights"]:
        assert relative_error(weights, expected_weights) < TOL
    else:
        assert weights is None
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    for name, leaf in leaves.items():
        assert relative_error(leaf.grad, ref_leaves[name].grad) < TOL, name
    assert relative_error(ours.in_proj_weight.grad, theirs.in_proj_weight.grad) < TOL


def self_inputs(device, batch_first, length=QUERY_LEN):
    x = torch.randn((BATCH, length, EMBED) if batch_first else (length, BATCH, EMBED), device=device, requires_grad=True)
    return ["x", "x", "x"], {"x": x}


MASKS = [
    pytest.param({}, id="no-mask"),
    pytest.param({"kpm": "bool"}, id="kpm-bool"),
    pytest.param({"kpm": "float"}, id="kpm-float"),
    pytest.param({"attn": "bool", "attn_dim": 2}, id="attn-bool-2d"),
    pytest.param({"attn": "float", "attn_dim": 2}, id="attn-float-2d"),
    pytest.param({"attn": "bool", "attn_dim": 3}, id="attn-bool-3d"),
    pytest.param({"attn": "float", "attn_dim": 3}, id="attn-float-3d"),
    pytest.param({"kpm": "bool", "attn": "bool", "attn_dim": 2}, id="kpm-bool+attn-bool-2d"),
    pytest.param({"kpm": "bool", "attn": "float", "attn_dim": 3}, id="kpm-bool+attn-float-3d"),
    pytest.param({"kpm": "float", "attn": "float", "attn_dim": 2}, id="kpm-float+attn-float-2d"),
]


def mask_kwargs(spec, device, query_len, key_len, batch=BATCH):
    kwargs = {}
    if "kpm" in spec:
        kwargs["key_padding_mask"] = key_padding_mask(spec["kpm"], batch, device)
    if "attn" in spec:
        shape = (query_len, key_len) if spec["attn_dim"] == 2 else (batch * HEADS, query_len, key_len)
        kwargs["attn_mask"] = attn_mask(spec["attn"], shape, device)
    return kwargs


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("spec", MASKS)
def test_self_attention(batch_first, spec, kernel_calls):
    device = device_for("triton")
    ours, theirs = pair(device, batch_first)
    names, leaves = self_inputs(device, batch_first, KEY_LEN)
    compare(ours, theirs, names, leaves, **mask_kwargs(spec, device, KEY_LEN, KEY_LEN))
    assert kernel_calls == ["triton"]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("shared_kv", [True, False], ids=["key-is-value", "key-value-apart"])
@pytest.mark.parametrize("spec", [MASKS[0], MASKS[1], MASKS[6], MASKS[7]])
def test_cross_attention(batch_first, shared_kv, spec, kernel_calls):
    device = device_for("triton")
    ours, theirs = pair(device, batch_first)

    def sequence(length):
        shape = (BATCH, length, EMBED) if batch_first else (length, BATCH, EMBED)
        return torch.randn(shape, device=device, requires_grad=True)

    query, key = sequence(QUERY_LEN), sequence(KEY_LEN)
    value = key if shared_kv else sequence(KEY_LEN)
    leaves = {"query": query, "key": key, **({} if shared_kv else {"value": value})}
    names = ["query", "key", "key" if shared_kv else "value"]
    compare(ours, theirs, names, leaves, **mask_kwargs(spec, device, QUERY_LEN, KEY_LEN))
    assert kernel_calls == ["triton"]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["causal", "causal+kpm"])
def test_is_causal_with_causal_mask(batch_first, with_kpm, kernel_calls):
    """torch MHA takes is_causal as a hint about attn_mask: runs causal without a key-padding mask,
    merges the masks (not causal) with one."""
    device = device_for("triton")
    ours, theirs = pair(device, batch_first)
    names, leaves = self_inputs(device, batch_first, KEY_LEN)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(KEY_LEN, device=device)
    kwargs = {"attn_mask": causal, "is_causal": True}
    if with_kpm:
        kwargs["key_padding_mask"] = key_padding_mask("bool", BATCH, device)
    compare(ours, theirs, names, leaves, **kwargs)
    assert kernel_calls == ["triton"]


def test_is_causal_needs_attn_mask():
    device = device_for("triton")
    ours, _ = pair(device, True)
    x = torch.randn(BATCH, QUERY_LEN, EMBED, device=device)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, need_weights=False, is_causal=True)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("spec", [MASKS[0], MASKS[1], MASKS[6]])
def test_unbatched(batch_first, spec, kernel_calls):
    device = device_for("triton")
    ours, theirs = pair(device, batch_first)
    x = torch.randn(KEY_LEN, EMBED, device=device, requires_grad=True)
    kwargs = mask_kwargs(spec, device, KEY_LEN, KEY_LEN, batch=1)
    if "key_padding_mask" in kwargs:
        kwargs["key_padding_mask"] = kwargs["key_padding_mask"][0]
    compare(ours, theirs, ["x", "x", "x"], {"x": x}, **kwargs)
    assert kernel_calls == ["triton"]


def test_no_bias(kernel_calls):
    device = device_for("triton")
    ours, theirs = pair(device, True, bias=False)
    names, leaves = self_inputs(device, True, KEY_LEN)
    compare(ours, theirs, names, leaves, key_padding_mask=key_padding_mask("bool", BATCH, device))
    assert kernel_calls == ["triton"]


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_falls_back(average, kernel_calls):
    device = device_for("triton")
    ours, theirs = pair(device, True)
    names, leaves = self_inputs(device, True, KEY_LEN)
    compare(
        ours, theirs, names, leaves, need_weights=True, average_attn_weights=average,
        key_padding_mask=key_padding_mask("bool", BATCH, device),
    )
    assert kernel_calls == []


@pytest.mark.parametrize(
    "kwargs",
    [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 12, "vdim": 10}],
    ids=["add_bias_kv", "add_zero_attn", "kdim-vdim"],
)
def test_unsupported_configurations_fall_back(kwargs, kernel_calls):
    device = device_for("triton")
    ours, theirs = pair(device, True, **kwargs)
    query = torch.randn(BATCH, QUERY_LEN, EMBED, device=device)
    key = torch.randn(BATCH, KEY_LEN, kwargs.get("kdim", EMBED), device=device)
    value = torch.randn(BATCH, KEY_LEN, kwargs.get("vdim", EMBED), device=device)
    out, _ = ours(query, key, value, need_weights=False)
    expected, _ = theirs(query.double(), key.double(), value.double(), need_weights=False)
    assert relative_error(out, expected) < TOL
    assert kernel_calls == []


def test_dropout_runs_kernels_in_eval_and_falls_back_in_training(kernel_calls):
    device = device_for("triton")
    ours, theirs = pair(device, True, dropout=0.5)
    ours.eval(), theirs.eval()
    names, leaves = self_inputs(device, True)
    compare(ours, theirs, names, leaves)
    assert kernel_calls == ["triton"]
    ours.train()
    x = leaves["x"]
    ours(x, x, x, need_weights=False)
    assert kernel_calls == ["triton"]


@pytest.mark.parametrize("kwargs", [{}, {"bias": False, "add_bias_kv": True}, {"kdim": 12, "vdim": 10}], ids=str)
def test_state_dict_and_type(kwargs):
    ours = vkernels.nn.MultiheadAttention(EMBED, HEADS, backend="triton", **kwargs)
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, **kwargs)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert "backend='triton'" in repr(ours)
    assert repr(vkernels.nn.MultiheadAttention(EMBED, HEADS, **kwargs)) == repr(theirs)
