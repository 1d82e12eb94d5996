"""The training examples' pictures: loss curves, and predictions drawn on held-out data (matplotlib,
written as PNG without a display)."""
from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(title: str, metric: str, runs: dict[str, dict], path: Path) -> None:
    """Each run's training loss per step (log scale), labelled with its backend and headline score."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for (label, run), style in zip(runs.items(), ("-", "--")):
        ran = "/".join(sorted(set(run["ops"].values())))
        axis.plot(range(1, len(run["losses"]) + 1), run["losses"], style, alpha=0.8,
                  label=f"{label}: backend {run['backend']} (ran {ran}), {run['score']:.1%}")
    axis.set(title=title, xlabel="step", ylabel="training loss", yscale="log")
    axis.legend(title=metric)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def draw_sound_image(spectrograms: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                     predictions: dict[str, torch.Tensor], corrupted: torch.Tensor, path: Path,
                     names: tuple[str, ...] = ("clean", "image noised", "sound noised")) -> None:
    """One column per pair: its log-mel spectrogram above its image, titled with the true class and
    which modality was noised; each predictor's class is written on the image (wrong ones in red)."""
    plt = _pyplot()
    count = len(labels)
    figure, axes = plt.subplots(2, count, figsize=(1.9 * count, 4.4), squeeze=False)
    for column in range(count):
        top, bottom = axes[0, column], axes[1, column]
        top.imshow(spectrograms[column, 0].cpu().numpy(), origin="lower", aspect="auto", cmap="magma")
        bottom.imshow(images[column].mean(dim=0).cpu().numpy(), cmap="gray")
        truth = int(labels[column])
        top.set_title(f"true {truth}\n{names[int(corrupted[column])]}", fontsize=8)
        for source_index, (source, p) in enumerate(predictions.items()):
            color = "green" if int(p[column]) == truth else "red"
            bottom.text(0.02, 0.98 - 0.12 * source_index, f"{source}: {int(p[column])}", color=color, fontsize=7,
                        transform=bottom.transAxes, va="top", bbox=dict(facecolor="white", alpha=0.7, pad=1, lw=0))
        for axis in (top, bottom):
            axis.set_xticks([]), axis.set_yticks([])
    axes[0, 0].set_ylabel("log-mel (time →)", fontsize=7)
    axes[1, 0].set_ylabel("image", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_detections(images: torch.Tensor, detections, boxes: list[torch.Tensor], labels: list[torch.Tensor],
                    path: Path, min_score: float = 0.3, columns: int = 6) -> None:
    """Scenes with their true boxes (dashed white) and the detections scoring at least ``min_score``
    (solid, green when the class is right and IoU ≥ 0.5 with a true box of that class, else red;
    labelled class:score). For legibility one box per place: of detections overlapping at IoU > 0.5
    only the best-scoring class is drawn (mAP sees them all: ``detect``'s NMS is per class)."""
    from torchvision.ops import box_iou, nms

    plt = _pyplot()
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, image, found, true_boxes, true_labels in zip(axes.flat, images, detections, boxes, labels):
        axis.imshow(image[0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        for (x1, y1, x2, y2) in true_boxes.tolist():
            axis.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="white", ls="--", lw=0.8))
        keep = nms(found.boxes, found.scores, 0.5)
        keep = keep[found.scores[keep] >= min_score]
        for box, score, label in zip(found.boxes[keep], found.scores[keep], found.labels[keep]):
            same = true_labels == label
            hit = bool(same.any()) and box_iou(box[None], true_boxes[same]).max() >= 0.5
            x1, y1, x2, y2 = box.tolist()
            color = "lime" if hit else "red"
            axis.add_patch(plt.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec=color, lw=1.2))
            axis.text(x1, y1 - 1, f"{int(label)}:{float(score):.2f}", color=color, fontsize=7, va="bottom")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
