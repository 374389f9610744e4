"""The steady-state throughput window, per-stream gaps, the real-time search and the first-audio
breakdown, on synthetic arrivals, pass/fail functions and RequestStats (no timings asserted)."""
import math
import threading
import time

import pytest

from misotts.bench import run
from misotts.bench.load import reader_backlog, steady_run, ttfa_under_load
from misotts.bench.rt_search import max_passing
from misotts.bench.stats import (format_first_audio, gap_p99_ms, median_parts, window_count, window_gaps,
                                 window_rate)
from misotts.runtime.frames import Frame, RequestStats

NAN = float("nan")


# ---- the window ---------------------------------------------------------------------------------

def test_window_count_leaves_out_the_ramp_and_the_ramp_down():
    # stream 0 started early (ramp frames at 0.1, 0.2), stream 1's first frame at 0.3 starts the window
    arrivals = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 1.0], [0.3, 0.45, 0.6, 1.1]]
    assert window_count(arrivals, 0.3, 0.6) == 2 + 2  # (0.3, 0.6]: 0.4, 0.5 and 0.45, 0.6
    assert window_rate(arrivals, 0.3, 0.6) == pytest.approx(4 * 0.08 / 0.3)
    assert window_count(arrivals, 0.3, 1.0) == 4 + 2


def test_window_gaps_include_the_frame_before_and_the_gap_open_at_the_end():
    arrivals = [0.0, 0.1, 0.15, 0.35, 0.4]
    assert window_gaps(arrivals, 0.12, 0.5) == pytest.approx([0.05, 0.2, 0.05, 0.1])
    # a stream stalled through the whole window still shows its gap
    assert window_gaps([0.0, 0.1], 0.2, 0.5) == pytest.approx([0.4])
    assert window_gaps([], 0.2, 0.5) == []


def test_gap_p99_of_known_gaps():
    # gaps 9 x 10 ms, then 100 ms, then 0 open at t1: sorted [0, 10 x 9, 100], p99 at 9.9 of 0..10
    arrivals = [i * 0.01 for i in range(10)] + [0.19]
    assert gap_p99_ms(arrivals, 0.0, 0.19) == pytest.approx(10 + 0.9 * (100 - 10))
    assert gap_p99_ms([i * 0.04 for i in range(50)], 0.0, 49 * 0.04) == pytest.approx(40)
    assert math.isnan(gap_p99_ms([], 0.0, 1.0))


# ---- the search ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [1, 7, 8, 64, 100])
@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 5, 8, 13, 37, 64, 200])
def test_search_finds_the_largest_passing_load_within_its_bound(threshold, cap):
    tried = []

    def passes(n):
        assert 1 <= n <= cap and n not in tried  # in range, never the same load twice
        tried.append(n)
        return n <= threshold

    bound = 2 * math.ceil(math.log2(cap)) + 1  # doubling then bisection
    found = max_passing(passes, cap, max_tries=bound)
    assert found.n == min(threshold, cap) and found.exact and not found.stopped
    assert found.first_fail == (threshold + 1 if threshold < cap else None)
    assert len(tried) <= bound and [n for n, _ in found.tried] == tried


def test_search_starts_from_known_loads_and_stops_at_its_bounds():
    tried = []
    passes = lambda n: tried.append(n) or n <= 8  # noqa: E731
    found = max_passing(passes, 64, 10, known={1: True, 4: True, 16: False, 64: False})
    assert found.n == 8 and found.exact and tried == [10, 7, 8, 9]  # bisection between 4 and 16 only
    tried.clear()
    found = max_passing(passes, 64, 2)
    assert (found.n, found.exact, found.stopped, tried) == (2, False, "tries", [1, 2])
    tried.clear()
    found = max_passing(passes, 64, 10, out_of_time=lambda: len(tried) >= 3)
    assert (found.n, found.exact, found.stopped) == (4, False, "time") and tried == [1, 2, 4]


# ---- the first-audio breakdown --------------------------------------------------------------------

def stats(admitted, written, first, audio, received):
    return RequestStats(wait_s=admitted, prompt_written_s=written, first_frame_s=first, audio_ready_s=audio,
                        received_s=received)


