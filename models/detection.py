"""Object detection on vkernels: an anchor-free, FCOS-style detector whose backbone and head are
fused convs, its loss and post-processing (torchvision.ops: focal loss, GIoU loss, IoU, NMS), and
mean average precision to score it. torchvision is imported where it is used, so that
``vkernels.models`` imports without it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import vkernels


class Detections(NamedTuple):
    """One image's detections: boxes (n, 4) as (x1, y1, x2, y2) pixels, scores (n,), labels (n,)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


class Detector(nn.Module):
    """Anchor-free detector with one output level at ``stride`` (FCOS-style, without centerness).

    Backbone: one 3×3 conv (padding 1) + ReLU per entry of ``channels``; the first log2(stride) of
    them are each followed by a 2×2 max-pool, fused into one ``vkernels.conv2d_relu_maxpool2d``, the
    rest are ``vkernels.conv2d_relu``. Head: ``head_depth`` 3×3 ``vkernels.conv2d_relu`` layers, then
    two 3×3 convs without activation (stock): ``classifier`` (one score per class and location) and
    ``box`` (per location: the box centre's offset from the location and the log of its width and
    height, in strides). Boxes are decoded from the location, so every location predicts a valid
    box, also one a little off a thin digit.

    Images are taken as they are (e.g. in [0, 1]) and standardised inside with ``image_mean`` and
    ``image_std``, as torchvision's detection models do; the ReLU convs start from torchvision's
    ResNet initialisation (Kaiming, fan-out). Both matter on sparse inputs such as digits on a black
    canvas: with PyTorch's default initialisation and raw pixels the classifier stayed at chance for
    hundreds of steps while the boxes learned.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 64),
        head_depth: int = 2,
        stride: int = 4,
        prior: float = 0.01,
        image_mean: float = 0.0,
        image_std: float = 1.0,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.pooled = int(math.log2(stride))
        if 2**self.pooled != stride or self.pooled > len(channels):
            raise ValueError(f"Detector: stride must be a power of two reached by the {len(channels)} backbone convs, "
                             f"got {stride}")
        self.backend = backend
        self.num_classes, self.stride = num_classes, stride
        self.image_mean, self.image_std = image_mean, image_std
        widths = (in_channels, *channels)
        self.backbone = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(widths, widths[1:]))
        self.head = nn.ModuleList(nn.Conv2d(channels[-1], channels[-1], 3, padding=1) for _ in range(head_depth))
        self.classifier = nn.Conv2d(channels[-1], num_classes, 3, padding=1)
        self.box = nn.Conv2d(channels[-1], 4, 3, padding=1)
        for conv in (*self.backbone, *self.head):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        # Focal loss's initialisation: every score starts at ``prior``, so the many background
        # locations do not swamp the first steps.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.constant_(self.classifier.bias, -math.log((1 - prior) / prior))
        nn.init.normal_(self.box.weight, std=0.01)
        nn.init.zeros_(self.box.bias)

    def locations(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(height · width, 2) pixel (x, y) of each output location: the centre of its stride × stride cell."""
        ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        return (torch.stack([xs, ys], dim=-1).flatten(0, 1).float() + 0.5) * self.stride

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (B, P, num_classes), boxes (B, P, 4) as x1, y1, x2, y2 pixels), P = the
        output locations in row-major order (see ``locations``)."""
        b, x = self.backend, (images - self.image_mean) / self.image_std
        for index, conv in enumerate(self.backbone):
            if index < self.pooled:
                x = vkernels.conv2d_relu_maxpool2d(x, conv.weight, conv.bias, padding=1, pool_kernel_size=2, backend=b)
            else:
                x = vkernels.conv2d_relu(x, conv.weight, conv.bias, padding=1, backend=b)
        for conv in self.head:
            x = vkernels.conv2d_relu(x, conv.weight, conv.bias, padding=1, backend=b)
        logits = self.classifier(x).flatten(2).transpose(1, 2)
        box = self.box(x).flatten(2).transpose(1, 2)
        centre = self.locations(*x.shape[-2:], x.device) + box[..., :2] * self.stride
        size = torch.exp(box[..., 2:].clamp(max=6.0)) * self.stride  # clamp: no overflow from a wild early step
        return logits, torch.cat([centre - size / 2, centre + size / 2], dim=-1)

    def extra_repr(self) -> str:
        return f"stride={self.stride}" + ("" if self.backend is None else f", backend={self.backend!r}")


def assign_targets(locations: torch.Tensor, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], stride: int,
                   num_classes: int, radius: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS's centre sampling for a batch of images: a location is positive for a box when it lies
    within ``radius`` strides of the box's centre (in x and in y); claimed by several, it takes the
    smallest box. Returns each image's (class per location, ``num_classes`` for background; (B, P))
    and (box per location; (B, P, 4))."""
    from torchvision import ops

    batch, most = len(boxes), max(1, max(len(b) for b in boxes))
    padded = locations.new_zeros(batch, most, 4)
    padded_labels = torch.zeros(batch, most, dtype=torch.long, device=locations.device)
    present = torch.zeros(batch, most, dtype=torch.bool, device=locations.device)
    for image, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        padded[image, : len(image_boxes)] = image_boxes
        padded_labels[image, : len(image_boxes)] = image_labels
        present[image, : len(image_boxes)] = True
    centres = (padded[..., :2] + padded[..., 2:]) / 2  # (B, K, 2)
    near = ((locations[None, :, None] - centres[:, None]).abs() <= radius * stride).all(dim=-1)  # (B, P, K)
    near &= present[:, None]
    area = ops.box_area(padded.view(-1, 4)).view(batch, 1, most).expand_as(near).masked_fill(~near, math.inf)
    smallest, which = area.min(dim=2)
    classes = torch.where(torch.isfinite(smallest), padded_labels.gather(1, which), num_classes)
    return classes, padded.gather(1, which[..., None].expand(-1, -1, 4))


