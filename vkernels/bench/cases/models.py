"""Whole models: inference throughput and training steps of ResNet-50, MobileNetV3-Large and
EfficientNet-B0 (torchvision, channels_last), ViT-B/16 at 224 (timm) and CLIP ViT-B/32, both towers
(open_clip; our models.multimodal.CLIP at the same size when open_clip is missing), and the seeds'
SoundImageFusion and Detector (models/, at the sizes the training example uses), batch 128 under
bf16 autocast on CUDA; one tiny fp32 model per family on CPU, inference only.

``pytorch`` is the stock model in eager mode, ``torch.compile`` the stock model compiled (its own
copy), ``vk.<backend>`` a deep copy rewritten by ``vkernels.patch(model, backend=...)`` (our own
models are not patched: they already call vkernels, so they get ``model.backend = ...``). Inference
runs in eval mode under ``torch.no_grad``, where patch folds the CNNs' BatchNorms into their convs;
training runs in train mode, where patch makes only the exact rewrites (convs and their activations
without BN, pooling, attention).

A training step is forward, loss, backward and an SGD (momentum 0.9) step with **lr = 0**: every
kernel of the step runs (the momentum and parameter updates included) but the weights stay put, so
every call starts from the same model and the outputs (logits, loss) of any call can be checked
against stock. In train mode BatchNorm normalizes by batch statistics, so its running statistics
changing does not change the outputs either.

torchvision, timm and open_clip are optional: a missing one skips its model's cases, with the reason.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import vkernels
from vkernels.bench.case import BASELINE, DTYPE_NAMES, Case, Inputs, Outputs, compiled, dtype_name, tolerance

CUDA_BATCH = 128
CPU_BATCH = 2
# Logits at the end of 12-50 layers, each rounding to bf16 in its own order: a few roundings more
# than one op's tolerance.
CUDA_TOLERANCE = 2 * tolerance(torch.bfloat16)


class Model(NamedTuple):
    label: str  # "ResNet-50 (torchvision) 224x224"
    build: Callable[[], nn.Module]  # a fresh randomly initialised fp32 model on the CPU
    make_inputs: Callable[[int, torch.device], Inputs]  # batch, device -> images (+ tokens) and labels
    logits: Callable[[nn.Module, Inputs], torch.Tensor]
    loss: Callable[[torch.Tensor, Inputs], torch.Tensor]
    channels_last: bool = False
    patchable: bool = True  # False: vk.<backend> sets model.backend instead of vkernels.patch


def _images(size: int, classes: int, channels_last: bool):
    def make(batch: int, device: torch.device) -> Inputs:
        images = torch.randn(batch, 3, size, size, device=device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return {"images": images, "labels": torch.randint(0, classes, (batch,), device=device)}

    return make


def _images_and_text(size: int, vocab_size: int, context_length: int):
    def make(batch: int, device: torch.device) -> Inputs:
        # Random ids: the text towers pool at argmax(id), wherever that falls.
        tokens = torch.randint(0, vocab_size, (batch, context_length), device=device)
        return {"images": torch.randn(batch, 3, size, size, device=device), "tokens": tokens}

    return make


def _classify(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(inputs["images"])


def _cross_entropy(logits: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return F.cross_entropy(logits.float(), inputs["labels"])


def _open_clip_logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    image = F.normalize(model.encode_image(inputs["images"]), dim=-1)
    text = F.normalize(model.encode_text(inputs["tokens"]), dim=-1)
    return model.logit_scale.exp() * image @ text.t()


def _our_clip_logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(inputs["images"], inputs["tokens"])[0]


def _contrastive(logits: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    labels = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _optional(module: str):
    """The module, or the reason it cannot be imported."""
    try:
        return importlib.import_module(module), None
    except Exception as error:  # ImportError, or a broken install: skip, never break the harness
        return None, f"{module} is not importable ({type(error).__name__}: {error})"


def _our_module(name: str):
    """vkernels.models.<name>, or models/<name>.py when the package is not installed."""
    for package in ("vkernels.models", "models"):
        module, _ = _optional(f"{package}.{name}")
        if module is not None:
            return module
    raise ImportError("neither vkernels.models nor models/ is importable")


def _sounds_and_images(samples: int, size: int, classes: int):
    def make(batch: int, device: torch.device) -> Inputs:
        return {"audio": torch.randn(batch, samples, device=device),
                "images": torch.randn(batch, 3, size, size, device=device),
                "labels": torch.randint(0, classes, (batch,), device=device)}

    return make


def _fused_logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(inputs["audio"], inputs["images"])


def _scenes(size: int):
    def make(batch: int, device: torch.device) -> Inputs:
        return {"images": torch.rand(batch, 1, size, size, device=device)}

    return make


def _detector_outputs(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    class_logits, boxes = model(inputs["images"])
    return torch.cat([class_logits, boxes], dim=-1)


def _on_stock_pytorch(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build`` with backend "torch": the baseline must not follow ``auto`` to a kernel."""

    def stock() -> nn.Module:
        module = build()
        module.backend = "torch"
        return module

    return stock


