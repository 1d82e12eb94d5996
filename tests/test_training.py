"""Training on vkernels: a tiny ViT and CLIP train on Triton as accurately as on stock PyTorch against
float64 training (the CNN's twin is in test_models.py), DistributedDataParallel over two processes
equals one process on the global batch, and the digits example runs end to end.

Tiny configs: without a GPU the Triton kernels run through the interpreter.
"""
import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from support import (
    GPU, KERNEL_BACKENDS, as_dtype_of, assert_as_accurate, assert_trains_like_float64, device_for, rounding_floor,
)
from vkernels.models import CLIP, DigitTokenizer, VisionTransformer

# Floor under "ours within 2 x stock's error from float64 training": the longest sum in these tiny
# models is the 128-wide MLP's second layer.
FLOOR = rounding_floor(torch.float32, 128)
TINY_VIT = dict(image_size=8, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2)
TOKENIZER = DigitTokenizer(context_length=8)


def test_vit_convergence_triton_vs_torch():
    device = device_for("triton")
    x = torch.randn(4, 3, 8, 8, device=device)
    y = torch.randint(0, 5, (4,), device=device)
    model = VisionTransformer(**TINY_VIT).to(device)
    assert_trains_like_float64(model, lambda m: F.cross_entropy(m(*as_dtype_of(m, x)), y), lr=0.1, floor=FLOOR)


def test_clip_convergence_triton_vs_torch():
    device = device_for("triton")
    model = CLIP(embed_dim=16, image_size=8, patch_size=4, vision_width=32, vision_depth=1, vision_heads=2,
                 vocab_size=TOKENIZER.vocab_size, context_length=8, text_width=32, text_depth=1, text_heads=2).to(device)
    images = torch.randn(3, 3, 8, 8, device=device)
    tokens = TOKENIZER(["a photo of the digit one", "digit two", "a handwritten nine"]).to(device)
    # the loss scales cosine similarities by exp(logit_scale) = 1/0.07 at initialisation: every rounding
    # before it grows 14-fold (stock's own error from float64 reached 2.4e-5 over 22 seeds)
    assert_trains_like_float64(model, lambda m: m.contrastive_loss(*as_dtype_of(m, images), tokens), lr=0.1,
                               floor=FLOOR / 0.07)


# --- DistributedDataParallel ------------------------------------------------------------------

DDP_STEPS, DDP_LR, WORLD = 3, 0.1, 2


def _sgd_steps(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=0.9)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _ddp_worker(rank, port, path, kernel_backend, process_group):
    """One rank: the initial weights and the global batch from ``path``, half of the batch, DDP."""
    torch.set_num_threads(1)  # two processes on a 2-core machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(process_group, rank=rank, world_size=WORLD)
    try:
        saved = torch.load(path)
        model = VisionTransformer(**TINY_VIT, backend=kernel_backend).to(device)
        model.load_state_dict(saved["state"])
        rows = slice(rank * len(saved["x"]) // WORLD, (rank + 1) * len(saved["x"]) // WORLD)
        # DDP averages the gradients over ranks: equal halves give the global batch's mean-loss gradient.
        _sgd_steps(torch.nn.parallel.DistributedDataParallel(model), saved["x"][rows].to(device),
                   saved["y"][rows].to(device))
        torch.save({name: t.cpu() for name, t in model.state_dict().items()}, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ddp_two_processes_equal_one_process(tmp_path, monkeypatch, backend):
    """NCCL where there is a GPU per rank; else gloo (two ranks may share one GPU through gloo)."""
    device = device_for(backend)
    process_group = "nccl" if torch.cuda.device_count() >= WORLD else "gloo"
    if not GPU:  # spawned children inherit the environment: on before they import triton
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = VisionTransformer(**TINY_VIT)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    path = str(tmp_path / "ddp.pt")
    torch.save({"state": model.state_dict(), "x": x, "y": y}, path)
    mp.spawn(_ddp_worker, args=(_free_port(), path, backend, process_group), nprocs=WORLD, join=True)

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # one process, the whole global batch: on the backend in float32, and on stock PyTorch in float64
    single, exact = copy.deepcopy(model).to(device), copy.deepcopy(model).double()
    single.backend, exact.backend = backend, "torch"
    _sgd_steps(single, x.to(device), y.to(device))
    _sgd_steps(exact, x.double(), y)
    single = {name: t.cpu() for name, t in single.state_dict().items()}
    for name, value in exact.state_dict().items():
        assert not torch.equal(value, initial[name].double()), name  # every parameter trained
    for rank in range(WORLD):
        assert_as_accurate(torch.load(f"{path}.rank{rank}"), single, exact.state_dict(), FLOOR)


# --- the digits example -----------------------------------------------------------------------

def test_train_digits_smoke(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    from vkernels.models import train_digits

    results = train_digits.main(["--model", "vit", "--max-steps", "3", "--out", str(tmp_path), "--device", "cpu"])
    assert (tmp_path / "vit_loss.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    runs = saved["models"]["vit"]["runs"]
    assert set(runs) == {"stock", "vkernels"} and results["vit"]["runs"].keys() == runs.keys()
    for run in runs.values():
        assert run["steps"] == len(run["losses"]) == 3 and 0 <= run["score"] <= 1
        assert run["figures"] == {"test accuracy": run["score"]}
    assert runs["stock"]["ops"] == {"attention": "torch"}
    assert runs["vkernels"]["losses"] == runs["stock"]["losses"]  # auto on CPU is stock PyTorch, same seed


def test_train_digits_data_split():
    pytest.importorskip("sklearn")
    from vkernels.models.train_digits import load_digits

    data = load_digits()
    assert data.train_x.shape == (1437, 3, 32, 32) and data.test_x.shape == (360, 3, 32, 32)
    assert torch.bincount(data.test_y).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]  # stratified, seeded
    assert abs(data.train_x.mean().item()) < 1e-4 and abs(data.train_x.std().item() - 1) < 1e-4