def test_first_audio_medians_and_printing():
    runs = [stats(0.0001, 0.012, 0.039, 0.0412, 0.0414), stats(0.0003, 0.014, 0.045, 0.047, 0.0475),
            stats(0.0002, 0.010, 0.037, 0.040, 0.0401)]
    parts = median_parts([s.first_audio_ms() for s in runs])
    assert parts["queue"] == pytest.approx(0.2)
    assert parts["prefill"] == pytest.approx(11.9)  # of 11.9, 13.7, 9.8
    assert parts["first_frame"] == pytest.approx(27.0)  # 27.0, 31.0, 27.0
    assert parts["total"] == pytest.approx(41.4)
    assert format_first_audio(parts) == ("first audio 41.4 ms = queue 0.2 + prefill 11.9 + first frame 27.0 + "
                                         "audio 2.2 + hand-off 0.2")


def test_parts_not_yet_marked_print_as_a_dash():
    runs = [stats(NAN, NAN, 0.030, NAN, 0.031), stats(0.001, NAN, 0.040, NAN, 0.041)]
    parts = median_parts([s.first_audio_ms() for s in runs])
    assert parts["queue"] == pytest.approx(1.0)  # the one stream that has it
    assert math.isnan(parts["prefill"]) and math.isnan(parts["audio_decode"])
    assert format_first_audio(parts) == ("first audio 36.0 ms = queue 1.0 + prefill - + first frame - + "
                                         "audio - + hand-off -")


# ---- the loads, on stand-in streams -------------------------------------------------------------

class FakeStream:
    """Frames every `period` s up to `frames`, until cancelled; marks received_s as the engine's does."""

    def __init__(self, frames, period=0.001, delay=0.0):
        self.frames, self.period, self.delay = frames, period, delay
        self.stats, self.cancelled, self.made = RequestStats(), threading.Event(), 0
        self.submitted = time.perf_counter()

    def cancel(self):
        self.cancelled.set()

    def __iter__(self):
        time.sleep(self.delay)
        for _ in range(self.frames):
            if self.cancelled.wait(self.period):
                return
            self.made += 1
            if math.isnan(self.stats.received_s):
                self.stats.received_s = time.perf_counter() - self.submitted
            yield Frame(None, None)


def test_steady_run_counts_every_stream_in_the_window_and_cancels_them():
    streams = []
    submit = lambda i: streams.append(FakeStream(10_000, delay=0.002 * i)) or streams[-1]  # noqa: E731
    out = steady_run(submit, 4, window_frames=5, timeout=30)
    assert all(s.cancelled.is_set() and s.made < 10_000 for s in streams)
    assert out["frames"] >= 4 * 5 and out["window_s"] > 0 and len(out["gap_p99_ms"]) == 4
    assert out["audio_s_per_s"] == pytest.approx(out["frames"] * 0.08 / out["window_s"])
    assert out["reader_backlog_frames"] == 0  # the stand-ins hand out frames only as they are read


def test_reader_backlog_is_frames_handed_out_and_not_taken():
    stream = FakeStream(1)
    stream.stats.frames = 7
    assert reader_backlog(stream, 5) == 2 and reader_backlog(stream, 7) == 0 and reader_backlog(object(), 3) == 0


def test_steady_run_refuses_streams_that_end_inside_the_window():
    with pytest.raises(RuntimeError, match="ended inside the steady window"):
        steady_run(lambda i: FakeStream(3), 2, window_frames=5, timeout=30)


def test_arrivals_are_timed_one_by_one_into_the_background():
    streams = []
    submit = lambda i: streams.append(FakeStream(10_000)) or streams[-1]  # noqa: E731
    out = ttfa_under_load(submit, background=2, probes=3, timeout=30)
    assert len(streams) == 5 and all(s.cancelled.is_set() for s in streams)
    assert len(out["ttfa_ms"]) == 3 and len(out["first_audio_ms"]) == 3 and len(out["background_gap_p99_ms"]) == 2
    assert out["ttfa_p50_ms"] == pytest.approx(sorted(out["ttfa_ms"])[1])


# ---- the bench's use of them --------------------------------------------------------------------

class StaticBatch:
    def batch(self, wl, streams, frames, seed):
        return [0.5, 0.6, 0.7, 0.8]  # prefill to 0.5, then a frame every 100 ms


def test_static_batch_throughput_leaves_out_the_first_frame():
    r = run.throughput_run(StaticBatch(), None, 4, run.Plan(), 0)
    assert r["method"] == "static batch" and r["frames"] == 4 * 3
    assert r["audio_s_per_s"] == pytest.approx(4 * 3 * 0.08 / 0.3)
    assert r["worst_gap_p99_ms"] == pytest.approx(100)


