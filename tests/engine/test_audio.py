"""The engine's audio decode (`misotts.engine.audio.LaneDecoder`) against solo streaming decoders."""
import pytest
import torch

from misotts.engine import audio
from misotts.engine.audio import LaneDecoder, mimi_buckets, smallest_bucket
from misotts.runtime.codec import load_codec

FRAME = 1920


@pytest.fixture(scope="module")
def codec():
    return load_codec(None)


def random_codes(frames, seed=0):
    return torch.randint(0, 2048, (frames, 32), generator=torch.Generator().manual_seed(seed))


def solo_stream(codec, codes):
    with codec.stream_decoder(1) as decoder:
        return torch.cat([decoder.decode_frame(c[None])[0] for c in codes])


def join_leave_move(lanes, a, b):
    """On any LaneDecoder: lane 0 alone, lane 1 joins, lane 0 leaves and lane 1
    moves to lane 0.  Returns each stream's audio."""
    got_a, got_b = [], []
    lanes.reset(0)
    for f in range(4):
        if f == 2:
            lanes.reset(1)
        pcm = lanes.decode(torch.stack([a[f], b[f - 2]]) if f >= 2 else a[f][None]).clone()
        got_a.append(pcm[0])
        if f >= 2:
            got_b.append(pcm[1])
    lanes.move(1, 0)
    got_b += [lanes.decode(b[f][None])[0].clone() for f in (2, 3)]
    return torch.cat(got_a), torch.cat(got_b)


def test_lane_decoder_lanes_join_leave_and_move_like_solo_streams(codec):
    """Lane 0 starts alone, lane 1 joins at frame 2 (batch 2), lane 0 leaves at frame 4 and lane 1's
    state moves to lane 0 (batch 1 again): each stream's audio is its solo stream's."""
    a, b = random_codes(4, seed=1), random_codes(4, seed=2)
    want_a, want_b = solo_stream(codec, a), solo_stream(codec, b)
    lanes = LaneDecoder(codec, max_batch=4)
    got_a, got_b = join_leave_move(lanes, a, b)
    # Batch size changes the float rounding a little (measured 9e-8); one code of one codebook
    # changed moves the untrained Mimi's audio by > 0.01 (tests/runtime/test_codec.py), far above
    # the tolerance: decoding with codebook 31 off by one in every frame fails this test.
    torch.testing.assert_close(got_a, want_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=1e-6)
    # Without a reset a reused lane carries the last stream's state: the audio differs.
    stale = torch.cat([lanes.decode(a[f][None])[0] for f in range(2)])
    assert (stale - want_a[:2 * FRAME]).abs().max() > 1e-5
    lanes.close()


def test_mimi_buckets_are_powers_of_two_to_8_then_multiples_of_8_and_max_batch():
    assert mimi_buckets(1) == [1]
    assert mimi_buckets(3) == [1, 2, 3]
    assert mimi_buckets(8) == [1, 2, 4, 8]
    assert mimi_buckets(12) == [1, 2, 4, 8, 12]
    assert mimi_buckets(16) == [1, 2, 4, 8, 16]
    assert mimi_buckets(17) == [1, 2, 4, 8, 16, 17]
    assert mimi_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert [smallest_bucket(mimi_buckets(64), n) for n in (1, 3, 5, 9, 17, 33, 64, 65)] == [1, 4, 8, 16, 24, 40, 64,
                                                                                             None]


def test_lane_decoder_decodes_exactly_the_live_lanes_like_solo_streams(codec):
    """n live lanes in one call (n a bucket or not), two frames: each lane's audio is its solo
    stream's (same tolerance as above: batch size only moves float rounding), and the call returns
    exactly n rows."""
    lanes = LaneDecoder(codec, max_batch=12)
    for n in (1, 3, 5, 8):
        streams = [random_codes(2, seed=10 * n + lane) for lane in range(n)]
        for lane in range(n):
            lanes.reset(lane)
        got = [lanes.decode(torch.stack([s[f] for s in streams])).clone() for f in range(2)]
        assert got[0].shape == (n, FRAME) and got[0].dtype == torch.float32
        for lane, codes in enumerate(streams):
            torch.testing.assert_close(torch.cat([pcm[lane] for pcm in got]), solo_stream(codec, codes),
                                       rtol=0, atol=1e-6)
    lanes.close()


class ReplayedEagerly:
    """A captured graph's stand-in on the CPU: replay() reruns the captured step at its batch size
    into the same output tensor (as a replay rewrites the graph's output)."""

    def __init__(self, step, b):
        self.step, self.b = step, b
        self.out = step(b).clone()

    def replay(self):
        self.out.copy_(self.step(self.b))


def capture_eagerly(step, buckets, device=None, on_bucket=None):
    """`graphs.capture_buckets` with `ReplayedEagerly` for graphs."""
    return {b: (graph, graph.out) for b in sorted(buckets, reverse=True) for graph in [ReplayedEagerly(step, b)]}


