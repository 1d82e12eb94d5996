"""vkernels: fused Triton and CUDA C++ kernels for vision models, as drop-ins for torch.nn.functional.

Every public function takes torch's arguments plus ``backend=`` (``"triton"``, ``"cuda"``,
``"torch"`` or ``"auto"``); see :mod:`vkernels.dispatch` for how a backend is chosen.
"""
from vkernels.dispatch import BackendUnavailableError, backends, use_backend
from vkernels.ops.attention import attention, varlen_attention
from vkernels.ops.conv import conv2d, conv2d_relu, conv2d_relu_maxpool2d
from vkernels.ops.pooling import adaptive_avg_pool2d, avg_pool2d, max_pool2d
from vkernels import nn
from vkernels.patch import patch
from vkernels.rotary import rotary_tables

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "adaptive_avg_pool2d",
    "attention",
    "avg_pool2d",
    "backends",
    "conv2d",
    "conv2d_relu",
    "conv2d_relu_maxpool2d",
    "max_pool2d",
    "nn",
    "patch",
    "rotary_tables",
    "use_backend",
    "varlen_attention",
]
