"""engine/mimi_state.py: the one adapter to moshi's streaming states fails loudly on states it
does not know (a moshi that changed them), and its lane views and moves act on the real states."""
import pytest
import torch
from moshi.modules.transformer import RingKVCache

from misotts.engine import mimi_state
from misotts.runtime.codec import load_codec


@pytest.fixture(scope="module")
def codec():
    return load_codec(None)


@pytest.fixture
def states(codec):
    with codec.mimi.streaming(3):
        yield mimi_state.states(codec.mimi)


def test_the_installed_moshis_states_are_the_layout_the_adapter_knows(states):
    mimi_state.check_layout(states)  # raises on anything else
    kinds = {type(v) for s in states.values() for v in vars(s).values()}
    assert RingKVCache in kinds and torch.Tensor in kinds  # the two kinds a lane view slices


def _a_state_with(states, kind):
    return next((name, s) for name, s in states.items() if any(isinstance(v, kind) for v in vars(s).values()))


@pytest.mark.parametrize("change, named", [
    (lambda s: setattr(s, "lane_notes", ["a list"]), "lane_notes"),  # a new kind of field
    (lambda s: setattr(s, "table", torch.zeros(5, 3)), "table"),  # a tensor not batch-first (batch is 3)
])
def test_a_state_field_of_an_unknown_kind_is_refused_by_name(states, change, named):
    name, state = _a_state_with(states, torch.Tensor)
    change(state)
    with pytest.raises(RuntimeError, match=f"{named}.*moshi 0.2.13"):
        mimi_state.check_layout(states)


def test_a_ring_kv_cache_of_another_layout_is_refused(states):
    name, state = _a_state_with(states, RingKVCache)
    kv = next(v for v in vars(state).values() if isinstance(v, RingKVCache))
    kv.end_offset = kv.end_offset[:1]  # no longer one per lane
    with pytest.raises(RuntimeError, match="end_offset"):
        mimi_state.check_layout(states)


def test_lane_views_share_the_states_rows_and_moves_copy_every_per_lane_field(states):
    name, state = _a_state_with(states, RingKVCache)
    kv = next(v for v in vars(state).values() if isinstance(v, RingKVCache))
    view, _ = mimi_state.lane_view(state, 2)
    view_kv = next(v for v in vars(view).values() if isinstance(v, RingKVCache))
    assert view.batch_size == 2 and view_kv.cache.shape[1] == 2
    view_kv.end_offset[1] = 77  # a write through the view lands in the full state's row 1
    assert kv.end_offset[1] == 77
    kv.cache[:, 0].fill_(1.5)
    mimi_state.move_lane(state, 0, 2)
    assert kv.end_offset[2] == kv.end_offset[0] and torch.all(kv.cache[:, 2] == 1.5)