def detection_loss(model: Detector, images: torch.Tensor, boxes: Sequence[torch.Tensor],
                   labels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sigmoid focal loss over every location and class (summed, per positive location) plus the
    GIoU loss of the positive locations' boxes (averaged)."""
    from torchvision import ops

    logits, predicted = model(images)
    locations = model.locations(images.shape[-2] // model.stride, images.shape[-1] // model.stride, images.device)
    classes, target_boxes = assign_targets(locations, boxes, labels, model.stride, model.num_classes)
    positive = classes < model.num_classes
    one_hot = F.one_hot(classes, model.num_classes + 1)[..., :-1].to(logits.dtype)
    positives = positive.sum().clamp_min(1)
    class_loss = ops.sigmoid_focal_loss(logits, one_hot, reduction="sum") / positives
    box_loss = ops.generalized_box_iou_loss(predicted[positive], target_boxes[positive], reduction="sum") / positives
    return class_loss + box_loss


@torch.no_grad()
def detect(model: Detector, images: torch.Tensor, score_threshold: float = 0.05, iou_threshold: float = 0.5,
           max_detections: int = 20) -> list[Detections]:
    """Per image: every (location, class) scoring above ``score_threshold`` (at most 100 candidates),
    boxes clipped to the image, class-wise NMS (``torchvision.ops.batched_nms``), the best
    ``max_detections`` kept."""
    from torchvision import ops

    logits, boxes = model(images)
    scores = logits.sigmoid()
    found = []
    for image_scores, image_boxes in zip(scores, boxes):
        flat = image_scores.flatten()
        top = flat.topk(min(100, flat.numel())).indices
        top = top[flat[top] > score_threshold]
        location, label = top // model.num_classes, top % model.num_classes
        candidates = ops.clip_boxes_to_image(image_boxes[location], tuple(images.shape[-2:]))
        keep = ops.batched_nms(candidates, flat[top], label, iou_threshold)[:max_detections]
        found.append(Detections(candidates[keep], flat[top][keep], label[keep]))
    return found


def average_precision(scores: torch.Tensor, matched: torch.Tensor, num_targets: int) -> float:
    """Area under the precision-recall curve of detections ranked by score (``matched``: true
    positive or not), with precision made monotone from the right (all-point interpolation, as
    PASCAL VOC since 2010 and COCO without their recall sampling)."""
    if num_targets == 0:
        raise ValueError("average_precision: no targets, the recall is undefined")
    order = torch.argsort(scores, descending=True, stable=True)
    hits = matched[order].double()
    true_positives = hits.cumsum(0)
    precision = true_positives / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    recall = true_positives / num_targets
    # Precision at recall r: the best precision at any recall >= r.
    precision = precision.flip(0).cummax(0).values.flip(0)
    recall_steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_steps * precision).sum())


def mean_average_precision(detections: Sequence[Detections], boxes: Sequence[torch.Tensor],
                           labels: Sequence[torch.Tensor], num_classes: int, iou_threshold: float = 0.5) -> float:
    """mAP@``iou_threshold`` over the classes that have targets. Within a class, detections are
    taken by descending score (over all images), each matched to the unmatched target of its image
    with which its IoU is highest, if that IoU reaches the threshold; otherwise (a miss, or a second
    detection of a found object) it is a false positive."""
    from torchvision import ops

    precisions = []
    for cls in range(num_classes):
        scores, matched, num_targets = [], [], 0
        for found, target_boxes, target_labels in zip(detections, boxes, labels):
            targets = target_boxes[target_labels == cls]
            num_targets += len(targets)
            mine = found.labels == cls
            ranked = torch.argsort(found.scores[mine], descending=True, stable=True)
            candidates, candidate_scores = found.boxes[mine][ranked], found.scores[mine][ranked]
            taken = torch.zeros(len(targets), dtype=torch.bool)
            iou = ops.box_iou(candidates, targets).cpu() if len(targets) else torch.zeros(len(candidates), 0)
            for row in range(len(candidates)):
                overlaps = iou[row].masked_fill(taken, -1.0)
                best = int(overlaps.argmax()) if len(targets) else -1
                hit = best >= 0 and overlaps[best] >= iou_threshold
                if hit:
                    taken[best] = True
                matched.append(hit)
            scores.append(candidate_scores.cpu())
        if num_targets:
            precisions.append(average_precision(torch.cat(scores), torch.tensor(matched, dtype=torch.bool), num_targets))
    return sum(precisions) / len(precisions)