def _mean_square(outputs: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """The detector's stand-in loss: its backward runs the same kernels as the detection loss, whose
    target assignment would add host work unrelated to vkernels."""
    return outputs.float().square().mean()


_CNN_LABELS = {"resnet50": "ResNet-50", "resnet18": "ResNet-18", "mobilenet_v3_large": "MobileNetV3-Large",
               "efficientnet_b0": "EfficientNet-B0"}


def _models(on_gpu: bool) -> list[Model | tuple[str, str]]:
    """The model families for this device; a family whose library is missing is (label, reason)."""
    found: list[Model | tuple[str, str]] = []

    torchvision, reason = _optional("torchvision")
    if torchvision is None:
        found.append(("CNNs (torchvision)", reason))
    else:
        # ResNet-18 stands in for ResNet-50 on CPU; the mobile nets are small enough to keep
        cnns = (["resnet50", "mobilenet_v3_large", "efficientnet_b0"] if on_gpu
                else ["resnet18", "mobilenet_v3_large", "efficientnet_b0"])
        size, classes = (224, 1000) if on_gpu else (32, 10)
        for name in cnns:
            label = f"{_CNN_LABELS[name]} (torchvision) {size}x{size}"
            build = functools.partial(getattr(torchvision.models, name), weights=None, num_classes=classes)
            found.append(Model(label, build, _images(size, classes, True), _classify, _cross_entropy, channels_last=True))

    timm, reason = _optional("timm")
    if timm is None:
        found.append(("ViT (timm)", reason))
    elif on_gpu:
        found.append(Model("ViT-B/16 (timm) 224x224", lambda: timm.create_model("vit_base_patch16_224", pretrained=False),
                           _images(224, 1000, False), _classify, _cross_entropy))
    else:
        from timm.models.vision_transformer import VisionTransformer

        found.append(Model("ViT tiny 2x64/8 (timm) 32x32",
                           lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10),
                           _images(32, 10, False), _classify, _cross_entropy))

    open_clip, reason = _optional("open_clip")
    if open_clip is not None:
        if on_gpu:
            build = lambda: open_clip.create_model("ViT-B-32", pretrained=None)  # noqa: E731
            found.append(Model("CLIP ViT-B/32 (open_clip) 224x224 ctx77", build, _images_and_text(224, 49408, 77),
                               _open_clip_logits, _contrastive))
        else:
            build = lambda: open_clip.model.CLIP(  # noqa: E731
                embed_dim=32,
                vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2))
            found.append(Model("CLIP tiny (open_clip) 32x32 ctx16", build, _images_and_text(32, 100, 16),
                               _open_clip_logits, _contrastive))
    else:  # our CLIP at the same size; the name says so
        clip = _our_module("multimodal").CLIP
        if on_gpu:
            build = lambda: clip(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_depth=12,  # noqa: E731
                                 vision_heads=12, vocab_size=49408, context_length=77, text_width=512, text_depth=12,
                                 text_heads=8, backend="torch")
            label, size, vocab, context = "CLIP ViT-B/32-like (models.multimodal, no open_clip) 224x224 ctx77", 224, 49408, 77
        else:
            build = lambda: clip(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_depth=2,  # noqa: E731
                                 vision_heads=2, vocab_size=100, context_length=16, text_width=64, text_depth=2,
                                 text_heads=2, backend="torch")
            label, size, vocab, context = "CLIP tiny (models.multimodal, no open_clip) 32x32 ctx16", 32, 100, 16
        found.append(Model(label, build, _images_and_text(size, vocab, context), _our_clip_logits, _contrastive,
                           patchable=False))

    # The seeds' sound-image fusion and detector (models/): on GPUs at the sizes the example trains
    # (train_digits.TASKS), on CPU tiny (their convs cost seconds per call in the Triton interpreter).
    if on_gpu:
        tasks, clip_samples = _our_module("train_digits").TASKS, _our_module("datasets").CLIP_SAMPLES
        fusion, detector = tasks["fusion"].build, tasks["detector"].build
        fusion_label = f"SoundImageFusion (train_digits) {clip_samples}-sample clips + 32x32"
        fusion_inputs, scene_size = _sounds_and_images(clip_samples, 32, 10), 64
    else:
        audio, cnn, sound_image = _our_module("audio"), _our_module("cnn"), _our_module("sound_image")
        fusion = lambda: sound_image.SoundImageFusion(  # noqa: E731
            10, audio.SpectrogramCNN(10, (8, 16), n_fft=128, hop_length=64, n_mels=16),
            cnn.SeedCNN(10, channels=(8, 16, 16), hidden=32, image_size=18), dim=32, num_heads=2, depth=1)
        fusion_label = "SoundImageFusion tiny 1024-sample clips + 18x18"
        fusion_inputs, scene_size = _sounds_and_images(1024, 18, 10), 16
        detector = lambda: _our_module("detection").Detector(10, channels=(8, 16, 16), head_depth=1)  # noqa: E731
    found.append(Model(fusion_label, _on_stock_pytorch(fusion), fusion_inputs, _fused_logits, _cross_entropy,
                       patchable=False))
    found.append(Model(f"Detector (FCOS-style) {scene_size}x{scene_size}", _on_stock_pytorch(detector),
                       _scenes(scene_size), _detector_outputs, _mean_square, patchable=False))
    return found


