"""A padding lane (a bucket's lanes past the running requests) stays at position 0: its attention reads one
position of the scratch block, not a context that grows by one every frame toward max_seq_len."""
import torch

from misotts.engine.model_runner import ModelRunner
from misotts.engine.ops import TorchOps

from .conftest import make_model


def test_padding_lanes_stay_at_position_zero_and_requests_advance():
    runner = ModelRunner(make_model(), TorchOps(), max_batch=4, block_size=16, num_blocks=16)
    st = runner.state
    st.set_lane(0, 5, True, 7, [1], seed=3, temperature=0.9, topk=50)
    st.set_lane(2, 9, True, 20, [2, 3], seed=4, temperature=0.9, topk=50)
    st.clear_lane(1)
    st.clear_lane(3)
    for _ in range(3):
        runner.decode_frame(4)
    assert st.positions.tolist() == [10, 0, 23, 0]
    assert st.active.tolist() == [1, 0, 1, 0]
    st.move_lane(2, 1)  # a request moved down keeps counting; the lane it left is cleared
    st.clear_lane(2)
    runner.decode_frame(4)
    assert st.positions.tolist() == [11, 24, 0, 0]
    assert st.active.tolist() == [1, 1, 0, 0]
