"""Fused conv modules: ``Conv2dReLU`` is a torch.nn.Conv2d whose forward also adds the bias (and an
optional residual) and applies ReLU in the kernel's epilogue."""
from __future__ import annotations

import torch

from vkernels.nn._backend import _BackendChoice
from vkernels.ops.conv import conv2d_relu


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: torch.nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one conv computing ``bn(conv(x))`` for an eval-mode ``bn``.

    ``bn(y) = (y - mean) * gamma / sqrt(var + eps) + beta`` is an affine map per output channel, so
    it scales the weight's rows and shifts the bias. Computed in float64 and cast back to the
    weight's dtype, so the fold itself adds no rounding beyond that one cast. Differentiable: a model
    folded on the fly still trains its conv and BN affine parameters (frozen-statistics fine-tuning).
    """
    if bn.training:
        raise ValueError("fold_batch_norm: BatchNorm is in training mode (it normalizes by batch statistics); call .eval() first")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batch_norm: BatchNorm has no running statistics (track_running_stats=False); nothing to fold")
    out_channels = weight.shape[0]
    if bn.num_features != out_channels:
        raise ValueError(f"fold_batch_norm: BatchNorm has {bn.num_features} features but the conv has {out_channels} output channels")
    f64 = dict(dtype=torch.float64, device=weight.device)
    scale = (bn.running_var.to(**f64) + bn.eps).rsqrt()
    shift = -bn.running_mean.to(**f64) if bias is None else bias.to(**f64) - bn.running_mean.to(**f64)
    if bn.affine:
        scale = scale * bn.weight.to(**f64)
    shift = shift * scale
    if bn.affine:
        shift = shift + bn.bias.to(**f64)
    folded_weight = weight.to(**f64) * scale.view(-1, *([1] * (weight.dim() - 1)))
    return folded_weight.to(weight.dtype), shift.to(weight.dtype)


class Conv2dReLU(_BackendChoice, torch.nn.Conv2d):
    """``relu(conv2d(input) + bias + residual)`` in one kernel; constructor, parameters and state_dict
    are ``torch.nn.Conv2d``'s, plus ``backend=``."""

    def __init__(self, *args, backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)
        if self.padding_mode != "zeros":
            raise NotImplementedError(
                f"Conv2dReLU: padding_mode={self.padding_mode!r} is not supported; the fused kernels pad with zeros only"
            )

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv2d_relu(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            residual=residual, backend=self.backend,
        )

    def extra_repr(self) -> str:
        fused = "relu" if self.bias is None else "bias+relu"
        return f"{super().extra_repr()}, fused={fused}"

    @classmethod
    def from_conv(
        cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None = None, *, backend: str | None = None
    ) -> "Conv2dReLU":
        """A ``Conv2dReLU`` computing ``relu(bn(conv(x)))`` (``relu(conv(x))`` without ``bn``).

        ``bn`` must be in eval mode with running statistics; it is folded into the new module's
        weight and bias. ``conv`` and ``bn`` are left unchanged.
        """
        weight, bias = conv.weight, conv.bias
        if bn is not None:
            with torch.no_grad():
                weight, bias = fold_batch_norm(weight, bias, bn)
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype, backend=backend,
        )
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        return module
