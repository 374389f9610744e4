"""A frame's step can be captured as a CUDA graph: no host sync, nothing made from host data or
from nothing, shapes fixed by the batch size alone.  Checked on the CPU by recording every aten op
of the step, and by running the step on the meta device (tensors without data: any host read of a
value fails there).  Capture itself is checked on CUDA by tests/engine/test_cuda.py."""
import os

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from misotts.runtime.config import PRESETS
from misotts.engine import Engine, EngineConfig
from misotts.engine.model_runner import ModelRunner
from misotts.engine.ops import TorchOps
from misotts.runtime.model import CSMModel

from .conftest import generate, make_model, prompt

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.masked_select, aten.equal,
            aten.allclose, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.repeat_interleave}
FROM_HOST_DATA = {aten.lift_fresh, aten.lift_fresh_copy}


class StepRecorder(TorchDispatchMode):
    """Records (op, output shapes) of every aten call and the reasons any call is not capturable."""

    def __init__(self):
        super().__init__()
        self.trace, self.problems = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        out = func(*args, **kwargs)
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if func.overloadpacket in SYNC_OPS:
            self.problems.append(f"{func}: reads a tensor value on the host (sync)")
        if func.overloadpacket in FROM_HOST_DATA:
            self.problems.append(f"{func}: a tensor made from host data (a host-to-device copy on CUDA)")
        if outputs and not inputs:
            self.problems.append(f"{func}: allocates a tensor from nothing")
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
                t.dtype == torch.bool for t in inputs[1:]):
            self.problems.append(f"{func}: boolean indexing (data-dependent shape)")
        self.trace.append((str(func), [tuple(t.shape) for t in outputs]))
        return out


def record(step, n):
    with StepRecorder() as rec:
        step(n)
    return rec


def join_lanes(fast, count, start=3):
    row, mask = prompt()
    for lane in range(count):
        fast.state.set_lane(lane, row[-1], mask[-1], start + 7 * lane, list(range(4 * lane, 4 * lane + 4)),
                            seed=lane, temperature=0.9 if lane % 2 else 0.0, topk=50)


def test_the_recorder_catches_what_capture_forbids():
    x = torch.ones(3)
    assert record(lambda n: x.sum().item(), 1).problems  # a sync
    assert record(lambda n: torch.zeros(n), 1).problems  # from nothing
    assert record(lambda n: x + torch.tensor([1.0, 2.0, 3.0]), 1).problems  # from host data
    assert record(lambda n: x[x > 0], 1).problems  # data-dependent shape
    assert not record(lambda n: (x * 2).sum(), 1).problems


@pytest.mark.parametrize("backbone", [True, False], ids=["frame", "depth-only"])
@pytest.mark.parametrize("n", [1, 4])
def test_frame_step_is_capturable_after_warm_up(n, backbone):
    engine = Engine(make_model(), EngineConfig(max_batch=4, num_blocks=32))  # warms up the step
    fast = engine.runner
    step = lambda n: fast.decode_frame(n, backbone)  # noqa: E731
    join_lanes(fast, n)
    first = record(step, n)
    assert not first.problems, "\n".join(first.problems[:10])
    join_lanes(fast, n, start=40)  # other positions, seeds and blocks: the same ops and shapes
    fast.state.clear_lane(n - 1)
    second = record(step, n)
    assert not second.problems
    assert second.trace == first.trace
    engine.close()


def test_frame_step_runs_on_tensors_without_data():
    """On the meta device every tensor value is unknown: .item(), .tolist(), .cpu(), numpy and
    Python `if` on a tensor all fail, so passing proves the step never looks at a value."""
    with torch.device("meta"):
        model = CSMModel(PRESETS["tiny"])
    fast = ModelRunner(model, TorchOps(), max_batch=4, block_size=16, num_blocks=16)
    assert fast.state.codes.is_meta
    for n in (1, 3):
        fast.decode_frame(n)
        fast.decode_frame(n, backbone=False)


# ---- prefill: eager, but no host-to-device copy per layer -------------------------------------------
@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_prefill_copies_host_data_once_per_call_not_per_layer(ops):
    """On CUDA every tensor made from host data is a copy that stalls the host; a prefill chunk makes
    its metadata once (PrefillChunk), whatever the depth: 2 and 6 backbone layers make as many."""
    from dataclasses import replace

    from misotts.engine.ops import make_ops

    frames, mask = prompt()
    made = []
    for layers in (2, 6):
        config = replace(PRESETS["tiny"], backbone=replace(PRESETS["tiny"].backbone, n_layers=layers))
        runner = ModelRunner(make_model(config), make_ops(ops, torch.device("cpu")), max_batch=2, block_size=16,
                             num_blocks=8)
        with StepRecorder() as rec:
            runner.prefill(frames, mask, 0, [3, 1])
        made.append(sum("lift_fresh" in op for op, _ in rec.trace))
    assert made == [1, 1]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts launches in Triton's interpreter")
def test_warm_up_launches_every_kernel_a_request_launches(monkeypatch):
    """So the first request pays no JIT: every Triton kernel that prefill (a cached prefix included)
    and the frames launch was launched once by the engine's construction."""
    from triton.runtime.interpreter import InterpretedFunction

    launched, run = [], InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launched.append(self.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    engine = Engine(make_model(), EngineConfig(max_batch=2, num_blocks=32, ops="triton", pipelined=False))
    at_load = set(launched)
    launched.clear()
    frames, mask = prompt("a prompt long enough to fill a block of sixteen positions and then some")
    for _ in range(2):  # the second run reuses the cached prefix
        generate(engine, frames, mask, 2, stop_on_eos=False, temperature=0.9, seed=1)
    engine.close()
    assert {"_prefill_kernel", "_rmsnorm_kernel"} <= set(launched)  # the recording sees the request's kernels
    assert set(launched) <= at_load, f"first launched by a request: {set(launched) - at_load}"
