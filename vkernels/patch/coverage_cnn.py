"""How much of each CNN of the torchvision and timm zoos ``vkernels.patch`` moves onto vkernels ops.

    python -m vkernels.patch.coverage_cnn [--only REGEX] [--size N] [--max-params M] [--backend B]

Per model (random weights, BatchNorm statistics and affine parameters randomized so folding them
matters), in eval and in train mode:

- coverage: the share of conv FLOPs and of conv calls of one forward that run through vkernels ops
  after ``patch()``, and the share of conv FLOPs whose activation or residual add runs in the conv's
  epilogue (a BN folded into a conv without either does not show there). Counted on fake tensors
  (no memory, no arithmetic) with the Triton backend, so every model of the zoo is counted, the
  largest included;
- accuracy, on real tensors at ``--size`` (batch 2, float32): the relative error of the patched
  model's output (eval) and of all its parameter gradients of ``logits.square().mean()`` (train,
  dropout-like modules in eval mode so that both runs draw nothing) against the stock model in
  float64, beside the stock float32 model's own error against float64. Skipped for models over
  ``--max-params`` million parameters (a float64 copy on the CPU). Without a GPU the patched model
  runs on the ``torch`` backend: this checks the rewrites (chains, folding, residuals), the kernels
  have their own tests; pass ``--backend triton`` on a GPU.

Prints a markdown table (README.md shows one); a model under 90% of the conv FLOPs in eval mode gets
the reason from patch's report.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import vkernels
from vkernels.patch.conv import is_drop

_TORCHVISION = [
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)), "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2", *(f"vgg{d}_bn" for d in (11, 13, 16, 19)), "alexnet",
    *(f"regnet_x_{s}" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")),
    *(f"regnet_y_{s}" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")),
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", *(f"efficientnet_b{i}" for i in range(8)),
    *(f"efficientnet_v2_{s}" for s in "sml"), *(f"mnasnet{s}" for s in ("0_5", "0_75", "1_0", "1_3")),
    *(f"shufflenet_v2_x{s}" for s in ("0_5", "1_0", "1_5", "2_0")), "squeezenet1_0", "squeezenet1_1", "googlenet",
    "inception_v3", *(f"densenet{d}" for d in (121, 161, 169, 201)),
    *(f"convnext_{s}" for s in ("tiny", "small", "base", "large")),
]
# one or two of each timm family the issue names
_TIMM = ["resnet50", "resnext50_32x4d", "regnetx_016", "regnety_016", "efficientnet_b0", "mobilenetv3_large_100",
         "convnext_tiny", "repvgg_a2"]


class Model(NamedTuple):
    name: str  # "torchvision resnet18"
    build: Callable[[], torch.nn.Module]
    min_size: int = 0  # smallest input side the model takes, where that is above the usual


# AlexNet's stem and pools need 63 pixels, Inception-v3's 75 (built without its auxiliary head, a
# train-mode classifier branch that needs 299)
_MIN_SIZES = {"alexnet": 64, "inception_v3": 75}


def zoo() -> list[Model]:
    import timm
    import torchvision

    def torchvision_model(name):
        extra = dict(init_weights=False) if name in ("googlenet", "inception_v3") else {}  # silences a FutureWarning
        if name == "inception_v3":
            extra["aux_logits"] = False
        return lambda: getattr(torchvision.models, name)(weights=None, **extra)

    models = [Model(f"torchvision {name}", torchvision_model(name), _MIN_SIZES.get(name, 0)) for name in _TORCHVISION]
    models += [Model(f"timm {name}", lambda name=name: timm.create_model(name, pretrained=False)) for name in _TIMM]
    return models


class ConvCount(TorchDispatchMode):
    """Conv FLOPs and calls of the ops a forward dispatches: aten convolutions (stock) and vkernels
    conv ops (with whether an activation or residual ran in their epilogue). Backward ops are not
    counted: coverage is per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stock = [0, 0]  # FLOPs, calls
        self.ours = [0, 0]
        self.epilogue_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if name == "aten::convolution":
            self._add(self.stock, out.shape, args[1].shape)
        elif name.startswith("vkernels::conv2d") and "backward" not in name:
            is_maxpool = "maxpool2d" in name
            out_shape = (*out[0].shape[:2], *args[7]) if is_maxpool else (out[0] if isinstance(out, tuple) else out).shape
            flops = self._add(self.ours, out_shape, args[1].shape)
            relu = name.startswith("vkernels::conv2d_relu")
            if relu or args[3] is not None or (len(args) > 9 and args[9] != "none"):
                self.epilogue_flops += flops
        return out

    @staticmethod
    def _add(total, out_shape, weight_shape) -> int:
        flops = 2 * torch.Size(out_shape).numel() * weight_shape[1] * weight_shape[2] * weight_shape[3]
        total[0] += flops
        total[1] += 1
        return flops


