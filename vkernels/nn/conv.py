"""Fused conv modules: ``Conv2dAct`` is a torch.nn.Conv2d whose forward also adds the bias (and an
optional residual) and applies an activation in the kernel's epilogue; ``Conv2dReLU`` is it with ReLU."""
from __future__ import annotations

import torch

from vkernels.nn._backend import _BackendChoice
from vkernels.ops.conv import ACTIVATIONS, conv2d


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


# torch.nn activation modules -> the activation the fused conv computes, given the module
ACTIVATION_MODULES = {
    torch.nn.ReLU: lambda m: ("relu", 0.0),
    torch.nn.ReLU6: lambda m: ("relu6", 0.0),
    torch.nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
    torch.nn.Hardswish: lambda m: ("hardswish", 0.0),
    torch.nn.SiLU: lambda m: ("silu", 0.0),
    torch.nn.GELU: lambda m: ("gelu" if m.approximate == "none" else "gelu_tanh", 0.0),
}


def activation_spec(act) -> tuple[str | None, float]:
    """(activation, negative_slope) of ``act``: None or ``nn.Identity`` (no activation), an activation
    name of ``vkernels.conv2d``, or a torch.nn activation module of ``ACTIVATION_MODULES`` (exact type)."""
    if act is None or type(act) is torch.nn.Identity:
        return None, 0.01
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected None or one of {list(ACTIVATIONS)}")
        return act, 0.01
    spec = ACTIVATION_MODULES.get(type(act))
    if spec is None:
        raise ValueError(f"{type(act).__name__} is not an activation vkernels.conv2d fuses; "
                         f"expected one of {[m.__name__ for m in ACTIVATION_MODULES]}")
    return spec(act)


class Conv2dAct(_BackendChoice, torch.nn.Conv2d):
    """``act(conv2d(input) + bias + residual)`` in one kernel (``vkernels.conv2d``); constructor,
    parameters and state_dict are ``torch.nn.Conv2d``'s, plus ``activation=`` (None or a name
    ``vkernels.conv2d`` takes), ``negative_slope=`` (leaky_relu's) and ``backend=``."""

    def __init__(self, *args, activation: str | None = None, negative_slope: float = 0.01,
                 backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, backend=backend, **kwargs)
        if self.padding_mode != "zeros":
            raise NotImplementedError(
                f"{type(self).__name__}: padding_mode={self.padding_mode!r} is not supported; the fused kernels pad with zeros only"
            )
        self.activation, _ = activation_spec(activation)
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv2d(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            activation=self.activation, residual=residual, negative_slope=self.negative_slope, backend=self.backend,
        )

    def extra_repr(self) -> str:
        fused = [] if self.bias is None else ["bias"]
        if self.activation is not None:
            fused.append(self.activation if self.activation != "leaky_relu" else f"leaky_relu({self.negative_slope})")
        return super().extra_repr() + (f", fused={'+'.join(fused)}" if fused else "")

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None = None, act=None, *,
                  backend: str | None = None):
        """A module computing ``act(bn(conv(x)))`` (without ``bn``: ``act(conv(x))``); ``act`` as
        :func:`activation_spec` reads it.

        ``bn`` must be in eval mode with running statistics; it is folded into the new module's
        weight and bias. ``conv``, ``bn`` and ``act`` are left unchanged.
        """
        activation, negative_slope = activation_spec(act)
        weight, bias = conv.weight, conv.bias
        if bn is not None:
            with torch.no_grad():
                weight, bias = fold_batch_norm(weight, bias, bn)
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype, backend=backend,
        )
        module.activation, module.negative_slope = activation, negative_slope
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        return module


class Conv2dReLU(Conv2dAct):
    """``relu(conv2d(input) + bias + residual)`` in one kernel; constructor, parameters and state_dict
    are ``torch.nn.Conv2d``'s, plus ``backend=``."""

    def __init__(self, *args, backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, activation="relu", backend=backend, **kwargs)

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None = None, *,
                  backend: str | None = None) -> "Conv2dReLU":
        """A ``Conv2dReLU`` computing ``relu(bn(conv(x)))`` (``relu(conv(x))`` without ``bn``).

        ``bn`` must be in eval mode with running statistics; it is folded into the new module's
        weight and bias. ``conv`` and ``bn`` are left unchanged.
        """
        return super().from_conv(conv, bn, "relu", backend=backend)
