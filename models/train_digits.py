"""Train the seeds' CNN, a small ViT and a CLIP-style model on real images: scikit-learn's bundled
8×8 digits (no download), upsampled to 32×32 RGB.

    python -m vkernels.models.train_digits [--model cnn|vit|clip|all] [--epochs N] [--backend B]
                                           [--out DIR] [--device D] [--max-steps N]

Each model trains twice from the same seed (same initial weights, batch order and augmentation):
once on stock layers (``backend="torch"``) and once through vkernels (``--backend``, default
``auto``). It prints the test accuracy of both runs (zero-shot from text prompts for CLIP), which
backend each vkernels op family really ran, and writes ``<model>_loss.png`` (both loss curves) and
``results.json`` into ``--out``. Without a GPU, ``auto`` is stock PyTorch, so the two runs coincide;
``--backend triton`` runs the Triton kernels through Triton's (slow) interpreter instead.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vkernels
from vkernels import dispatch

from .cnn import SeedCNN
from .multimodal import CLIP, DIGIT_NAMES, DigitTokenizer
from .vit import VisionTransformer

SEED = 0
IMAGE_SIZE = 32
TEMPLATES = (
    "a photo of the digit {}", "a picture of the number {}", "an image of the digit {}", "a handwritten {}",
    "a drawing of the number {}", "this is the digit {}", "a blurry photo of a {}", "a small handwritten digit {}",
)


# --- data ------------------------------------------------------------------------------------

@dataclass
class Digits:
    train_x: torch.Tensor  # (N, 3, 32, 32), normalized with the training set's mean and std
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits(device: torch.device | str = "cpu", test_size: float = 0.2, seed: int = SEED) -> Digits:
    """The 1797 digits, split stratified and seeded (80/20: 1437 train, 360 test), bilinearly
    upsampled from 8×8 (values 0..16) to 32×32, repeated to 3 channels."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    split = train_test_split(data.images, data.target, test_size=test_size, stratify=data.target, random_state=seed)
    images = [torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 16 for a in split[:2]]
    images = [F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) for x in images]
    mean, std = images[0].mean(), images[0].std()
    (train_x, test_x), (train_y, test_y) = [(x - mean) / std for x in images], split[2:]
    return Digits(*(torch.as_tensor(t).to(device) for t in (train_x, train_y, test_x, test_y)))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine warps (±10° rotation, ±10% scale, ±2 px shift), border-padded: 1437
    images are few for a ViT. Drawn from ``generator`` on the CPU so both runs see the same ones."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / IMAGE_SIZE)  # grid units: 2 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


# --- tasks: what differs between the models --------------------------------------------------

@dataclass
class Task:
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (B,) predicted classes
    families: tuple[str, ...]  # the vkernels op families the model calls
    target: float  # test accuracy the example must reach
    epochs: int
    lr: float
    weight_decay: float = 0.05
    batch_size: int = 64
    metric: str = "test accuracy"


def classification_loss(model, x, y, generator):
    return F.cross_entropy(model(x), y)


def classify(model, x):
    return model(x).argmax(dim=-1)


@lru_cache
def prompt_tokens(device: torch.device) -> torch.Tensor:
    """(10 classes, len(TEMPLATES), context) token ids of every prompt, e.g. "a photo of the digit seven"."""
    tokenizer = DigitTokenizer(context_length=12)
    return torch.stack([tokenizer([t.format(name) for t in TEMPLATES]) for name in DIGIT_NAMES]).to(device)


def clip_loss(model, images, labels, generator):
    """Symmetric contrastive loss between each image and a prompt of its class in a random template.
    A batch of 64 holds ~6 images per class, so all same-class pairs count as matches (uniform soft
    targets): treating them as negatives would push apart images and prompts that agree."""
    templates = torch.randint(len(TEMPLATES), (len(labels),), generator=generator).to(labels.device)
    tokens = prompt_tokens(labels.device)[labels, templates]
    logits = model(images, tokens)[0]
    match = (labels[:, None] == labels[None, :]).float()
    targets = match / match.sum(dim=1, keepdim=True)  # symmetric: rows of the transpose are the same
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def clip_zero_shot(model, images):
    """Zero-shot: the class whose prompts (all templates, embeddings averaged) match the image best."""
    classifier = model.zero_shot_classifier(prompt_tokens(images.device))
    return model.zero_shot_logits(images, classifier).argmax(dim=-1)


