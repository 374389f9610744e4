"""The metrics math on synthetic timings."""
import math

import numpy as np
import pytest

from misotts.bench.stats import median, percentile, stream_metrics, throughput


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.random(n).tolist()
        for q in (0, 10, 50, 90, 100):
            assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_median_and_p90_by_hand():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert percentile(list(range(11)), 90) == 9
    assert math.isnan(median([]))


def test_stream_metrics_by_hand():
    m = stream_metrics([0.5, 0.6, 0.8, 0.9])  # frames reach the host at these times after the call
    assert m["frames"] == 4
    assert m["first_ms"] == pytest.approx(500)
    assert m["frame_ms"] == pytest.approx(100)  # gaps 0.1, 0.2, 0.1
    assert m["frame_p90_ms"] == pytest.approx(180)  # 0.1 + 0.8 * (0.2 - 0.1)
    assert m["rtf"] == pytest.approx(0.9 / (4 * 0.08))


def test_one_frame_stream_has_a_first_frame_and_no_gaps():
    m = stream_metrics([0.2])
    assert m["first_ms"] == pytest.approx(200) and math.isnan(m["frame_ms"])
    assert m["rtf"] == pytest.approx(0.2 / 0.08)


def test_throughput_is_audio_seconds_per_second():
    assert throughput(streams=4, frames=10, wall_s=2.0) == pytest.approx(1.6)