def _fake_copy(build, fake_mode) -> torch.nn.Module:
    """The model with every parameter and buffer a fake CPU tensor: built on the meta device (or, for
    constructors that read tensor values, on the CPU and dropped)."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # torchvision's RegNets compute their widths with tensors
        model = build()
    with fake_mode:
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                                  param.requires_grad)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    return model


class Coverage(NamedTuple):
    flops: float  # share of conv FLOPs through vkernels ops
    calls: float
    epilogue: float  # share of conv FLOPs with an activation or residual in the epilogue
    convs: int  # conv calls of one forward
    gflops: float  # conv GFLOPs of one forward at the counted size


def coverage(build, size: int, training: bool) -> tuple[Coverage, vkernels.patch.PatchReport]:
    """Conv coverage of one forward of the patched model (fake tensors, Triton backend)."""
    fake_mode = FakeTensorMode()
    model = _fake_copy(build, fake_mode).train(training)
    model, report = vkernels.patch(model, backend="triton", report=True)
    counter = ConvCount()
    with fake_mode, counter, torch.no_grad():
        model(torch.empty(2, 3, size, size))
    total_flops = counter.stock[0] + counter.ours[0]
    total_calls = counter.stock[1] + counter.ours[1]
    return Coverage(counter.ours[0] / total_flops, counter.ours[1] / total_calls, counter.epilogue_flops / total_flops,
                    total_calls, total_flops / 1e9), report


def _randomize_batch_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module.running_mean is not None:
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                if module.affine:
                    module.weight.normal_(1, 0.2)
                    module.bias.normal_(0, 0.2)


def _logits(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


class Accuracy(NamedTuple):
    eval_patched: float  # output vs stock float64
    eval_stock: float  # stock float32 output vs stock float64
    train_patched: float  # parameter gradients vs stock float64
    train_stock: float


def accuracy(build, size: int, backend: str, seed: int = 0) -> Accuracy:
    """Errors against the stock model in float64 (see the module docstring). One patched copy serves
    both modes (patch traces both); the float64 copy is gone before it is made."""
    torch.manual_seed(seed)
    stock = build()
    _randomize_batch_norms(stock)
    x = torch.randn(2, 3, size, size)

    def evaluate(model, dtype):
        with torch.no_grad():
            return _logits(model.eval()(x.to(dtype))).double()

    def gradients(model, dtype):  # after evaluate: train mode updates the BN statistics
        model.train()
        for module in model.modules():  # nothing random: both runs must draw the same nothing
            if is_drop(module):
                module.eval()
        _logits(model(x.to(dtype))).square().mean().backward()
        return torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])

    reference = copy.deepcopy(stock).double()
    out64, grads64 = evaluate(reference, torch.float64), gradients(reference, torch.float64)
    del reference
    patched = vkernels.patch(copy.deepcopy(stock), backend=backend)
    out32, out_patched = evaluate(stock, torch.float32), evaluate(patched, torch.float32)
    grads32, grads_patched = gradients(stock, torch.float32), gradients(patched, torch.float32)
    return Accuracy(_relative_error(out_patched, out64), _relative_error(out32, out64),
                    _relative_error(grads_patched, grads64), _relative_error(grads32, grads64))


def _reason(report) -> str:
    """Why convs were left, from patch's report: the distinct reasons, shortest first."""
    reasons = sorted({why for _, why in report.left}, key=len)
    return "; ".join(reasons) if reasons else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="regex over model names")
    parser.add_argument("--size", type=int, default=64, help="input height = width where the model allows (default 64)")
    parser.add_argument("--max-params", type=float, default=100, help="accuracy only below this many million parameters")
    parser.add_argument("--backend", default="torch" if not torch.cuda.is_available() else "triton",
                        help="backend of the patched model in the accuracy runs")
    args = parser.parse_args(argv)
    print("| model | conv calls | GFLOPs | eval: conv FLOPs / calls on vkernels | eval: FLOPs with epilogue "
          "| train: conv FLOPs / calls on vkernels | train: FLOPs with epilogue "
          "| eval output err (stock fp32) | train grad err (stock fp32) | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    started = time.time()
    for model in zoo():
        if not re.search(args.only, model.name):
            continue
        size = max(args.size, model.min_size)
        evaluated, report = coverage(model.build, size, training=False)
        trained, _ = coverage(model.build, size, training=True)
        params = sum(p.numel() for p in _fake_copy(model.build, FakeTensorMode()).parameters()) / 1e6
        if params <= args.max_params:
            errors = accuracy(model.build, size, args.backend)
            eval_error = f"{errors.eval_patched:.1e} ({errors.eval_stock:.1e})"
            train_error = f"{errors.train_patched:.1e} ({errors.train_stock:.1e})"
        else:
            eval_error = train_error = f"not run: {params:.0f}M parameters"
        note = _reason(report) if evaluated.flops < 0.9 else ""
        print(f"| {model.name} | {evaluated.convs} | {evaluated.gflops:.2f} | {evaluated.flops:.1%} / {evaluated.calls:.1%} "
              f"| {evaluated.epilogue:.1%} | {trained.flops:.1%} / {trained.calls:.1%} | {trained.epilogue:.1%} "
              f"| {eval_error} | {train_error} | {note} |", flush=True)
    print(f"\n{args.size}x{args.size} inputs (alexnet 64, inception_v3 75 at least), batch 2; accuracy on the "
          f"{args.backend!r} backend; {time.time() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # the counts need the Triton backend to take (fake) CPU tensors: its interpreter
    from vkernels.bench.__main__ import reexec_with_triton_interpreter_if_no_gpu

    reexec_with_triton_interpreter_if_no_gpu()
    sys.exit(main())