# Sizes and schedules measured on a 2-core CPU (backend torch): 5 s (CNN) to 2 min (CLIP) a run.
# CLIP sits at uniform logits for ~250 steps before it learns; at lr 2e-3 it stayed there.
TASKS = {
    "cnn": Task(SeedCNN, classification_loss, classify, ("conv2d_relu", "max_pool2d"),
                target=0.97, epochs=12, lr=2e-3, weight_decay=1e-4),
    "vit": Task(lambda: VisionTransformer(IMAGE_SIZE, 4, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
                classification_loss, classify, ("attention",), target=0.95, epochs=50, lr=2e-3),
    "clip": Task(lambda: CLIP(embed_dim=64, image_size=IMAGE_SIZE, patch_size=4, vision_width=64, vision_depth=4,
                              vision_heads=4, vocab_size=DigitTokenizer().vocab_size, context_length=12,
                              text_width=64, text_depth=2, text_heads=4),
                 clip_loss, clip_zero_shot, ("attention",), target=0.90, epochs=70, lr=1e-3,
                 metric="zero-shot test accuracy from prompts"),
}


# --- the one training loop -------------------------------------------------------------------

@torch.no_grad()
def accuracy(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum((task.predict(model, x[i:i + batch_size]) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train()
    return correct / len(x)


def train(model: nn.Module, task: Task, data: Digits, *, epochs: int, max_steps: int | None = None,
          seed: int = SEED, desc: str = "") -> tuple[list[float], float, float]:
    """AdamW (weight decay on matrices only) with linear warm-up then cosine decay, per step.
    Returns (loss per step, test accuracy, seconds). Every random draw (batch order, augmentation,
    prompt templates) comes from one generator seeded with ``seed``."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": task.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=task.lr)
    n = len(data.train_x)
    steps_per_epoch = n // task.batch_size  # whole batches only: the contrastive loss's floor depends on the batch size
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    with tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5) as bar:
        while len(losses) < total:
            order = torch.randperm(n, generator=generator).to(data.train_y.device)
            for i in range(0, steps_per_epoch * task.batch_size, task.batch_size):
                index = order[i:i + task.batch_size]
                loss = task.loss(model, augment(data.train_x[index], generator), data.train_y[index], generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update()
                if len(losses) == total:
                    break
    return losses, accuracy(model, task, data.test_x, data.test_y), time.perf_counter() - started


# --- which backend really runs ---------------------------------------------------------------

class _VkernelsOps(TorchDispatchMode):
    """Records the vkernels ops dispatched, e.g. {"attention_triton"}."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.name().split("::")
        if namespace == "vkernels":
            self.ops.add(name.split(".")[0])
        return func(*args, **(kwargs or {}))


def backends_used(model: nn.Module, task: Task, x: torch.Tensor) -> dict[str, str]:
    """Op family -> the backend its calls ran on in one prediction: a ``vkernels::<family>_<backend>``
    op when a kernel ran, else stock PyTorch (the torch backend calls torch functions directly)."""
    recorder = _VkernelsOps()
    with torch.no_grad(), recorder:
        task.predict(model, x)
    used = {}
    for family in task.families:
        kernels = [op.removeprefix(family + "_") for op in recorder.ops if op.startswith(family + "_")]
        used[family] = kernels[0] if kernels else "torch"
    return used


def describe_backend(requested: str, used: dict[str, str], device: torch.device) -> str:
    text = ", ".join(f"{family}: {backend}" for family, backend in used.items())
    if requested == "auto" and set(used.values()) == {"torch"}:
        why = ("no GPU here, and on CPU tensors auto always picks stock PyTorch" if device.type == "cpu"
               else "auto picks a kernel backend only once its tests passed on a GPU of this architecture: vkernels/verified.json")
        text += (f"  -> auto = stock PyTorch ({why}), so both runs compute the same thing. "
                 "--backend triton runs the Triton kernels (through the slow interpreter without a GPU).")
    elif "triton" in used.values() and dispatch.TRITON_INTERPRETED:
        text += "  (Triton kernels through the interpreter, TRITON_INTERPRET=1: correct but slow)"
    return text


# --- driver ----------------------------------------------------------------------------------

def plot_losses(name: str, task: Task, runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for (label, run), style in zip(runs.items(), ("-", "--")):
        axis.plot(range(1, len(run["losses"]) + 1), run["losses"], style, alpha=0.8,
                  label=f"{label}: backend {run['backend']} (ran {'/'.join(sorted(set(run['ops'].values())))}), {run['accuracy']:.1%}")
    axis.set(title=f"{name} on sklearn digits (32×32)", xlabel="step", ylabel="training loss", yscale="log")
    axis.legend(title=task.metric)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_model(name: str, data: Digits, args: argparse.Namespace, device: torch.device) -> dict:
    task = TASKS[name]
    torch.manual_seed(SEED)
    initial = task.build().to(device)
    epochs = args.epochs or task.epochs
    params = sum(p.numel() for p in initial.parameters())
    print(f"\n== {name}: {params / 1e3:.0f}k parameters, {epochs} epochs, batch {task.batch_size}, AdamW lr {task.lr}, "
          f"warm-up + cosine; target {task.metric} >= {task.target:.0%}")
    runs = {}
    for label, backend in (("stock", "torch"), ("vkernels", args.backend)):
        model = copy.deepcopy(initial)
        model.backend = backend
        used = backends_used(model, task, data.test_x[:2])
        print(f"   {label} run, backend={backend!r}: {describe_backend(backend, used, device)}")
        losses, acc, seconds = train(model, task, data, epochs=epochs, max_steps=args.max_steps, desc=f"{name} {label}")
        runs[label] = dict(backend=backend, ops=used, accuracy=acc, seconds=round(seconds, 1), steps=len(losses),
                           final_loss=losses[-1], losses=[round(loss, 5) for loss in losses])
        verdict = "meets" if acc >= task.target else "BELOW"
        print(f"   {label}: {task.metric} {acc:.2%} ({verdict} target {task.target:.0%}), "
              f"final loss {losses[-1]:.4f}, {len(losses)} steps in {seconds:.1f} s")
    plot_losses(name, task, runs, args.out / f"{name}_loss.png")
    return dict(metric=task.metric, target=task.target, epochs=epochs, parameters=params, runs=runs)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=(*TASKS, "all"), default="all")
    parser.add_argument("--epochs", type=int, default=None, help="override each model's default epochs")
    parser.add_argument("--backend", choices=(*dispatch.BACKENDS, "auto"), default="auto", help="the vkernels run's backend")
    parser.add_argument("--out", type=Path, default=Path("train-results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (smoke tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # keep our lines in order with tqdm's bars when piped
        sys.stdout.reconfigure(line_buffering=True)
    device = torch.device(args.device)
    if args.backend == "triton" and device.type == "cpu" and not dispatch.TRITON_INTERPRETED:
        # The interpreter must be switched on before triton is imported: start over with it.
        print("--backend triton on CPU: restarting with TRITON_INTERPRET=1. Triton's interpreter is slow: over a minute "
              "per ViT training step here, so pair it with --max-steps.", flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "vkernels.models.train_digits", *argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    print("vkernels backends here: " + "; ".join(f"{n}: {'available' if s.available else 'unavailable'} ({s.reason})"
                                                for n, s in vkernels.backends().items()))
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_digits(device)
    print(f"digits: {len(data.train_x)} train / {len(data.test_x)} test images, 8×8 upsampled to 32×32, "
          f"device {device}, {torch.get_num_threads()} threads")
    names = list(TASKS) if args.model == "all" else [args.model]
    results = {name: run_model(name, data, args, device) for name in names}
    summary = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "models": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {', '.join(str(args.out / f'{n}_loss.png') for n in names)} and {args.out / 'results.json'}")
    for name, result in results.items():
        print(f"{name:>5}: " + ", ".join(f"{label} {run['accuracy']:.2%} ({run['seconds']:.0f} s)" for label, run in result["runs"].items())
              + f"  [{result['metric']}, target {result['target']:.0%}]")
    return results


if __name__ == "__main__":
    main()