def cases(device: torch.device, max_autotune: bool) -> list[Case]:
    on_gpu = device.type == "cuda"
    found, result = _models(on_gpu), []
    for model in found:
        if not isinstance(model, Model):  # (label, reason): its library is missing: one placeholder case says why
            label, reason = model
            result.append(_missing_case(label, reason, device))
            continue
        for direction in (("inference", "train step") if on_gpu else ("inference",)):
            result.append(model_case(model, device, direction))
    return result


def _missing_case(label: str, reason: str, device: torch.device) -> Case:
    # The baseline must run (it is the reference): an empty output, nothing timed that matters.
    return Case(
        name=f"model {label} skipped", family="models", direction="fwd",
        make_inputs=lambda: {"x": torch.zeros(1, device=device)},
        impls={BASELINE: lambda inputs: inputs["x"]},
        skipped={"vk.*": reason, "torch.compile": reason},
    )


def model_case(model: Model, device: torch.device, direction: str) -> Case:
    on_gpu = device.type == "cuda"
    training = direction == "train step"
    batch = CUDA_BATCH if on_gpu else CPU_BATCH
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext

    @functools.cache
    def stock() -> nn.Module:
        """Built on first use, not when the harness collects cases: every case's models would
        otherwise sit in device memory at once."""
        torch.manual_seed(0)
        module = model.build().to(device)
        if model.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module.train(training)

    def copy_of_stock() -> nn.Module:
        return copy.deepcopy(stock())

    def patched(backend: str) -> nn.Module:
        module = copy_of_stock()
        if model.patchable:
            return vkernels.patch(module, backend=backend)
        module.backend = backend
        return module

    def runner(make_module: Callable[[], nn.Module], compile_it: bool = False) -> Callable[[Inputs], Outputs]:
        made: dict[str, object] = {}

        def setup():
            module = make_module()
            logits = functools.partial(model.logits, module)
            made["logits"] = compiled(logits) if compile_it else logits
            if training:  # lr = 0: the update runs, the weights do not move (see the module docstring)
                made["optimizer"] = torch.optim.SGD(module.parameters(), lr=0.0, momentum=0.9)

        def infer(inputs: Inputs) -> Outputs:
            if not made:
                setup()
            with torch.no_grad(), autocast():
                return made["logits"](inputs).float()

        def train_step(inputs: Inputs) -> Outputs:
            if not made:
                setup()
            optimizer = made["optimizer"]
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = made["logits"](inputs)
                loss = model.loss(logits, inputs)
            loss.backward()
            optimizer.step()
            return logits.detach().float(), loss.detach()

        return train_step if training else infer

    # The baseline's own model for the output check, a copy for each other implementation: a
    # compiled or patched module must not share the stock module object.
    impls = {BASELINE: runner(stock)}
    skipped = {}
    if on_gpu:
        impls["torch.compile"] = runner(copy_of_stock, compile_it=True)
    else:
        skipped["torch.compile"] = "timed on GPUs only (Inductor compiles for minutes on a CPU)"
    for backend, status in vkernels.backends().items():
        name = f"vk.{backend}"
        if not status.available:
            skipped[name] = status.reason
        elif not on_gpu and backend == "triton" and model.channels_last:
            # Measured: ~190 s for one ResNet-18 forward at 16x16, batch 1, in the Triton interpreter.
            skipped[name] = "a CNN's convs take minutes per forward in the Triton interpreter: timed on GPUs only"
        else:
            impls[name] = runner(functools.partial(patched, backend))

    dtype = "bf16 autocast" if on_gpu else DTYPE_NAMES[torch.float32]
    layout = " channels_last" if model.channels_last else ""
    return Case(
        name=f"model {model.label} B{batch} {dtype}{layout} {direction}",
        family="models",
        direction="fwd+bwd" if training else "fwd",
        make_inputs=lambda: model.make_inputs(batch, device),
        impls=impls,
        skipped=skipped,
        tolerance=CUDA_TOLERANCE if on_gpu else tolerance(torch.float32),
        items=batch,
        dtype=dtype_name(torch.bfloat16 if on_gpu else torch.float32),  # what autocast computes in
    )
