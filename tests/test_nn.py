"""vkernels.nn modules are drop-ins for torch.nn's: same arguments, repr, state and results."""
import pytest
import torch

import vkernels
from support import device_for, relative_error, tolerance

MODULES = [
    ("MaxPool2d", (3,), {"stride": 2, "padding": 1}),
    ("MaxPool2d", ((2, 3),), {"dilation": 2, "ceil_mode": True}),
    ("AvgPool2d", (3,), {"stride": 1, "padding": 1, "count_include_pad": False}),
    ("AvgPool2d", (2,), {"divisor_override": 3}),
    ("AdaptiveAvgPool2d", ((1, 1),), {}),
    ("AdaptiveAvgPool2d", ((None, 3),), {}),
]


@pytest.mark.parametrize("name,args,kwargs", MODULES)
def test_module_is_a_drop_in(name, args, kwargs):
    device = device_for("triton")
    ours = getattr(vkernels.nn, name)(*args, **kwargs)
    theirs = getattr(torch.nn, name)(*args, **kwargs)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, type(theirs))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert "backend='triton'" in repr(getattr(vkernels.nn, name)(*args, backend="triton", **kwargs))

    x = torch.randn(2, 3, 9, 8, device=device)
    with vkernels.use_backend("triton"):  # backend=None defers to the innermost use_backend
        out = ours(x)
    assert relative_error(out, theirs(x.double())) < tolerance(torch.float32)  # against float64
