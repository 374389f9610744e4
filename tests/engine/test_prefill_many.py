"""The varlen prefill: several sequences' chunks in one call write the same KV and give the same
last hidden states as each chunk alone (fp32; torch references and the Triton kernels interpreted)."""
import pytest
import torch

from misotts.engine.model_runner import ModelRunner
from misotts.engine.ops import make_ops

from .conftest import make_model, prompt


@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_one_call_for_three_chunks_equals_three_calls(ops):
    model = make_model()
    a, b, c = prompt("A first prompt of some length."), prompt("Short.", 1), prompt("A third, with more words in it.", 2)
    # a: all of it; b: positions 16.. of a sequence whose first block was written before; c: one row
    chunks = [(*a, 0, [0, 1, 2]), (b[0][:5], b[1][:5], 16, [3, 4]), (c[0][:1], c[1][:1], 0, [5])]

    def run(calls):
        runner = ModelRunner(model, make_ops(ops, torch.device("cpu")), max_batch=2, block_size=16, num_blocks=8)
        g = torch.Generator().manual_seed(0)  # the "earlier" block 3 of b, and noise everywhere else
        runner.kv.kv.copy_(torch.randn(runner.kv.kv.shape, generator=g))
        hidden = torch.cat([runner.prefill_many(call) for call in calls])
        return hidden, runner.kv.kv.clone()

    together, kv_together = run([chunks])
    alone, kv_alone = run([[chunk] for chunk in chunks])
    # the same math; rows packed differently can change a GEMM's blocking, hence a tolerance of
    # fp32 rounding over the tiny model's layers, not bit equality
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_together, kv_alone, rtol=1e-5, atol=1e-5)
    # and the chunks' hidden states differ from each other (the test can tell them apart)
    assert not torch.allclose(together[0], together[1], atol=1e-3)
