"""Pooling modules: subclasses of torch.nn's, so isinstance checks, state and repr carry over."""
from __future__ import annotations

import torch

from vkernels.nn._backend import _BackendChoice
from vkernels.ops.pooling import adaptive_avg_pool2d, avg_pool2d, max_pool2d


class MaxPool2d(_BackendChoice, torch.nn.MaxPool2d):
    def forward(self, input: torch.Tensor):
        return max_pool2d(
            input, self.kernel_size, self.stride, self.padding, self.dilation,
            ceil_mode=self.ceil_mode, return_indices=self.return_indices, backend=self.backend,
        )


class AvgPool2d(_BackendChoice, torch.nn.AvgPool2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return avg_pool2d(
            input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
            self.count_include_pad, self.divisor_override, backend=self.backend,
        )


class AdaptiveAvgPool2d(_BackendChoice, torch.nn.AdaptiveAvgPool2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool2d(input, self.output_size, backend=self.backend)
