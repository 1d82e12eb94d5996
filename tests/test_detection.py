"""The detector: mean average precision on hand-worked cases, FCOS target assignment, decoding and
NMS, the Detector on the kernel backends against float64 (forward, loss gradients, three training
steps), and the digit scenes.

Tiny configs: without a GPU the Triton kernels run through the interpreter.
"""
import pytest
import torch
from torch import nn

from support import (
    KERNEL_BACKENDS, as_dtype_of, assert_as_accurate_as_stock, assert_trains_like_float64, device_for,
)
from vkernels.models import Detector, detect, mean_average_precision
from vkernels.models.datasets import compose_scenes, ink_box, split_digits
from vkernels.models.detection import Detections, assign_targets, average_precision, detection_loss

pytest.importorskip("torchvision")


def box(x1, y1, x2, y2):
    return torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32)


def found(boxes, scores, labels):
    return Detections(torch.tensor(boxes, dtype=torch.float32).view(-1, 4), torch.tensor(scores), torch.tensor(labels))


# --- mAP -------------------------------------------------------------------------------------

def test_average_precision_worked_example():
    # Ranked TP, FP, TP, FP, TP over 3 targets: precision 1, 1/2, 2/3, 1/2, 3/5 at recall 1/3, 1/3, 2/3,
    # 2/3, 1; made monotone from the right: 1 up to recall 1/3, 2/3 up to 2/3, 3/5 up to 1.
    scores = torch.tensor([0.9, 0.5, 0.3, 0.8, 0.4])  # ranks 1, 3, 5, 2, 4
    matched = torch.tensor([True, True, True, False, False])
    assert average_precision(scores, matched, 3) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(torch.tensor([0.9]), torch.tensor([True]), 2) == pytest.approx(0.5)  # a target missed
    assert average_precision(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 1) == 0.0
    with pytest.raises(ValueError, match="no targets"):
        average_precision(torch.tensor([0.5]), torch.tensor([False]), 0)


