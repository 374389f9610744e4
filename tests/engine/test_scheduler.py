"""The scheduler alone, with no engine and no device: it returns data -- a Plan, the joins, the
frames and ends in its outbox -- and never calls anything back."""
import torch

from misotts.engine.kv_cache import BlockPool, block_keys
from misotts.engine.requests import Request
from misotts.engine.scheduler import Chunk, Plan, Scheduler
from misotts.runtime.frames import Frame

from .conftest import params, prompt

BS = 16


def request(rows: int, max_frames: int = 3, **settings) -> Request:
    frames, mask = prompt()
    frames, mask = frames[:rows], mask[:rows]
    return Request(frames, mask, params(max_frames, **settings), False, block_keys(frames[:-1], mask[:-1], BS))


def scheduler(max_batch=2, prefill_chunk=512) -> Scheduler:
    return Scheduler(BlockPool(64, BS), max_batch, max_waiting=8, wait_timeout_s=30.0, prefill_chunk=prefill_chunk)


def test_a_plan_is_data_chunks_in_order_within_the_budget():
    s = scheduler(prefill_chunk=20)
    a, b = request(17), request(9)
    s.enqueue(a), s.enqueue(b)
    s.admit()
    plan = s.schedule()
    # a: all 17 positions (its last row too: the first frame starts from its hidden state), then
    # b gets the 3 left of the budget
    assert plan == Plan([], [], [Chunk(a, 0, 17), Chunk(b, 0, 3)])
    assert s.prefilled(plan, failed={}) == [(0, a)]  # a's prompt is written: it joins lane 0
    assert (a.prefilled, b.prefilled, s.lanes, s.prefilling) == (17, 3, [a], [b])
    assert s.schedule().prefill == [Chunk(b, 3, 9)]


def test_a_failed_chunk_fails_its_request_alone_and_the_next_joins_lane_0():
    s = scheduler()
    a, b = request(9), request(10)
    s.enqueue(a), s.enqueue(b)
    s.admit()
    plan = s.schedule()
    boom = RuntimeError("boom")
    assert s.prefilled(plan, failed={a: boom}) == [(0, b)]
    assert s.take_outbox() == [(a, boom)] and a.stats.finish == "error" and not a.blocks


def test_frames_and_ends_go_to_the_outbox_and_leaving_lanes_become_the_next_plans_moves():
    s = scheduler()
    a, b = request(9, max_frames=1), request(9, max_frames=5)
    for r in (a, b):
        s.enqueue(r)
    s.admit()
    assert s.prefilled(s.schedule(), failed={}) == [(0, a), (1, b)]
    codes = torch.arange(2 * 32).view(2, 32) + 1  # no all-zero frame
    s.postprocess([a, b], codes, None)
    out = s.take_outbox()
    assert [(r, type(item)) for r, item in out] == [(a, Frame), (b, Frame), (a, type(None))]
    assert torch.equal(out[0][1].codes, codes[0]) and a.stats.finish == "max_frames"
    # a left lane 0: b's state moves there and lane 1 is cleared, in the next plan (not before)
    assert s.lanes == [b] and s.schedule() == Plan([(1, 0)], [1], [])
    s.postprocess([b], torch.zeros(1, 32, dtype=torch.long), None)  # b's end of speech
    assert s.take_outbox() == [(b, None)] and b.stats.finish == "eos"
    assert s.schedule() == Plan([], [0], []) and not s.working()


def test_a_failed_step_clears_every_lane_in_the_next_plan():
    s = scheduler(max_batch=3)
    a = request(9)
    s.enqueue(a)
    s.admit()
    s.prefilled(s.schedule(), failed={})
    err = RuntimeError("device fault")
    s.drop_in_flight(err)
    assert s.take_outbox() == [(a, err)] and s.lanes == [] and s.pool.all_free()
    assert s.working() and s.schedule() == Plan([], [0, 1, 2], [])


def test_a_frame_read_after_its_requests_ended_hands_out_only_the_live_ones():
    """Pipelined, frame t+1 is enqueued before frame t is read: when frame t ends a request, frame
    t+1 (enqueued with the old lanes) still holds a row for it, which is skipped; the lanes that
    moved since are found by request, not by index."""
    s = scheduler()
    a, b = request(9, max_frames=1), request(9, max_frames=5)
    for r in (a, b):
        s.enqueue(r)
    s.admit()
    s.prefilled(s.schedule(), failed={})
    lanes_t = lanes_t1 = list(s.lanes)  # frames t and t+1 both enqueued with lanes [a, b]
    codes_t, codes_t1 = torch.arange(64).view(2, 32) + 1, torch.arange(64).view(2, 32) + 100
    s.postprocess(lanes_t, codes_t, None)  # a ends (max_frames): b moves to lane 0 next plan
    s.take_outbox()
    s.postprocess(lanes_t1, codes_t1, None)
    out = s.take_outbox()
    assert [(r, type(item)) for r, item in out] == [(b, Frame)] and torch.equal(out[0][1].codes, codes_t1[1])
    assert len(a.generated) == 1 and len(b.generated) == 2 and b.stats.frames == 2