class SteadyEngine:
    """Every stream's worst gap is 10 ms per stream: real time (<= 80 ms) up to 8 streams."""

    max_streams = 64

    def __init__(self):
        self.loads, self.arrived = [], None

    def steady(self, wl, n, window_frames, frames, seed):
        self.loads.append(n)
        return {"audio_s_per_s": n * 1.0, "frames": n * window_frames, "window_s": 1.0, "ramp_s": 0.1,
                "gap_p99_ms": [10.0 * n] * n, "worst_gap_p99_ms": 10.0 * n}

    def arrivals(self, wl, background, probes, frames, seed):
        self.arrived = (background, probes)
        parts = [stats(0.0, 0.01, 0.02, 0.021, 0.0212).first_audio_ms()] * probes
        return {"ttfa_ms": [20.0] * probes, "ttfa_p50_ms": 20.0, "ttfa_p99_ms": 20.0, "first_audio_ms": parts,
                "background_gap_p99_ms": [70.0] * background, "arrivals": probes, "background": background}


def test_realtime_search_in_the_bench_uses_the_throughput_levels():
    system, plan = SteadyEngine(), run.Plan(repeats=1, streams=(1, 4, 16), ttfa_arrivals=5)
    levels = {str(n): run.summarize_level([{"method": "steady", **system.steady(None, n, 4, 0, 0)}])
              for n in plan.streams}
    system.loads.clear()
    out = run.realtime_streams(system, None, plan, 0, levels, lambda msg: None)
    assert out["streams"] == 8 and out["exact"] and out["first_fail"] == 9
    assert system.loads == [10, 7, 8, 9]  # between the levels 4 (pass) and 16 (fail)
    assert out["gap_p99_ms"] == [80.0] * 8 and system.arrived == (7, 5)
    assert out["ttfa_p50_ms"] == 20.0 and out["first_audio_ms"]["prefill"] == pytest.approx(10.0)


def test_with_no_load_real_time_arrivals_are_timed_into_an_idle_engine():
    system = SteadyEngine()
    system.steady = lambda wl, n, w, f, s: {"worst_gap_p99_ms": 200.0, "gap_p99_ms": [200.0] * n}  # never real time
    levels = {"1": run.summarize_level([{"method": "steady", "audio_s_per_s": 1.0, "window_s": 1.0, "ramp_s": 0.1,
                                         "worst_gap_p99_ms": 200.0, "gap_p99_ms": [200.0]}])}
    out = run.realtime_streams(system, None, run.Plan(streams=(1,), ttfa_arrivals=2), 0, levels, lambda msg: None)
    assert out["streams"] == 0 and out["exact"] and out["tried"] == [] and "gap_p99_ms" not in out
    assert system.arrived == (0, 2) and out["background"] == 0


class CutOffEngine(SteadyEngine):
    """Streams of made-up times; the search's first try dies (a step's time limit, say)."""

    last_stats = None

    def stream(self, wl, frames, seed, audio):
        self.last_stats = stats(0.0, 0.01, 0.02, 0.021, 0.0212)
        return [0.02 + 0.01 * i for i in range(frames)], None

    def steady(self, wl, n, window_frames, frames, seed):
        if n not in (1, 4):
            raise KeyboardInterrupt
        return super().steady(wl, n, window_frames, frames, seed)


def test_measure_saves_what_it_has_before_a_cut_off():
    import torch

    saved, out = [], {}
    plan = run.Plan(frames=3, repeats=2, streams=(1, 4), workloads=("short",))
    with pytest.raises(KeyboardInterrupt):  # the search's doubling tries 8
        run.measure(CutOffEngine(), {"short": None}, plan, 0, torch.device("cpu"), lambda msg: None, out,
                    lambda: saved.append(json_copy(out)))
    assert [sorted(s["throughput"]) for s in saved] == [[], ["1"], ["1", "4"]]
    assert saved[-1]["short"]["ttfa_ms"] == pytest.approx(20) and saved[-1]["short"]["first_audio_ms"]["total"] == \
        pytest.approx(21.2)
    assert saved[-1]["throughput"]["4"]["audio_s_per_s"] == 4.0 and len(saved[-1]["throughput"]["4"]["runs"]) == 2


def json_copy(d):
    import json

    return json.loads(json.dumps(d))
