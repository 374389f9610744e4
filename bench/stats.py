"""The metrics math: percentiles, and what a stream's arrival times say.

A stream is measured as the times (seconds after the call) at which each frame's output -- codes,
or PCM -- reached the host, one entry per frame.  A batch run is measured by its wall time.
"""
from __future__ import annotations

from misotts.runtime.audio import FRAME_S


def percentile(xs, q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between order statistics (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(xs) -> float:
    return percentile(xs, 50)


def stream_metrics(arrivals) -> dict:
    """first_ms: the first frame; frame_ms / frame_p90_ms: gaps between later frames;
    rtf: wall time over the audio's duration (the first frame's wait included)."""
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {
        "frames": len(arrivals),
        "first_ms": arrivals[0] * 1e3 if arrivals else float("nan"),
        "frame_ms": median(gaps) * 1e3,
        "frame_p90_ms": percentile(gaps, 90) * 1e3,
        "rtf": arrivals[-1] / (len(arrivals) * FRAME_S) if arrivals else float("nan"),
    }


def throughput(streams: int, frames: int, wall_s: float) -> float:
    """Aggregate audio seconds made per wall second."""
    return streams * frames * FRAME_S / wall_s


# ---- steady state: a window of a running load ------------------------------------------------------
# Every stream is measured as the times (seconds, one clock for all) at which its reader took each
# frame.  The window (t0, t1] is half-open: t0 is itself an arrival (the last stream's first frame),
# which ends the ramp, so the frames counted are those made in the window's time.

def window_count(arrivals_per_stream, t0: float, t1: float) -> int:
    """Frames taken by all streams inside the window (t0, t1]."""
    return sum(1 for arrivals in arrivals_per_stream for t in arrivals if t0 < t <= t1)


def window_rate(arrivals_per_stream, t0: float, t1: float) -> float:
    """Audio seconds made per wall second inside the window (t0, t1]."""
    return window_count(arrivals_per_stream, t0, t1) * FRAME_S / (t1 - t0)


def window_gaps(arrivals, t0: float, t1: float) -> list[float]:
    """A stream's gaps (s) between consecutive frames whose later frame lands in (t0, t1] (the
    earlier one may be before t0), and the gap still open at t1 (a lower bound of the next one:
    a stream stalled through the window counts as stalled)."""
    before = [t for t in arrivals if t <= t0]
    inside = [t for t in arrivals if t0 < t <= t1]
    times = before[-1:] + inside
    gaps = [b - a for a, b in zip(times, times[1:])]
    if times:
        gaps.append(t1 - times[-1])
    return gaps


def gap_p99_ms(arrivals, t0: float, t1: float) -> float:
    """The p99 of a stream's gaps inside the window, in ms (nan without any frame by t1)."""
    return percentile(window_gaps(arrivals, t0, t1), 99) * 1e3


# ---- where first audio goes (the engine's RequestStats.first_audio_ms()) --------------------------

FIRST_AUDIO_PARTS = (("queue", "queue"), ("prefill", "prefill"), ("first_frame", "first frame"),
                     ("audio_decode", "audio"), ("hand_off", "hand-off"))


def _is_nan(x) -> bool:
    return x is None or x != x


def median_parts(breakdowns) -> dict:
    """The median of each part (and of the total) over streams' first_audio_ms() dicts, nan parts
    left out (nan where no stream has that part).  Medians of parts need not sum to the median total."""
    keys = [k for k, _ in FIRST_AUDIO_PARTS] + ["total"]
    return {k: median([b[k] for b in breakdowns if not _is_nan(b.get(k))]) for k in keys}


def format_first_audio(parts: dict) -> str:
    """"first audio 46.5 ms = queue 0.1 + prefill 12.0 + ..." with "-" for a part not measured."""
    def ms(x):
        return "-" if _is_nan(x) else f"{x:.1f}"

    return f"first audio {ms(parts.get('total'))} ms = " + " + ".join(
        f"{label} {ms(parts.get(key))}" for key, label in FIRST_AUDIO_PARTS)