def test_mean_average_precision_matching():
    targets = [torch.cat([box(0, 0, 10, 10), box(20, 20, 30, 30)]), box(5, 5, 15, 15)]
    labels = [torch.tensor([0, 1]), torch.tensor([0])]
    perfect = [found(t.tolist(), [0.9] * len(t), l.tolist()) for t, l in zip(targets, labels)]
    assert mean_average_precision(perfect, targets, labels, num_classes=3) == 1.0  # class 2 has no target: not counted

    # IoU exactly 0.5 counts (0..20 × 0..10 against 0..10 × 0..10: 100 / 200); just under does not.
    half = [found([[0, 0, 20, 10]], [0.9], [0]), found([], [], [])]
    nothing = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))  # an image without targets or detections
    assert mean_average_precision(half, [box(0, 0, 10, 10), nothing[0]], [torch.tensor([0]), nothing[1]], 1) == 1.0
    just_under = [found([[0, 0, 20.5, 10]], [0.9], [0])]
    assert mean_average_precision(just_under, [box(0, 0, 10, 10)], [torch.tensor([0])], 1) == 0.0

    # A duplicate of a found object is a false positive, ranked after the hit: AP stays 1. Ranked
    # before it (higher score), it halves the precision at full recall.
    duplicate_after = [found([[0, 0, 10, 10], [1, 1, 10, 10]], [0.9, 0.8], [0, 0])]
    assert mean_average_precision(duplicate_after, [box(0, 0, 10, 10)], [torch.tensor([0])], 1) == 1.0
    miss_first = [found([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    assert mean_average_precision(miss_first, [box(0, 0, 10, 10)], [torch.tensor([0])], 1) == pytest.approx(0.5)
    # The right box with the wrong class: a false positive of class 1, a miss of class 0.
    wrong_class = [found([[0, 0, 10, 10]], [0.9], [1])]
    assert mean_average_precision(wrong_class, [torch.cat([box(0, 0, 10, 10), box(20, 20, 30, 30)])],
                                  [torch.tensor([0, 1])], 2) == 0.0
    # Two detections, two targets in one image: each takes the target it overlaps best, once.
    crossed = [found([[0, 0, 10, 10], [20, 20, 30, 30]], [0.6, 0.9], [0, 0])]
    assert mean_average_precision(crossed, [torch.cat([box(20, 20, 30, 31), box(0, 0, 10, 11)])],
                                  [torch.tensor([0, 0])], 1) == 1.0


# --- targets, decoding, NMS ------------------------------------------------------------------

def test_assign_targets_centre_sampling_smallest_box_wins():
    model = Detector(3, channels=(4, 4, 4), stride=4)
    locations = model.locations(8, 8, torch.device("cpu"))  # centres at 2, 6, ..., 30
    big, small = box(0, 0, 24, 24), box(8, 8, 16, 16)
    classes, boxes = assign_targets(locations, [torch.cat([big, small]), box(0, 0, 0, 0)[:0]],
                                    [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], stride=4, num_classes=3)
    grid = classes[0].view(8, 8)
    # both centres at (12, 12); within 1.5 strides: x, y in {6, 10, 14, 18} for both → the small box takes them all
    expected = torch.full((8, 8), 3)
    expected[1:5, 1:5] = 2
    assert torch.equal(grid, expected)
    assert torch.equal(boxes[0].view(8, 8, 4)[2, 2], small[0])
    assert (classes[1] == 3).all()  # an image without boxes: all background
    classes, _ = assign_targets(locations, [torch.cat([box(0, 0, 8, 8), box(16, 16, 32, 32)])], [torch.tensor([0, 1])], 4, 3)
    grid = classes[0].view(8, 8)  # centre (4, 4): x, y in {2, 6, 10}; centre (24, 24): {18, 22, 26, 30}
    assert (grid[:3, :3] == 0).all() and (grid[4:, 4:] == 1).all() and (grid == 3).sum() == 64 - 9 - 16


def test_detector_decodes_boxes_around_locations():
    model = Detector(3, in_channels=1, channels=(4, 4, 4), head_depth=1, stride=4, backend="torch")
    logits, boxes = model(torch.rand(2, 1, 16, 16))
    assert logits.shape == (2, 16, 3) and boxes.shape == (2, 16, 4)
    assert abs(logits.mean().item() + 4.595) < 0.1  # every score starts near the focal-loss prior, 0.01
    with torch.no_grad():
        model.box.weight.zero_()
        model.box.bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    _, boxes = model(torch.rand(1, 1, 16, 16))
    # location (x=6, y=2): centre moved by (0.5, -0.25) strides, width 1 stride, height e strides
    w, h = 4.0, 4 * torch.e
    assert torch.allclose(boxes[0, 1], torch.tensor([8 - w / 2, 1 - h / 2, 8 + w / 2, 1 + h / 2]))
    with pytest.raises(ValueError, match="stride"):
        Detector(channels=(4, 4), stride=8)


class FixedOutputs(nn.Module):
    """Stands in for a Detector: the given logits and boxes for any input."""

    def __init__(self, logits, boxes):
        super().__init__()
        self.num_classes, self.logits, self.boxes = logits.shape[-1], logits, boxes

    def forward(self, images):
        return self.logits, self.boxes


def test_detect_thresholds_nms_and_clipping():
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [30, 30, 50, 50], [5, 5, 9, 9]]]).float()
    logits = torch.full((1, 5, 2), -10.0)
    logits[0, 0, 0], logits[0, 1, 0], logits[0, 2, 1], logits[0, 3, 1], logits[0, 4, 0] = 3.0, 2.0, 1.0, 0.0, -4.0
    (result,) = detect(FixedOutputs(logits, boxes), torch.zeros(1, 1, 40, 40))
    # location 1 overlaps location 0 (same class, IoU .82): suppressed; location 2 is another class:
    # kept; location 4 scores sigmoid(-4) = .018 < .05: dropped; location 3 clipped to the 40×40 image
    assert result.labels.tolist() == [0, 1, 1]
    assert torch.allclose(result.scores, torch.sigmoid(torch.tensor([3.0, 1.0, 0.0])))
    assert torch.equal(result.boxes, torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]], dtype=torch.float32))


# --- the Detector on the kernels ---------------------------------------------------------------

def tiny_scene_batch(device, count=2):
    generator = torch.Generator().manual_seed(torch.randint(2**31, ()).item())
    digits = torch.rand(6, 8, 8) * (torch.rand(6, 8, 8) > 0.4)
    images, boxes, labels = compose_scenes(digits, torch.arange(6) % 3, count, generator, canvas=8, sizes=(4, 6),
                                           per_scene=(1, 2))
    return images.to(device), [b.to(device) for b in boxes], [c.to(device) for c in labels]


