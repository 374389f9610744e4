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
