"""The launch counter counts what a frame would run on CUDA, without running anything."""
import torch
import torch.nn.functional as F

from misotts.bench.launches import count_frame, counting
from misotts.kernels.rmsnorm import rmsnorm


def test_a_known_function_gives_its_known_count():
    x, w = torch.empty(4, 64, device="meta"), torch.empty(32, 64, device="meta")
    with counting() as counter:
        y = F.linear(x, w)  # t (a view) + mm: 1
        z = (y + 1).view(-1)[:10] * 2  # add, mul: 2 (view and slice are not kernels)
        with counter.labelled("norm"):
            rmsnorm(y, torch.empty(32, device="meta"), 1e-5)  # empty_like (no kernel) + 1 Triton launch
    assert z.is_meta
    assert dict(counter.aten) == {"other": 3} and dict(counter.triton) == {"norm": 1}
    assert counter.total() == 4 and counter.total("norm") == 1


def test_frame_counts_are_labelled_and_do_not_grow_with_batch():
    one, four = count_frame("tiny", 1), count_frame("tiny", 4)
    assert one.total() == four.total() > 0
    assert {"backbone", "depth steps", "sampling"} <= set(one.aten) | set(one.triton)
    assert sum(one.triton.values()) > 0  # the CUDA op set's kernels are counted, not run


def test_the_targets_of_the_fused_depth_loop():
    """The CUDA op set's frame: miso-8b <= 1,364 device ops (7,137 before the fused depth loop),
    csm-1b <= 740 (3,905 before), and every batch bucket up to 64 counts the same as batch 1 (the
    fused norm + GEMV path covers them all: no fallback to rmsnorm + cuBLAS at 32 or 64 lanes)."""
    for preset, target in (("miso-8b", 1364), ("csm-1b", 740)):
        one = count_frame(preset, 1).total()
        assert one <= target, (preset, one)
        for batch in (8, 32, 64):
            assert count_frame(preset, batch).total() == one, (preset, batch)