LIVE = (3, 5, 3, 1)  # live lanes per frame: lanes 3 and 4 join at frame 1, then leave; lanes 1 and 2 at frame 3


def decode_live(lanes, codes, live):
    """Frame f decodes codes[f, :live[f]]; a lane that joins is reset first (as the engine does).
    Returns each frame's audio."""
    out = []
    for f, n in enumerate(live):
        for lane in range(live[f - 1] if f else 0, n):
            lanes.reset(lane)
        out.append(lanes.decode(codes[f, :n]).clone())
    return out


def test_lane_decoder_replays_the_smallest_mimi_bucket_and_returns_the_live_lanes(codec, monkeypatch):
    """The graph path on the CPU (graphs replaced by eager replays of the same step): capture()
    takes mimi_buckets(max_batch); n live lanes replay the smallest bucket >= n, with padding rows
    fed code 0 (not the last frame's codes), and return n rows equal to an eager decoder's that
    runs exactly the n lanes (lanes that join are reset, as the engine does)."""
    monkeypatch.setattr(audio, "capture_buckets", capture_eagerly)
    graphed, eager = LaneDecoder(codec, max_batch=12), LaneDecoder(codec, max_batch=12)
    assert graphed.bucket(3) == 3  # nothing captured yet: exactly the live lanes
    graphed.capture()
    assert graphed.buckets == [1, 2, 4, 8, 12] and sorted(graphed._graphs) == graphed.buckets
    assert [graphed.bucket(n) for n in (1, 3, 4, 5, 9, 12)] == [1, 4, 4, 8, 12, 12]
    assert eager.bucket(3) == 3 and eager.buckets == [1, 2, 4, 8, 12]
    seen = []  # the codes each decode step ran on (the captured step reads them at replay)
    step = graphed._decode
    graphed._decode = lambda codes: (seen.append(codes.clone()), step(codes))[1]
    codes = random_codes(12 * 4, seed=7).view(4, 12, 32)
    got, want = decode_live(graphed, codes, LIVE), decode_live(eager, codes, LIVE)
    for f, n in enumerate(LIVE):
        assert got[f].shape == (n, FRAME)
        # the same step at another batch size: float rounding only (as above)
        torch.testing.assert_close(got[f], want[f], rtol=0, atol=1e-6)
        assert torch.equal(seen[f][:n], codes[f, :n]) and not seen[f][n:].any()
    assert [ran.shape[0] for ran in seen] == [4, 8, 4, 1]  # the buckets replayed
    graphed.close()
    eager.close()


# ---- CUDA: the decode captured as one graph per Mimi bucket -----------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lane_decoder_graphs_replay_like_eager_and_solo_on_cuda():
    """Replayed graphs give the eager decode's audio (the same kernels: 1e-6 covers any reordering
    within them; passed on an H200), and each lane's audio is its own stream's (a one-lane decoder
    per stream)."""
    codec = load_codec(None, device="cuda")
    a, b = random_codes(4, seed=1).cuda(), random_codes(4, seed=2).cuda()
    graphed = LaneDecoder(codec, max_batch=4)
    with torch.inference_mode():  # as the bench calls it: the graphs' input must stay a plain tensor
        graphed.capture([1, 2, 4])
    assert sorted(graphed._graphs) == [1, 2, 4]
    got = join_leave_move(graphed, a, b)
    want = join_leave_move(LaneDecoder(codec, max_batch=4), a, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    for g, codes in zip(got, (a, b)):
        solo = LaneDecoder(codec, max_batch=1)
        solo.reset(0)
        # cuDNN picks conv kernels (tf32 by default) by batch size: up to 1.7e-4 measured on an H200
        # (audio RMS ~0.14), so 0.5% of the RMS; different codes move it by half its RMS.
        want = torch.cat([solo.decode(c[None])[0] for c in codes])
        torch.testing.assert_close(g, want, rtol=0, atol=5e-3 * want.pow(2).mean().sqrt().item())
    graphed.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lane_decoder_replays_mimi_buckets_for_live_lanes_on_cuda():
    """capture() records mimi_buckets(12); live lane counts that are not buckets (3, 5) replay the
    next bucket up and return the live lanes' audio: an eager decoder's of exactly those lanes."""
    codec = load_codec(None, device="cuda")
    graphed, eager = LaneDecoder(codec, max_batch=12), LaneDecoder(codec, max_batch=12)
    graphed.capture()
    assert graphed.buckets == [1, 2, 4, 8, 12] and sorted(graphed._graphs) == graphed.buckets
    codes = random_codes(12 * 4, seed=7).view(4, 12, 32).cuda()
    got, want = decode_live(graphed, codes, LIVE), decode_live(eager, codes, LIVE)
    for g, w, n in zip(got, want, LIVE):
        assert g.shape == (n, FRAME)
        # other batch sizes: cuDNN's kernels differ (see above)
        torch.testing.assert_close(g, w, rtol=0, atol=5e-3 * w.pow(2).mean().sqrt().item())
    graphed.close()
    eager.close()