def tiny_detector(device):
    # Three convs on 8×8 scenes, a 4×4 grid: each conv costs seconds in the Triton interpreter.
    return Detector(3, channels=(4, 8), head_depth=1, stride=2).to(device)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_detector_as_accurate_as_stock_with_gradients(backend):
    """Class logits, boxes, the detection loss and every parameter gradient within max(2 × stock
    float32's error, 1e-5) of float64. Measured over 3 seeds: both float32 runs <= 8e-8 (outputs),
    <= 2e-7 (gradients)."""
    device = device_for(backend)
    images, boxes, labels = tiny_scene_batch(device)

    def run(model):
        (images64,) = as_dtype_of(model, images)
        return (*model(images64), detection_loss(model, images64, *(as_dtype_of(model, *boxes), labels)))

    assert_as_accurate_as_stock(tiny_detector(device), run, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_detector_convergence_vs_float64(backend):
    """Three SGD steps: the kernels' loss at every step within 1e-4 of float64's, its final parameters as
    close to float64's as stock float32's. Measured over 4 seeds: stock float32 and Triton losses
    <= 1.1e-7 from float64, parameters <= 6.3e-7 (under the 1e-5 floor)."""
    device = device_for(backend)
    images, boxes, labels = tiny_scene_batch(device)

    def loss(model):
        return detection_loss(model, *as_dtype_of(model, images), as_dtype_of(model, *boxes), labels)

    assert_trains_like_float64(tiny_detector(device), loss, backend=backend, lr=0.05)


# --- scenes ----------------------------------------------------------------------------------

def test_scenes_place_digits_without_overlap_and_box_their_ink():
    pytest.importorskip("sklearn")
    train_x, train_y, _, _ = split_digits()
    seed = torch.randint(2**31, ()).item()
    images, boxes, labels = compose_scenes(train_x, train_y, 20, torch.Generator().manual_seed(seed))
    again = compose_scenes(train_x, train_y, 20, torch.Generator().manual_seed(seed))
    assert torch.equal(images, again[0]) and all(torch.equal(a, b) for a, b in zip(boxes, again[1]))  # seeded
    assert images.shape == (20, 1, 64, 64) and 0 <= images.min() and images.max() <= 1
    from torchvision.ops import box_iou

    for image, scene_boxes, scene_labels in zip(images, boxes, labels):
        assert 2 <= len(scene_boxes) <= 4 and len(scene_labels) == len(scene_boxes)
        assert (scene_boxes[:, :2] >= 0).all() and (scene_boxes[:, 2:] <= 64).all()
        assert (box_iou(scene_boxes, scene_boxes) - torch.eye(len(scene_boxes))).abs().max() == 0  # disjoint
        # Ink lies in the boxes, give or take the bilinear upsampling's spill (under a source pixel, 3 px).
        inside = torch.zeros(64, 64, dtype=torch.bool)
        for x1, y1, x2, y2 in scene_boxes.tolist():
            inside[max(0, int(y1) - 4): int(y2) + 4, max(0, int(x1) - 4): int(x2) + 4] = True
        assert image[0][~inside].max() == 0 and image[0][inside].max() > 0.5
    digit = torch.zeros(8, 8)
    digit[2:5, 3:7] = 0.5
    assert ink_box(digit) == (3, 2, 7, 5)


# --- the example -----------------------------------------------------------------------------

def test_train_digits_detector_smoke(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    from vkernels.models import train_digits

    results = train_digits.main(["--model", "detector", "--max-steps", "2", "--out", str(tmp_path), "--device", "cpu"])
    runs = results["detector"]["runs"]
    assert all((tmp_path / f"detector_{kind}.png").stat().st_size > 0 for kind in ("loss", "predictions"))
    for run in runs.values():
        assert run["steps"] == 2 and 0 <= run["score"] <= 1
        assert run["figures"] == {train_digits.DETECTOR_METRIC: run["score"]}
    assert runs["stock"]["ops"] == {"conv2d_relu_maxpool2d": "torch", "conv2d_relu": "torch"}
    assert runs["vkernels"]["losses"] == runs["stock"]["losses"]
