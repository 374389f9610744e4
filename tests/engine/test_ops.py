"""The op-set contract: both op sets implement every method `OpSet` names, and make_ops picks by device."""
import pytest
import torch

from misotts.engine.ops import OpSet, TorchOps, TritonOps, make_ops


@pytest.mark.parametrize("ops", [TorchOps(), TritonOps()], ids=["torch", "triton"])
def test_op_sets_implement_the_contract(ops):
    assert isinstance(ops, OpSet)
    methods = [name for name, value in vars(OpSet).items() if callable(value) and not name.startswith("_")]
    assert len(methods) == 10
    assert [name for name in methods if not callable(getattr(ops, name, None))] == []
    assert isinstance(ops.fused_rows, int) and ops.fused_rows >= 0


def test_make_ops_by_device_and_name():
    assert isinstance(make_ops("auto", torch.device("cpu")), TorchOps)
    assert isinstance(make_ops("auto", torch.device("meta")), TorchOps)
    assert isinstance(make_ops("triton", torch.device("cpu")), TritonOps)
    with pytest.raises(ValueError, match="unknown ops"):
        make_ops("cuda", torch.device("cpu"))


def test_an_incomplete_op_set_is_not_an_op_set():
    class Half:
        name, fused_rows = "half", 0

        def embed(self, *args): ...

    assert not isinstance(Half(), OpSet)
