"""The CUDA emulator's own semantics (csrc/emulation), through the test-only kernels of
csrc/emulation/selftest.cpp (ops vkernels_emulation::*).

The expected results are written here from NVIDIA's documents, independently of the emulator and
of mma.cuh: mma.sync and ldmatrix from the PTX ISA's fragment tables, the shuffles from the CUDA
programming guide's description of __shfl*_sync, conversions from torch's own rounding.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.cuda  # the emulator behind the cuda backend: runs where the CUDA tests run without a GPU
emulator = pytest.importorskip("vkernels._C_emu", reason="vkernels._C_emu is not built (VKERNELS_EMULATION=0?)")
ops = torch.ops.vkernels_emulation


# --------------------------------------------------------------------------------------------
# mma.sync.m16n8k16 and ldmatrix against the PTX ISA's fragment tables


def group_and_thread(lane: int) -> tuple[int, int]:
    return lane // 4, lane % 4  # groupID, threadID_in_group


def pack(low: torch.Tensor, high: torch.Tensor) -> int:
    """Two 16-bit elements in one 32-bit register (as a signed int32), the lower-numbered element in
    the low half."""
    lo, hi = (int(t.view(torch.int16)) & 0xFFFF for t in (low, high))
    word = lo | hi << 16
    return word - (1 << 32) if word >= 1 << 31 else word


def a_element(lane: int, i: int) -> tuple[int, int]:
    """PTX ISA, mma.m16n8k16 .f16/.bf16, fragment A: (row, col) of element a_i, i in 0..7."""
    group, thread = group_and_thread(lane)
    row = group if i < 2 or 4 <= i < 6 else group + 8
    col = thread * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_element(lane: int, i: int) -> tuple[int, int]:
    """Fragment B (16 x 8): (row k, col n) of element b_i, i in 0..3."""
    group, thread = group_and_thread(lane)
    return thread * 2 + (i & 1) + (8 if i >= 2 else 0), group


def c_element(lane: int, i: int) -> tuple[int, int]:
    """Fragments C and D (16 x 8, f32): (row, col) of element c_i, i in 0..3."""
    group, thread = group_and_thread(lane)
    return group + (8 if i >= 2 else 0), thread * 2 + (i & 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_m16n8k16_follows_the_ptx_fragment_tables(dtype):
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.randn(16, 8)
    a_regs = torch.tensor([[pack(a[a_element(L, 2 * r)], a[a_element(L, 2 * r + 1)]) for r in range(4)]
                           for L in range(32)], dtype=torch.int32)
    b_regs = torch.tensor([[pack(b[b_element(L, 2 * r)], b[b_element(L, 2 * r + 1)]) for r in range(2)]
                           for L in range(32)], dtype=torch.int32)
    c_regs = torch.tensor([[c[c_element(L, i)].item() for i in range(4)] for L in range(32)])
    d_regs = ops.warp_mma(a_regs, b_regs, c_regs, dtype == torch.bfloat16)
    d = torch.empty(16, 8)
    for lane in range(32):
        for i in range(4):
            d[c_element(lane, i)] = d_regs[lane, i]
    expected = a.double() @ b.double() + c.double()  # products of 16-bit floats are exact
    torch.testing.assert_close(d.double(), expected, rtol=2**-23, atol=1e-6)


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_ldmatrix_x4_follows_the_ptx_fragment_table(trans):
    """Threads 8i..8i+7 give the row addresses of 8x8 matrix i; register i of lane L holds row L/4,
    columns 2(L%4) and 2(L%4)+1 of matrix i (.trans: the matrix transposed), low half first."""
    image = torch.randint(-2**15, 2**15, (64 * 8,), dtype=torch.int32).to(torch.int16)  # 64 rows of 16 bytes
    rows = torch.randperm(64)[:32]
    offsets = (rows * 16).to(torch.int32)
    regs = ops.warp_ldmatrix(image.view(torch.uint8), offsets, trans)
    matrices = image.view(64, 8)[rows].view(4, 8, 8)  # [matrix][row][column]
    for lane in range(32):
        for i in range(4):
            m = matrices[i].t() if trans else matrices[i]
            expected = pack(m[lane // 4, 2 * (lane % 4)], m[lane // 4, 2 * (lane % 4) + 1])
            assert regs[lane, i].item() == expected, (lane, i)


@pytest.mark.parametrize("a_transposed", [False, True], ids=["A[m][k]", "A[k][m]"])
@pytest.mark.parametrize("b_transposed", [False, True], ids=["B[n][k]", "B[k][n]"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_cuh_lane_offsets_load_every_tile_layout(a_transposed, b_transposed, dtype):
    """mma.cuh's recipe (a_lane_offset / b_lane_offset, with or without .trans) for the four tile
    layouts the kernels stage, through ldmatrix and two m16n8k16 tiles: D = A B."""
    a = torch.randn(16, 16).to(dtype)  # [m][k]
    b = torch.randn(16, 16).to(dtype)  # [k][n]
    d = ops.tile_product(a.t().contiguous() if a_transposed else a, b if b_transposed else b.t().contiguous(),
                         a_transposed, b_transposed)
    torch.testing.assert_close(d.double(), a.double() @ b.double(), rtol=2**-23, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Shuffles, from the CUDA programming guide's description of __shfl*_sync


def guide_shuffle(values: list[int], args: list[int], op: str, width: int, mask: int) -> list[int]:
    out = list(values)
    for i, value in enumerate(values):
        lane, base = i % 32, i - i % 32
        if not mask >> lane & 1:
            continue
        segment, position = lane // width, lane % width
        if op == "idx":  # srcLane modulo width, within the caller's subsection
            source = segment * width + args[i] % width
        elif op == "up":  # shifted up by delta; the lower delta lanes of a subsection keep their value
            source = lane - args[i] if position >= args[i] else lane
        elif op == "down":  # shifted down; the upper delta lanes keep their value
            source = lane + args[i] if position + args[i] < width else lane
        else:  # lane ^ laneMask; a lane of a later group gives the caller its own value
            source = lane ^ args[i]
            source = source if source // width <= segment else lane
        out[i] = values[base + source]
    return out


@pytest.mark.parametrize("width", [32, 16, 4, 1])
@pytest.mark.parametrize("op", ["idx", "up", "down", "xor"])
def test_shuffles_follow_the_programming_guide(op, width):
    threads = 64
    values = torch.randint(-1000, 1000, (threads,), dtype=torch.int32)
    limit = 32 if op in ("idx", "xor") else width
    args = torch.randint(0, limit, (threads,), dtype=torch.int32)
    expected = guide_shuffle(values.tolist(), args.tolist(), op, width, 0xFFFFFFFF)
    assert ops.shuffle(values, args, op, width, 0xFFFFFFFF).tolist() == expected


def test_shuffle_in_groups_of_lanes_leaves_the_others_alone():
    """The pooling kernels' pattern: disjoint masks, one per group of lanes, butterfly inside it."""
    values = torch.randint(-1000, 1000, (32,), dtype=torch.int32)
    for mask, group in ((0x0000FF00, 8), (0xF0000000, 4)):
        args = torch.full((32,), group // 2, dtype=torch.int32)
        expected = guide_shuffle(values.tolist(), args.tolist(), "xor", group, mask)
        assert ops.shuffle(values, args, "xor", group, mask).tolist() == expected


# --------------------------------------------------------------------------------------------
# Barriers, cp.async, conversions, ex2.approx


def test_syncthreads_waits_for_every_thread_of_each_block():
    blocks, threads, rounds = 2, 96, 5
    out = ops.barrier_rotate(blocks, threads, rounds)
    expected = (torch.arange(threads) + rounds) % threads + 1000 * torch.arange(blocks)[:, None]
    assert torch.equal(out, expected.int())


@pytest.mark.parametrize("valid", [True, False], ids=["copy", "zero_fill"])
def test_cp_async_lands_at_the_wait_and_zero_fills_without_a_source(valid):
    src = torch.randint(-1000, 1000, (160,), dtype=torch.int32)
    out = ops.cp_async(src, valid)
    before, after = out[:, 0], out[:, 1]
    assert (before == -1).all(), "shared memory before cp.async.wait_group holds its old (0xff) bytes"
    if valid:
        assert torch.equal(after[:, :4], src[:128].view(32, 4)) and torch.equal(after[:, 4], src[128:])
    else:
        assert (after == 0).all()


def conversion_inputs(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of dtype, the midpoints between neighbours (ties round to even) and just
    off them, the overflow threshold, subnormals, infinities, NaN and random floats of any size."""
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).float()
    values = values[torch.isfinite(values)].unique()
    mid = (values[:-1].double() + values[1:].double()) / 2
    near = torch.cat([mid, torch.nextafter(mid.float(), torch.tensor(float("inf"))).double(),
                      torch.nextafter(mid.float(), torch.tensor(float("-inf"))).double()]).float()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65519.996, 65520.0, 1e-8, -3e-8, 1e-45,
                            3.4e38, -3.4e38])
    wide = torch.randn(100000) * torch.exp2(torch.randint(-140, 128, (100000,)).float())
    return torch.cat([values, near, special, wide])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_conversions_round_to_nearest_even_like_torch(dtype):
    x = conversion_inputs(dtype)
    bits, back = ops.convert(x, dtype == torch.bfloat16)
    assert torch.equal(bits, x.to(dtype).view(torch.int16))
    assert torch.equal(back, x.to(dtype).float())
    nan_bits, nan_back = ops.convert(torch.tensor([float("nan"), -float("nan")]), dtype == torch.bfloat16)
    assert nan_back.isnan().all() and nan_bits.view(dtype).isnan().all()


def test_exp2_approx_flushes_subnormals_and_maps_minus_infinity_to_zero():
    x = torch.tensor([float("-inf"), -130.0, -126.0, 1e-40, 0.0, 1.5, 127.9, 128.0, float("nan")])
    y = ops.exp2_approx(x)
    assert y[0] == 0 and y[1] == 0  # 2^-130 is subnormal: flushed
    assert y[2] == 2.0**-126 and y[3] == 1.0 and y[4] == 1.0 and y[7] == float("inf") and y[8].isnan()
    torch.testing.assert_close(y[5:7], torch.exp2(x[5:7]), rtol=2**-21, atol=0)


# --------------------------------------------------------------------------------------------
# Races and broken kernels: errors naming the kernel, block and thread


@pytest.fixture
def thread_order():
    """Threads in thread order, whatever VKERNELS_EMULATION_SCHEDULE says: which error a broken kernel
    meets first (two lane groups disagreeing, or one waiting for the other's exited lanes) depends on it."""
    previous = emulator.schedule()
    emulator.set_schedule("fifo")
    yield
    emulator.set_schedule(*previous)


def test_random_schedule_exposes_a_missing_barrier(thread_order):
    """Warp 1 reads what warp 0 wrote without a __syncthreads between them. In thread order the race
    goes unseen; with threads drawn at random (VKERNELS_EMULATION_SCHEDULE=random) it shows."""
    assert torch.equal(ops.missing_barrier(), torch.arange(32, dtype=torch.int32))
    emulator.set_schedule("random", 1)
    assert not torch.equal(ops.missing_barrier(), torch.arange(32, dtype=torch.int32))
    assert torch.equal(ops.barrier_rotate(2, 96, 3), (torch.arange(96) + 3) % 96 + 1000 * torch.arange(2)[:, None])




FAULTS = {
    "exits_before_barrier": r"exits_before_barrier_kernel.*block \(0, 0, 0\), thread \(\d+, 0, 0\).*"
                            r"__syncthreads at selftest\.cpp:\d+ is never reached by thread \(37, 0, 0\), which has exited",
    "different_barriers": r"different_barriers_kernel.*different __syncthreads",
    "mask_disagreement": r"mask_disagreement_kernel.*lanes disagree.*mask 0xffff0000.*mask 0xffffffff",
    "exited_lane": r"exited_lane_kernel.*__shfl_sync \(mask 0xffffffff\).*lane 31, which has exited",
    "lane_waits_at_barrier": r"lane_waits_at_barrier_kernel.*waits for lane 5, which waits at __syncthreads",
    "ldmatrix_out_of_bounds": r"ldmatrix_out_of_bounds_kernel.*thread \(\d+, 0, 0\).*bytes 512\.\.527 of `tile`, which has 512",
    "cp_async_misaligned": r"cp_async_misaligned_kernel.*not 16-byte aligned",
    "large_dynamic_shared": r"large_dynamic_shared_kernel.*fails to launch.*cudaFuncAttributeMaxDynamicSharedMemorySize",
}


@pytest.mark.parametrize("kind", FAULTS)
def test_broken_kernel_stops_with_an_error_not_a_hang(kind, thread_order):
    with pytest.raises(RuntimeError, match=FAULTS[kind]):
        ops.fault(kind)
    # the emulator is usable again after an error
    assert ops.barrier_rotate(1, 64, 1)[0, 0].item() == 1


@pytest.mark.skipif(not emulator.sanitized, reason="needs the VKERNELS_SANITIZE=1 build (CI's second test run)")
def test_shared_memory_overrun_is_an_address_sanitizer_error():
    """One element past a static __shared__ array (on a GPU: a silent write into the next array)."""
    code = "import torch, vkernels._C_emu; torch.ops.vkernels_emulation.fault('shared_overrun')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                            timeout=120)
    assert result.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr
    assert "shared_overrun_kernel" in result.stderr
