"""Drop-in modules: torch.nn's constructors and state, forward through vkernels ops."""
from vkernels.nn.attention import MultiheadAttention
from vkernels.nn.conv import Conv2dAct, Conv2dReLU
from vkernels.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d

__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "Conv2dAct", "Conv2dReLU", "MaxPool2d", "MultiheadAttention"]
